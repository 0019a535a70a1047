"""The effective tiers an organization's stored evidence supports, and auditing their changes.

The rule itself is pure (``access.tiers``); this module reads verifications from
the database, changes their status, and audits every effective-tier change that
follows, per release.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from access.models import Organization, Tier, Verification, VerificationStatus
from access.tiers import tiers_by_release
from monitoring import audit
from rollout.plan_schema import StagePolicy
from rollout.plans import current_stage_policies


def valid_kinds(organization: Organization, now: datetime) -> set[str]:
    return {v.kind for v in organization.verifications.all() if v.is_valid_at(now)}


def effective_tiers_by_release(
    organization: Organization, now: datetime, policies: dict[str, StagePolicy] | None = None
) -> dict[str, str]:
    """The organization's effective tier at the current stage of every active release.

    Pass ``policies`` (from ``current_stage_policies``) to reuse plans already loaded."""
    if policies is None:
        policies = current_stage_policies()
    return tiers_by_release(organization.tier, valid_kinds(organization, now), policies)


def audit_tier_changes(
    organization: Organization, before: dict[str, str], after: dict[str, str], *, actor, cause: str
) -> None:
    """One audit row per release where the organization's effective tier changed."""
    for release_name, new_tier in sorted(after.items()):
        old_tier = before.get(release_name, new_tier)
        if old_tier == new_tier:
            continue
        audit.record(
            "org.tier_downgraded" if new_tier == Tier.PUBLIC else "org.tier_restored",
            actor=actor,
            object_type=audit.ObjectType.ORGANIZATION,
            object_id=organization.public_id,
            data={"release": release_name, "from": old_tier, "to": new_tier, "cause": cause},
        )


@contextmanager
def tier_changes_audited(organization: Organization, *, actor, cause: str, now: datetime):
    """Audit every effective-tier change that the enclosed change causes, per release.

    Use inside the change's transaction, around the writes."""
    policies = current_stage_policies()  # the enclosed change touches no plan
    before = effective_tiers_by_release(organization, now, policies)
    yield
    after = effective_tiers_by_release(organization, now, policies)
    audit_tier_changes(organization, before, after, actor=actor, cause=cause)


def set_verification_status(
    verification: Verification, *, status: str, actor, note: str = ""
) -> Verification:
    """Change a verification's status (valid, revoked, rejected, expired), audited,
    with the resulting effective-tier changes audited too."""
    now = timezone.now()
    with transaction.atomic():
        verification = Verification.objects.select_for_update().get(pk=verification.pk)
        organization = verification.organization
        if verification.status == status:
            return verification
        cause = f"verification {verification.public_id} {status}"
        with tier_changes_audited(organization, actor=actor, cause=cause, now=now):
            previous = verification.status
            verification.status = status
            fields = ["status"]
            if status == VerificationStatus.VALID:
                verification.verified_at = now
                verification.verified_by = actor if getattr(actor, "pk", None) else None
                fields += ["verified_at", "verified_by"]
            if note:
                verification.evidence_note = (verification.evidence_note + "\n" + note).strip()
                fields.append("evidence_note")
            verification.save(update_fields=fields)
            audit.record(
                f"verification.{status}",
                actor=actor,
                object_type=audit.ObjectType.VERIFICATION,
                object_id=verification.public_id,
                data={
                    "organization": organization.public_id,
                    "kind": verification.kind,
                    "from": previous,
                    "to": status,
                    "expires_at": verification.expires_at,
                },
            )
    return verification


def expire_verifications(*, now: datetime | None = None) -> int:
    """Mark valid verifications past their expiry as expired; returns how many."""
    now = now or timezone.now()
    due = Verification.objects.filter(status=VerificationStatus.VALID, expires_at__lte=now)
    count = 0
    policies = current_stage_policies()
    for verification in due.select_related("organization"):
        # The tier already dropped at the expiry instant; compare with the evidence counted.
        with transaction.atomic():
            verification = Verification.objects.select_for_update().get(pk=verification.pk)
            if verification.status != VerificationStatus.VALID:
                continue
            organization = verification.organization
            kinds_after = valid_kinds(organization, now)
            kinds_before = kinds_after | {verification.kind}
            before = tiers_by_release(organization.tier, kinds_before, policies)
            after = tiers_by_release(organization.tier, kinds_after, policies)
            verification.status = VerificationStatus.EXPIRED
            verification.save(update_fields=["status"])
            audit.record(
                "verification.expired",
                actor="system:expire_verifications",
                object_type=audit.ObjectType.VERIFICATION,
                object_id=verification.public_id,
                data={
                    "organization": organization.public_id,
                    "kind": verification.kind,
                    "expires_at": verification.expires_at,
                },
            )
            audit_tier_changes(
                organization,
                before,
                after,
                actor="system:expire_verifications",
                cause=f"verification {verification.public_id} expired",
            )
            count += 1
    return count
