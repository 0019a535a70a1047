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
