"""Organizations: claimed and effective tiers, verifications, members; and their keys.

Who may do what (the REST API's rules, ``access.api``):

- everyone with a console role reads the organizations they may see: staff all of
  them, an org admin only their own (any other is a 404, as if it did not exist);
- rollout admins record, validate and revoke verifications;
- rollout admins, and an org admin for their own organizations, add and remove
  members and create, rotate and revoke keys;
- reviewers and viewers change nothing: their POSTs are refused (403).

A new key's secret is rendered once, in the response to the POST that made it, sent
with ``Cache-Control: no-store``; no page renders it again.
"""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import datetime, timedelta

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.utils.cache import add_never_cache_headers

from access import keys, organizations, verifications
from access.models import ApiKey, Membership, Organization, Verification
from console.charts import sparkline
from console.guards import console_action, console_page, rollout_admin_action
from console.org_forms import (
    KeyCreateForm,
    KeyRevokeForm,
    KeyRotateForm,
    MemberForm,
    VerificationForm,
    VerificationRevokeForm,
)
from console.org_selectors import (
    USAGE_DAYS,
    KeyRow,
    key_rows,
    key_usage,
    managed_org_ids,
    may_manage,
    org_summaries,
    org_usage,
    visible_keys,
    visible_orgs,
)
from stagegate.errors import Refused
from stagegate.roles import is_rollout_admin

SENT_KEY_FORMS = "console_sent_key_forms"  # session: the last 50 key forms sent
ORGS_PER_PAGE = 25
KEYS_PER_PAGE = 50
PUBLIC_ID = re.compile(r"[a-z]{1,8}_[0-9A-Za-z]{1,40}")
NOT_YOURS = "Reviewers and viewers read organizations and keys but change nothing."


def _checked_id(public_id: str) -> str:
    """A public id as the models make them (``key_…``, ``ver_…``, ``mem_…``), else 404:
    a forged one (a NUL byte, 10 000 characters) never reaches the database."""
    if not PUBLIC_ID.fullmatch(public_id):
        raise Http404("No such object.")
    return public_id


def _visible_org(request, slug: str) -> Organization:
    return get_object_or_404(visible_orgs(request.user), slug=slug)


def _managed(request, organization: Organization) -> None:
    if not may_manage(managed_org_ids(request.user), organization.pk):
        raise PermissionDenied(NOT_YOURS)


# --- pages -----------------------------------------------------------------------------------


@console_page
def orgs(request):
    page = Paginator(visible_orgs(request.user), ORGS_PER_PAGE).get_page(request.GET.get("page"))
    summaries = org_summaries(list(page.object_list), user=request.user, now=timezone.now())
    return render(request, "console/orgs.html", {"page": page, "summaries": summaries})


def _org_page(request, organization: Organization, *, status: int = 200, **forms):
    user = request.user
    now = timezone.now()
    summary = org_summaries([organization], user=user, now=now)[0]
    org_keys = _with_usage(
        key_rows(visible_keys(user).filter(organization=organization)[:KEYS_PER_PAGE], now=now),
        now=now,
    )
    context = {
        "summary": summary,
        "org": summary.organization,
        "key_rows": org_keys,
        "usage_svg": _usage_svg(organization, org_usage([organization.public_id], now=now)),
        "usage_days": USAGE_DAYS,
        "can_verify": is_rollout_admin(user),
        "verification_form": forms.get("verification_form") or VerificationForm(),
        "member_form": forms.get("member_form") or MemberForm(),
        "key_form": forms.get("key_form") or KeyCreateForm(),
        "revoke_form": forms.get("revoke_form"),
        "revoke_target": forms.get("revoke_target"),
    }
    return render(request, "console/org.html", context, status=status)


@console_page
def org(request, slug: str):
    return _org_page(request, _visible_org(request, slug))


