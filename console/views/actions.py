"""Actions on a release: request a review, approve or reject it, pause, resume, roll back.

Each is a POST with CSRF behind a role guard (``console.guards``): a user without the
role gets 403 and nothing changes. The view validates a Django form, calls the
service in ``rollout`` (which writes the change with its audit row) and redirects to
the release page with a message saying what happened, or, when the service refuses,
why (``console.refusals``). A form that does not validate is shown again with its
error beside the field (400), and nothing changes.
"""

from __future__ import annotations

import re

from django import forms
from django.contrib import messages
from django.http import Http404, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme

from console.guards import action, reviewer_action, rollout_admin_action
from console.refusals import explain
from rollout import transitions
from rollout.models import Release, Review, ReviewTrigger, Verdict
from rollout.plan_schema import SLUG_PATTERN
from rollout.reviews import create_review
from stagegate.errors import Refused
from stagegate.roles import REVIEWER, ROLLOUT_ADMIN

REASON_MAX = 1000  # rollout.transitions keeps at most this much of a reason
COMMENT_MAX = 2000  # and of an approval's comment


class ReasonForm(forms.Form):
    """Why a release is paused, resumed or rolled back (kept with the transition)."""

    reason = forms.CharField(
        max_length=REASON_MAX,
        error_messages={"required": "Say why: a reason is required."},
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text="Kept with the change and in the audit log.",
    )
    # The stage the user saw: a repeated roll back does not go back twice.
    from_stage = forms.CharField(max_length=40, required=False, widget=forms.HiddenInput)


class VerdictForm(forms.Form):
    comment = forms.CharField(
        max_length=COMMENT_MAX,
        required=False,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text="Optional; kept with your verdict.",
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Two of these forms share a page: each label says which verdict it goes with.
        if self.prefix == "reject":
            self.fields["comment"].label = "Why you reject it"
        else:
            self.fields["comment"].label = "Comment on your approval"


CHANGES = {
    # action: (service, form title, what it did, what "nothing to do" means)
    "pause": (
        transitions.pause,
        "Pause",
        "{name} is paused: the proxy refuses its requests until it is resumed.",
        "{name} was already paused; nothing changed.",
    ),
    "resume": (
        transitions.resume,
        "Resume",
        "{name} is served again, in stage {stage}.",
        "{name} was not paused; nothing changed.",
    ),
    "rollback": (
        transitions.rollback,
        "Roll back",
        "{name} is rolled back to stage {stage}.",
        "{name} is no longer in the stage you saw; nothing changed.",
    ),
}


def _release(name: str) -> Release:
    if not re.fullmatch(SLUG_PATTERN, name):  # no such name: never sent to the database
        raise Http404("no such release")
    return get_object_or_404(
        Release.objects.select_related("active_plan"), name=name, active_plan__isnull=False
    )


def _release_page(release: Release) -> str:
    return reverse("console:release", args=[release.name])


def _back(request, default: str) -> HttpResponseRedirect:
    """To the console page the form came from (``next``), else ``default``."""
    target = request.POST.get("next", "")
    if not (
        target.startswith("/console/")
        and url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()})
    ):
        target = default
    return HttpResponseRedirect(target)


def _form_again(request, *, form, title: str, release: Release, url: str, review=None):
    """The form again with its errors beside the fields (400); nothing changed."""
    return render(
        request,
        "console/action_form.html",
        {
            "form": form,
            "title": title,
            "release": release,
            "review": review,
            "url": url,
            "next": request.POST.get("next", ""),
        },
        status=400,
    )


@action(ROLLOUT_ADMIN, REVIEWER)
def request_review(request, name: str):
    release = _release(name)
    try:
        review = create_review(release, trigger=ReviewTrigger.API, requested_by=request.user)
    except Refused as refused:
        messages.error(request, explain(refused))
        return _back(request, _release_page(release))
    if review.recommendation == "advance" and review.approvals_needed:
        messages.success(
            request,
            f"Review {review.public_id} recommends advancing to {review.next_stage}. It needs "
            f"{review.approvals_needed} approvals from reviewers other than you.",
        )
    else:
        messages.success(
            request,
            f"Review {review.public_id} recommends {review.get_recommendation_display()}: "
            f"{review.summary}",
        )
    return _back(request, _release_page(release))


def _change(request, name: str, kind: str):
    release = _release(name)
    service, title, done, nothing = CHANGES[kind]
    form = ReasonForm(request.POST, prefix=kind)
    if not form.is_valid():
        return _form_again(
            request,
            form=form,
            title=f"{title} {release.name}",
            release=release,
            url=reverse(f"console:{kind}", args=[release.name]),
        )
    extra = {}
    if kind == "rollback":
        extra["from_stage"] = form.cleaned_data["from_stage"] or release.current_stage
    try:
        transition = service(
            release, actor=request.user, reason=form.cleaned_data["reason"], **extra
        )
    except Refused as refused:
        messages.error(request, explain(refused))
        return _back(request, _release_page(release))
    if transition is None:
        messages.warning(request, nothing.format(name=release.name))
    else:
        messages.success(request, done.format(name=release.name, stage=transition.to_stage))
    return _back(request, _release_page(release))


@rollout_admin_action
def pause(request, name: str):
    return _change(request, name, "pause")


@rollout_admin_action
def resume(request, name: str):
    return _change(request, name, "resume")


@rollout_admin_action
def rollback(request, name: str):
    return _change(request, name, "rollback")


def _vote(request, public_id: str, verdict: str):
    review = get_object_or_404(
        Review.objects.select_related("release__active_plan", "plan"), public_id=public_id
    )
    release = review.release
    form = VerdictForm(request.POST, prefix=verdict)
    if not form.is_valid():
        title = "Approve" if verdict == Verdict.APPROVE else "Reject"
        return _form_again(
            request,
            form=form,
            title=f"{title} review {review.public_id}",
            release=release,
            url=reverse(f"console:review_{verdict}", args=[review.public_id]),
            review=review,
        )
    try:
        result = transitions.approve(
            review, reviewer=request.user, verdict=verdict, comment=form.cleaned_data["comment"]
        )
    except Refused as refused:
        messages.error(request, explain(refused))
        return _back(request, _release_page(release))
    if not result.created:
        messages.warning(request, "You had already given this verdict; nothing changed.")
    elif verdict == Verdict.REJECT:
        messages.success(
            request,
            f"You rejected review {review.public_id}: {release.name} cannot advance on it. "
            "A new review is needed once the problem is fixed.",
        )
    elif result.transition is not None:
        messages.success(
            request,
            f"You approved review {review.public_id}; that completes its approvals: "
            f"{release.name} advanced to {result.transition.to_stage}.",
        )
    elif result.blocked:
        code, _, message = result.blocked.partition(": ")
        messages.warning(
            request,
            f"You approved review {review.public_id}; its approvals are complete, but the "
            f"advance was refused: {explain(Refused(code, message))}",
        )
    else:
        counted = len(transitions.counted_approvals(review))
        missing = max(0, review.approvals_needed - counted)
        messages.success(
            request,
            f"You approved review {review.public_id}: {counted} of {review.approvals_needed} "
            f"approvals; {missing} more needed.",
        )
    return _back(request, _release_page(release))


@reviewer_action
def approve(request, public_id: str):
    return _vote(request, public_id, Verdict.APPROVE)


@reviewer_action
def reject(request, public_id: str):
    return _vote(request, public_id, Verdict.REJECT)
