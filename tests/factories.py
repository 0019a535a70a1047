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


def fine_tuning_job(
    release,
    org,
    *,
    stage: str = "research_preview",
    created_at=None,
    verdict: str = "",
    screened_at=None,
):
    """A fine-tuning job of ``org`` (under its own tier) created at ``created_at`` (an
    hour ago by default), screened with ``verdict`` at ``screened_at`` (when created;
    not screened when ``verdict`` is "")."""
    from tuning.models import FineTuningJob, TrainingFile

    created_at = created_at or timezone.now() - timedelta(hours=1)
    training = TrainingFile.objects.create(
        organization=org, filename="train.jsonl", bytes=2, rows=1, sha256="0" * 64, content=b"{}"
    )
    job = FineTuningJob.objects.create(
        organization=org,
        release=release,
        stage=stage,
        tier=org.tier,
        plan_version=1,
        training_file=training,
        seed=7,
        verdict=verdict,
        screened_at=(screened_at or created_at) if verdict else None,
    )
    FineTuningJob.objects.filter(pk=job.pk).update(created_at=created_at)  # auto_now_add
    return job


def assess(job, *, passed: bool, at=None):
    """An assessment run at ``at`` (now by default) of the tuned model ``job`` made
    (made here once)."""
    from tuning.models import Assessment, TunedModel

    tuned, _ = TunedModel.objects.get_or_create(
        job=job,
        defaults={
            "name": f"ft:{job.release.name}:{job.organization.slug}:t:{job.public_id[-8:]}",
            "organization": job.organization,
            "parent": job.release,
            "upstream_model": "ft:upstream",
        },
    )
    assessment = Assessment.objects.create(
        tuned_model=tuned,
        release=job.release,
        stage=job.stage,
        tier=job.tier,
        organization=job.organization,
        plan_version=1,
        passed=passed,
    )
    if at is not None:
        Assessment.objects.filter(pk=assessment.pk).update(created_at=at)  # auto_now_add
    return assessment
