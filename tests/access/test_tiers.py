from __future__ import annotations

from datetime import timedelta

from django.core.management import call_command
from django.utils import timezone

from access.models import Verification, VerificationStatus
from access.tier_changes import (
    effective_tiers_by_release,
    expire_verifications,
    set_verification_status,
)
from access.tiers import effective_tier
from monitoring.models import AuditEvent
from rollout.plans import plan_doc
from tests.factories import make_org


def _stage(release, name):
    return plan_doc(release.active_plan).stage(name)


def test_effective_tier_is_claimed_tier_with_required_evidence(release):
    stage = _stage(release, "research_preview")
    assert effective_tier("research_partner", {"monitoring_agreement"}, stage) == "research_partner"


def test_effective_tier_drops_to_public_without_required_evidence(release):
    stage = _stage(release, "research_preview")
    assert effective_tier("research_partner", set(), stage) == "public"
    assert effective_tier("research_partner", {"business_kyc"}, stage) == "public"


def test_effective_tier_follows_the_stage_policy(release):
    commercial = _stage(release, "commercial")
    required = set(commercial.tiers["verified_commercial"].verifications)
    assert effective_tier("verified_commercial", required, commercial) == "verified_commercial"
    assert effective_tier("verified_commercial", set(), commercial) == "public"


def test_expired_evidence_drops_tier_at_once(release):
    org = make_org("late-lab", "research_partner", evidence_days=1)
    now = timezone.now()
    assert effective_tiers_by_release(org, now) == {"atlas-2": "research_partner"}
    assert effective_tiers_by_release(org, now + timedelta(days=1, seconds=1)) == {
        "atlas-2": "public"
    }


def test_expiry_sweep_marks_evidence_expired_and_audits_downgrade(release):
    org = make_org("late-lab", "research_partner")
    verification = org.verifications.get()
    Verification.objects.filter(pk=verification.pk).update(
        expires_at=timezone.now() - timedelta(minutes=1)
    )
    assert expire_verifications() == 1
    verification.refresh_from_db()
    assert verification.status == VerificationStatus.EXPIRED
    downgrade = AuditEvent.objects.get(action="org.tier_downgraded")
    assert downgrade.object_id == org.public_id
    assert downgrade.data == {
        "release": "atlas-2",
        "from": "research_partner",
        "to": "public",
        "cause": f"verification {verification.public_id} expired",
    }
    assert expire_verifications() == 0  # idempotent: nothing left to expire


def test_expiry_sweep_command_reports_count(release, capsys):
    org = make_org("late-lab", "research_partner")
    org.verifications.update(expires_at=timezone.now() - timedelta(seconds=1))
    call_command("expire_verifications")
    assert capsys.readouterr().out.strip() == "1 verification(s) expired"


def test_revoked_evidence_downgrades_and_revalidation_restores(release, ada):
    org = make_org("wobbly-lab", "research_partner")
    verification = org.verifications.get()
    set_verification_status(verification, status=VerificationStatus.REVOKED, actor=ada)
    assert effective_tiers_by_release(org, timezone.now()) == {"atlas-2": "public"}
    set_verification_status(verification, status=VerificationStatus.VALID, actor=ada)
    assert effective_tiers_by_release(org, timezone.now()) == {"atlas-2": "research_partner"}
    actions = list(
        AuditEvent.objects.filter(object_id__in=[org.public_id, verification.public_id])
        .order_by("seq")
        .values_list("action", flat=True)
    )
    assert actions == [
        "verification.revoked",
        "org.tier_downgraded",
        "verification.valid",
        "org.tier_restored",
    ]


def test_evidence_change_that_does_not_change_tier_writes_no_tier_row(release, ada):
    org = make_org("public-co", "public")
    extra = org.verifications.create(
        kind="business_kyc", status="valid", expires_at=timezone.now() + timedelta(days=9)
    )
    set_verification_status(extra, status=VerificationStatus.REVOKED, actor=ada)
    assert not AuditEvent.objects.filter(action__startswith="org.tier_").exists()
