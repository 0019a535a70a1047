"""Factories for the test cast. Plain functions over the real services."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from django.contrib.auth.models import Group, User
from django.utils import timezone

from access.models import (
    Membership,
    MembershipRole,
    Organization,
    Verification,
    VerificationStatus,
)
from monitoring.records import FlagSample, UsageRecord, excerpt

EXAMPLE_PLAN = Path(__file__).resolve().parent.parent / "docs" / "examples" / "atlas-2.yaml"
TIER_EVIDENCE = {
    "research_partner": "monitoring_agreement",
    "verified_commercial": "business_kyc",
    "credentialed_academic": "academic_credential",
}


def make_user(username: str, *, roles: tuple[str, ...] = (), org_admin_of=()) -> User:
    user = User.objects.create_user(username=username, password=f"{username}-pass-9137")
    for role in roles:
        user.groups.add(Group.objects.get_or_create(name=role)[0])
    for org in org_admin_of:
        Membership.objects.create(user=user, organization=org, role=MembershipRole.ORG_ADMIN)
    return user


def make_org(slug: str, tier: str, *, evidence_days: int = 365) -> Organization:
    org = Organization.objects.create(slug=slug, name=slug.replace("-", " ").title(), tier=tier)
    kind = TIER_EVIDENCE.get(tier)
    if kind:
        make_verification(org, kind, expires_at=timezone.now() + timedelta(days=evidence_days))
    return org


def make_verification(org: Organization, kind: str, *, expires_at, status=VerificationStatus.VALID):
    return Verification.objects.create(
        organization=org,
        kind=kind,
        status=status,
        verified_at=timezone.now(),
        evidence_note="test evidence",
        expires_at=expires_at,
    )


def usage_event(*, at, release: str, stage: str, org: str, tier: str, **fields) -> UsageRecord:
    """One usage event as the proxy records it (an allowed, served request unless
    ``fields`` say otherwise), for ``monitoring.usage.write_events``."""
    values = {
        "created_at": at.timestamp(),
        "request_id": f"req-{at.timestamp():.6f}-{org}",
        "org": org,
        "key": "key_test",
        "tier": tier,
        "release": release,
        "stage": stage,
        "endpoint": "chat.completions",
        "decision": "allow",
        "reason": "ok",
        "status": 200,
        "error": "",
        "streamed": False,
        "client_disconnected": False,
        "flagged": False,
        "prompt_tokens": 10,
        "completion_tokens": 20,
        "latency_ms": 5.0,
        "upstream_latency_ms": 4.0,
        "plan_version": 1,
        "max_tokens": None,
        "claimed_tier": tier,
        "verifications": (),
        **fields,
    }
    return UsageRecord(**values)


def traffic(
    *,
    release: str,
    stage: str,
    orgs: dict[str, str],
    count: int,
    start,
    end,
    flagged_every: int = 0,
    error_every: int = 0,
) -> list[UsageRecord]:
    """``count`` allowed requests spread evenly over [start, end), round-robin over
    ``orgs`` (slug -> tier); every ``flagged_every``-th is flagged, every
    ``error_every``-th failed upstream."""
    events = []
    slugs = sorted(orgs)
    step = (end - start) / count
    for index in range(count):
        org = slugs[index % len(slugs)]
        fields = {}
        if flagged_every and index % flagged_every == 0:
            fields["flagged"] = True
        if error_every and index % error_every == 0:
            fields.update(status=502, error="upstream_error")
        events.append(
            usage_event(
                at=start + step * index,
                release=release,
                stage=stage,
                org=org,
                tier=orgs[org],
                request_id=f"req-{index}",
                **fields,
            )
        )
    return events


def flag_sample(*, at, release: str, stage: str, text: str = "write me ransomware", **fields):
    """One flagged sample as the proxy records it (a prompt flagged in ``cyber`` and
    kept 30 days unless ``fields`` say otherwise), for ``UsageRecorder.record_sample``
    or ``monitoring.usage.write_samples``."""
    values = {
        "created_at": at.timestamp(),
        "request_id": f"req-{at.timestamp():.6f}",
        "release": release,
        "stage": stage,
        "tier": "research_partner",
        "org": "org_test",
        "key": "key_test",
        "categories": "cyber",
        "source": "prompt",
        "action": "flag",
        "excerpt": excerpt(text),
        "retain_days": 30,
        **fields,
    }
    return FlagSample(**values)
