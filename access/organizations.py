"""Creating and changing organizations and their memberships, each change audited
in the transaction that makes it."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.utils import timezone

from access.models import Membership, MembershipRole, Organization, validate_org_slug
from access.tiers import tier_changes_audited
from monitoring import audit
from stagegate.errors import Refused

ORG_FIELDS = ("slug", "name", "tier")


class AlreadyMember(ValueError):
    """The user already has a membership in the organization."""


def create_organization(*, slug: str, name: str, tier: str, actor) -> Organization:
    validate_org_slug(slug)
    with transaction.atomic():
        organization = Organization.objects.create(slug=slug, name=name, tier=tier)
        audit.record(
            "org.created",
            actor=actor,
            object_type="organization",
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
    if unknown:
        raise ValueError(f"cannot change {sorted(unknown)} of an organization")
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
                object_type="organization",
                object_id=organization.public_id,
                data={"slug": organization.slug, "changes": changed},
            )
    return organization


def find_member_candidate(username: str):
    """The active user called ``username``, or None."""
    return get_user_model().objects.filter(username=username, is_active=True).first()


def add_member(
    *, organization: Organization, user, role: str = MembershipRole.MEMBER, actor
) -> Membership:
    """Give ``user`` a membership in ``organization``; AlreadyMember if they have one."""
    try:
        with transaction.atomic():
            membership = Membership.objects.create(user=user, organization=organization, role=role)
            audit.record(
                "membership.added",
                actor=actor,
                object_type="membership",
                object_id=membership.public_id,
                data={
                    "organization": organization.public_id,
                    "user": user.get_username(),
                    "role": role,
                },
            )
    except IntegrityError:
        if Membership.objects.filter(user=user, organization=organization).exists():
            raise AlreadyMember(
                f"{user.get_username()} is already a member of {organization.slug}"
            ) from None
        raise
    return membership


def remove_member(membership: Membership, *, actor) -> None:
    with transaction.atomic():
        audit.record(
            "membership.removed",
            actor=actor,
            object_type="membership",
            object_id=membership.public_id,
            data={
                "organization": membership.organization.public_id,
                "user": membership.user.get_username(),
                "role": membership.role,
            },
        )
        membership.delete()