@console_page
def keys_list(request):
    now = timezone.now()
    user = request.user
    page = Paginator(visible_keys(user), KEYS_PER_PAGE).get_page(request.GET.get("page"))
    rows = _with_usage(key_rows(page.object_list, now=now), now=now)
    groups = []  # the page's keys by organization (they come ordered by its slug)
    for row in rows:
        organization = row.key.organization
        if not groups or groups[-1]["org"].pk != organization.pk:
            groups.append({"org": organization, "rows": []})
        groups[-1]["rows"].append(row)
    managed = managed_org_ids(user)
    creatable = visible_orgs(user) if managed is None else visible_orgs(user).filter(pk__in=managed)
    return render(
        request,
        "console/keys.html",
        {
            "page": page,
            "groups": groups,
            "usage_days": USAGE_DAYS,
            "managed": managed,
            "all_managed": managed is None,
            "creatable": list(creatable[:ORGS_PER_PAGE]) if managed is not None else [],
        },
    )


def _key_page(request, api_key: ApiKey, *, status: int = 200, **forms):
    now = timezone.now()
    row = _with_usage(key_rows([api_key], now=now), now=now)[0]
    organization = api_key.organization
    return render(
        request,
        "console/key.html",
        {
            "row": row,
            "api_key": api_key,
            "org": organization,
            "usage_days": USAGE_DAYS,
            "manageable": may_manage(managed_org_ids(request.user), organization.pk),
            "rotate_form": forms.get("rotate_form") or KeyRotateForm(),
            "revoke_form": forms.get("revoke_form") or KeyRevokeForm(),
        },
        status=status,
    )


def _usage_svg(organization: Organization, usage: dict[str, list[float]]) -> str:
    return sparkline(
        usage.get(organization.public_id, []),
        title=f"{organization.slug}: requests per hour over {USAGE_DAYS} days, all keys",
    )


def _with_usage(rows: list[KeyRow], *, now: datetime) -> list[KeyRow]:
    """``rows`` with each key's sparkline, from one query (``key_usage``)."""
    usage = key_usage([row.key.public_id for row in rows], now=now)
    return [
        replace(
            row,
            usage_svg=sparkline(
                usage.get(row.key.public_id, []),
                title=f"{row.key.name} ({row.key.prefix}…): requests per hour over"
                f" {USAGE_DAYS} days",
            ),
        )
        for row in rows
    ]


def _visible_key(request, public_id: str) -> ApiKey:
    return get_object_or_404(visible_keys(request.user), public_id=_checked_id(public_id))


@console_page
def key(request, public_id: str):
    return _key_page(request, _visible_key(request, public_id))


def _secret_page(request, issued: keys.IssuedKey, *, rotated: ApiKey | None = None):
    """The one response that shows a secret: never stored by any cache."""
    response = render(
        request,
        "console/key_secret.html",
        {"api_key": issued.api_key, "raw_key": issued.raw_key, "rotated": rotated},
    )
    add_never_cache_headers(response)  # Cache-Control: ... no-store ...
    return response


@console_page
def key_new(request, slug: str):
    """The form for a new key of one organization; POST issues it and shows it once."""
    organization = _visible_org(request, slug)
    _managed(request, organization)
    if request.method != "POST":
        return render(
            request, "console/key_new.html", {"org": organization, "form": KeyCreateForm()}
        )
    form = KeyCreateForm(request.POST)
    if not form.is_valid():
        return render(
            request, "console/key_new.html", {"org": organization, "form": form}, status=400
        )
    sent = request.session.get(SENT_KEY_FORMS, [])
    if form.cleaned_data["once"] in sent:  # the same form again: a reload, a double click
        messages.error(
            request,
            "That form was already sent: its key exists and its secret was shown once, so no"
            " second key was made. Revoke the key if its secret was lost.",
        )
        return redirect("console:org", slug=organization.slug)
    request.session[SENT_KEY_FORMS] = [*sent[-49:], form.cleaned_data["once"]]
    issued = keys.issue_key(
        organization=organization,
        name=form.cleaned_data["name"],
        expires_at=form.cleaned_data["expires_at"],
        actor=request.user,
    )
    return _secret_page(request, issued)


# --- key actions -----------------------------------------------------------------------------


