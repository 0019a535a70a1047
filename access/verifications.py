"""Recording verifications and the status changes people make to them.

Every status change itself goes through ``access.tier_changes.set_verification_status``,
which audits it and the effective-tier changes it causes; this module adds the
creation of a verification and the rules for which changes a person may make.
"""

from __future__ import annotations

from datetime import datetime

from django.db import transaction
from django.utils import timezone

from access.models import Organization, Verification, VerificationStatus
from access.tier_changes import set_verification_status, tier_changes_audited
from monitoring import audit
from stagegate.errors import Refused


def create_verification(
    *,
    organization: Organization,
    kind: str,
    expires_at: datetime,
    evidence_note: str = "",
    actor,
    status: str = VerificationStatus.PENDING,
) -> Verification:
    """Record a verification (pending, or valid at once), audited as ``verification.created``.

    A verification created valid can restore the organization's effective tier at
    once; that change is audited as well.
    """
    if status not in (VerificationStatus.PENDING, VerificationStatus.VALID):
        raise Refused(
            "status_not_initial",
            f"a new verification is pending or valid, not {status}",
            status=400,
            field="status",
        )
    now = timezone.now()
    with transaction.atomic():
        verified = status == VerificationStatus.VALID
        cause = f"{kind} verification created valid"
        with tier_changes_audited(organization, actor=actor, cause=cause, now=now):
            verification = Verification.objects.create(
                organization=organization,
                kind=kind,
                status=status,
                expires_at=expires_at,
                evidence_note=evidence_note,
                verified_at=now if verified else None,
                verified_by=actor if verified and getattr(actor, "pk", None) else None,
            )
            audit.record(
                "verification.created",
                actor=actor,
                object_type=audit.ObjectType.VERIFICATION,
                object_id=verification.public_id,
                data={
                    "organization": organization.public_id,
                    "kind": kind,
                    "status": status,
                    "expires_at": expires_at,
                },
            )
    return verification


def _locked(verification: Verification) -> Verification:
    """The row again, locked, so the status checked is the status changed."""
    return (
        Verification.objects.select_for_update()
        .select_related("organization")
        .get(pk=verification.pk)
    )


def validate_verification(verification: Verification, *, actor, note: str = "") -> Verification:
    """Mark a pending verification valid. Valid stays valid (no change, no audit row);
    revoked, rejected and expired evidence is not revived (Refused
    ``verification_not_pending``, 409): record a new verification."""
    with transaction.atomic():
        verification = _locked(verification)
        if verification.status == VerificationStatus.VALID:
            return verification
        if verification.status != VerificationStatus.PENDING:
            raise Refused(
                "verification_not_pending",
                f"verification {verification.public_id} is {verification.status}; "
                "only a pending verification can be validated (record a new one instead)",
            )
        if verification.expires_at <= timezone.now():
            raise Refused(
                "verification_not_pending",
                f"verification {verification.public_id} expired at "
                f"{verification.expires_at.isoformat()}; record a new one instead",
            )
        return set_verification_status(
            verification, status=VerificationStatus.VALID, actor=actor, note=note
        )


def revoke_verification(verification: Verification, *, actor, reason: str = "") -> Verification:
    """Revoke a pending or valid verification; revoking a revoked one changes nothing,
    any other is Refused ``verification_not_revocable`` (409)."""
    with transaction.atomic():
        verification = _locked(verification)
        if verification.status == VerificationStatus.REVOKED:
            return verification
        if verification.status not in (VerificationStatus.PENDING, VerificationStatus.VALID):
            raise Refused(
                "verification_not_revocable",
                f"verification {verification.public_id} is {verification.status} "
                "and cannot be revoked",
            )
        note = f"revoked: {reason}" if reason else ""
        return set_verification_status(
            verification, status=VerificationStatus.REVOKED, actor=actor, note=note
        )
