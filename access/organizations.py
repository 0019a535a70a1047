"""Creating and changing organizations and their memberships, each change audited
in the transaction that makes it."""

from __future__ import annotations

import logging

from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.utils import timezone

from access.models import Membership, MembershipRole, Organization, validate_org_slug
from access.tier_changes import tier_changes_audited
from monitoring import audit
from monitoring.redaction import redact_secrets
from stagegate.errors import Refused
from stagegate.roles import STAFF_ROLES, admin_org_ids, is_rollout_admin

log = logging.getLogger(__name__)

ORG_FIELDS = ("slug", "name", "tier")
# One answer for every username an org admin may not add, whether or not it exists, so
# that the answer cannot be used to find out which usernames exist.
NOT_ADDABLE = "no user you may add has this username"


def create_organization(*, slug: str, name: str, tier: str, actor) -> Organization:
    validate_org_slug(slug)
    with transaction.atomic():
        organization = Organization.objects.create(slug=slug, name=name, tier=tier)
        audit.record(
            "org.created",
            actor=actor,
            object_type=audit.ObjectType.ORGANIZATION,
            object_id=organization.public_id,
            data={"slug": slug, "name": name, "tier": tier},
        )
    return organization


def update_organization(organization: Organization, *, actor, **changes: str) -> Organization:
    """Change name and tier; audited as ``org.updated`` with the old and new value of
    every field that changed (nothing written when nothing changed). A tier change that
    changes the effective tier at a release is audited too.

    The slug may be given but not changed (Refused ``slug_immutable``, 400): rollout
    plans name organizations by slug in ``allow_orgs``, ``deny_orgs`` and the cohort
    hash, so a new slug would silently change which rules apply to the organization."""
    unknown = set(changes) - set(ORG_FIELDS)
    if unknown:  # the caller's mistake, as an unexpected keyword argument is
        raise TypeError(f"cannot change {sorted(unknown)} of an organization")
    # Compared as they would be stored (a name holds no API key's secret), so the same
    # key-shaped name given twice is no change the second time.
    changes = {field: redact_secrets(value) for field, value in changes.items()}
    now = timezone.now()
    with transaction.atomic():
        organization = Organization.objects.select_for_update().get(pk=organization.pk)
        changed = {
            field: {"from": getattr(organization, field), "to": value}
            for field, value in changes.items()
            if getattr(organization, field) != value
        }
        if "slug" in changed:
            raise Refused(
                "slug_immutable",
                f"the slug of {organization.slug} cannot change: rollout plans name"
                " organizations by slug",
                status=400,
            )
        if not changed:
            return organization
        cause = f"organization {', '.join(changed)} changed"
        with tier_changes_audited(organization, actor=actor, cause=cause, now=now):
            for field, change in changed.items():
                setattr(organization, field, change["to"])
            organization.save(update_fields=[*changed, "updated_at"])
            audit.record(
                "org.updated",
                actor=actor,
                object_type=audit.ObjectType.ORGANIZATION,
                object_id=organization.public_id,
                data={"slug": organization.slug, "changes": changed},
            )
    return organization


def find_member_candidate(*, username: str, actor):
    """The user called ``username`` whom ``actor`` may add to an organization, or None.

    A rollout admin may add any active user. Anyone else (an org admin, whose view
    already limits them to the organizations they administer) may add only an active
    user with no staff standing (superuser, Django staff, or a staff role) and no
    membership of an organization the actor does not administer: an org admin enlists
    their own people, never staff or another organization's. One query whatever the
    reason, so a refusal takes as long as an unknown username.
    """
    users = get_user_model().objects.filter(username=username, is_active=True)
    if not is_rollout_admin(actor):
        elsewhere = Membership.objects.exclude(organization_id__in=admin_org_ids(actor))
        users = (
            users.filter(is_superuser=False, is_staff=False)
            .exclude(groups__name__in=STAFF_ROLES)
            .exclude(memberships__in=elsewhere)
        )
    return users.first()


def add_member(
    *, organization: Organization, username: str, role: str = MembershipRole.MEMBER, actor
) -> Membership:
    """Give the user called ``username`` a membership in ``organization``.

    Refused ``not_addable`` (400, about the ``username`` field, one message whatever
    the reason: no such user, inactive, staff, or another organization's member) when
    ``find_member_candidate`` finds no one ``actor`` may add; ``already_member`` (409)
    when they already have a membership."""
    user = find_member_candidate(username=username, actor=actor)
    if user is None:
        # A signal for whoever watches the logs when an org admin probes for staff or
        # other organizations' people; the caller only ever sees NOT_ADDABLE. The
        # username itself is not logged: it is client text and could hold anything.
        log.warning(
            "%s was refused adding a user to %s", audit.actor_label(actor), organization.slug
        )
        raise Refused("not_addable", NOT_ADDABLE, status=400, field="username")
    try:
        with transaction.atomic():
            membership = Membership.objects.create(user=user, organization=organization, role=role)
            audit.record(
                "membership.added",
                actor=actor,
                object_type=audit.ObjectType.MEMBERSHIP,
                object_id=membership.public_id,
                data={
                    "organization": organization.public_id,
                    "user": user.get_username(),
                    "role": role,
                },
            )
    except IntegrityError:
        if Membership.objects.filter(user=user, organization=organization).exists():
            raise Refused(
                "already_member",
                f"{user.get_username()} is already a member of {organization.slug}",
            ) from None
        raise
    return membership


def remove_member(membership: Membership, *, actor) -> None:
    with transaction.atomic():
        audit.record(
            "membership.removed",
            actor=actor,
            object_type=audit.ObjectType.MEMBERSHIP,
            object_id=membership.public_id,
            data={
                "organization": membership.organization.public_id,
                "user": membership.user.get_username(),
                "role": membership.role,
            },
        )
        membership.delete()