@console_action
def key_rotate(request, public_id: str):
    api_key = _visible_key(request, public_id)
    _managed(request, api_key.organization)
    form = KeyRotateForm(request.POST)
    if not form.is_valid():
        return _key_page(request, api_key, status=400, rotate_form=form)
    try:
        issued = keys.rotate_key(
            api_key=api_key,
            actor=request.user,
            grace=timedelta(hours=form.cleaned_data["grace_hours"]),
        )
    except Refused as refused:  # revoked, expired or already rotated
        form.add_error(None, refused.message)
        return _key_page(request, api_key, status=409, rotate_form=form)
    return _secret_page(request, issued, rotated=issued.api_key.rotated_from)


@console_action
def key_revoke(request, public_id: str):
    api_key = _visible_key(request, public_id)
    _managed(request, api_key.organization)
    form = KeyRevokeForm(request.POST)
    if not form.is_valid():
        return _key_page(request, api_key, status=400, revoke_form=form)
    keys.revoke_key(api_key=api_key, actor=request.user, reason=form.cleaned_data["reason"])
    messages.success(request, f"Key {api_key.prefix} revoked; it is refused from now on.")
    return redirect("console:key", public_id=api_key.public_id)


# --- members ---------------------------------------------------------------------------------


@console_action
def member_add(request, slug: str):
    organization = _visible_org(request, slug)
    _managed(request, organization)
    form = MemberForm(request.POST)
    if form.is_valid():
        try:
            organizations.add_member(
                organization=organization,
                username=form.cleaned_data["username"],
                role=form.cleaned_data["role"],
                actor=request.user,
            )
        except Refused as refused:  # not addable, or a member already
            form.add_error("username", refused.message)
    if not form.is_valid():
        return _org_page(request, organization, status=400, member_form=form)
    messages.success(request, f"{form.cleaned_data['username']} added to {organization.slug}.")
    return redirect("console:org", slug=organization.slug)


@console_action
def member_remove(request, slug: str, public_id: str):
    organization = _visible_org(request, slug)
    _managed(request, organization)
    membership = get_object_or_404(
        Membership.objects.select_related("user", "organization"),
        organization=organization,
        public_id=_checked_id(public_id),
    )
    organizations.remove_member(membership, actor=request.user)
    messages.success(request, f"{membership.user.get_username()} removed from {organization.slug}.")
    if not visible_orgs(request.user).filter(pk=organization.pk).exists():
        return redirect("console:orgs")  # an org admin who removed themselves
    return redirect("console:org", slug=organization.slug)


# --- verifications (rollout admins) ------------------------------------------------------------


@rollout_admin_action
def verification_add(request, slug: str):
    organization = _visible_org(request, slug)
    form = VerificationForm(request.POST)
    if not form.is_valid():
        return _org_page(request, organization, status=400, verification_form=form)
    verifications.create_verification(
        organization=organization,
        kind=form.cleaned_data["kind"],
        status=form.cleaned_data["status"],
        expires_at=form.cleaned_data["expires_at"],
        evidence_note=form.cleaned_data["evidence_note"],
        actor=request.user,
    )
    messages.success(request, f"Verification recorded for {organization.slug}.")
    return redirect("console:org", slug=organization.slug)


def _verification(organization: Organization, public_id: str) -> Verification:
    return get_object_or_404(
        Verification, organization=organization, public_id=_checked_id(public_id)
    )


@rollout_admin_action
def verification_revoke(request, slug: str, public_id: str):
    organization = _visible_org(request, slug)
    verification = _verification(organization, public_id)
    form = VerificationRevokeForm(request.POST)
    if not form.is_valid():
        return _org_page(
            request, organization, status=400, revoke_form=form, revoke_target=public_id
        )
    try:
        verifications.revoke_verification(
            verification, actor=request.user, reason=form.cleaned_data["reason"]
        )
    except Refused as refused:
        messages.error(request, refused.message)
    else:
        messages.success(request, f"Verification {verification.public_id} revoked.")
    return redirect("console:org", slug=organization.slug)


@rollout_admin_action
def verification_validate(request, slug: str, public_id: str):
    organization = _visible_org(request, slug)
    verification = _verification(organization, public_id)
    try:
        verifications.validate_verification(verification, actor=request.user)
    except Refused as refused:
        messages.error(request, refused.message)
    else:
        messages.success(request, f"Verification {verification.public_id} is valid.")
    return redirect("console:org", slug=organization.slug)
