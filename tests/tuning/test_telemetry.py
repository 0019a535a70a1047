"""Fine-tuning telemetry (``tuning.telemetry``): datasets screened, held and rejected,
jobs created and assessments of one release in one stage over a period, per (tier,
organization), in two queries.

Cast: atlas-2 in research_preview (the shared ``release``), northwind (research
partner), acme (verified commercial) and tartu (credentialed academic); atlas-mini
(tests/rollout/mini_cast.py) as the other release.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from access.models import Organization
from rollout.models import Release
from rollout.plans import apply_plan
from tests import factories
from tests.rollout.mini_cast import PLAN as MINI_PLAN
from tuning.models import Assessment, FineTuningJob
from tuning.telemetry import FineTuningCounts, TierOrgCounts, fine_tuning_counts

UNTIL = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
SINCE = UNTIL - timedelta(days=1)
INSIDE = SINCE + timedelta(hours=6)
BEFORE = SINCE - timedelta(hours=1)


def fine_tuning_job(release, org, *, created_at=INSIDE, **fields) -> FineTuningJob:
    return factories.fine_tuning_job(release, org, created_at=created_at, **fields)


def assess(job: FineTuningJob, *, passed: bool, at: datetime = INSIDE) -> Assessment:
    return factories.assess(job, passed=passed, at=at)


def counts(release: str = "atlas-2", stage: str = "research_preview") -> FineTuningCounts:
    return fine_tuning_counts(release=release, stage=stage, since=SINCE, until=UNTIL)


@pytest.fixture
def mini(db, ada) -> Release:
    apply_plan(MINI_PLAN, actor=ada)
    return Release.objects.get(name="atlas-mini")


@pytest.fixture
def fine_tuning(release, mini, northwind, acme, tartu) -> None:
    """northwind: four jobs created in the period, three of them screened (accept at the
    period's first instant, hold, reject), two assessments (one failed). acme: one job
    created before the period and held in it. tartu: a job made and screened before the
    period, assessed (passing) in it. Outside what atlas-2 in research_preview counts
    over the period: a job screened at its end, a failed assessment before it, jobs of
    another stage and of another release."""
    accepted = fine_tuning_job(release, northwind, created_at=SINCE, verdict="accept")
    fine_tuning_job(release, northwind, verdict="hold")
    fine_tuning_job(release, northwind, verdict="reject")
    fine_tuning_job(release, northwind)  # created, not screened yet
    assess(accepted, passed=True)
    assess(accepted, passed=False, at=UNTIL - timedelta(seconds=1))

    held_later = fine_tuning_job(
        release, acme, created_at=BEFORE, verdict="hold", screened_at=INSIDE
    )
    assess(held_later, passed=False, at=BEFORE)

    earlier = fine_tuning_job(release, tartu, created_at=BEFORE, verdict="accept")
    assess(earlier, passed=True)

    fine_tuning_job(release, acme, created_at=BEFORE, verdict="reject", screened_at=UNTIL)
    fine_tuning_job(release, acme, stage="commercial", verdict="hold")
    fine_tuning_job(mini, northwind, verdict="reject")


def row(org: Organization, **counted: int) -> TierOrgCounts:
    return TierOrgCounts(
        tier=org.tier, organization=org.public_id, organization_slug=org.slug, **counted
    )


def test_fine_tuning_counts_per_tier_and_organization(fine_tuning, northwind, acme, tartu):
    found = counts()

    assert found == FineTuningCounts(
        datasets_screened=4,
        datasets_held=2,
        datasets_rejected=1,
        jobs_created=4,
        assessments=3,
        assessments_failed=1,
        rows=(
            row(tartu, assessments=1),
            row(
                northwind,
                datasets_screened=3,
                datasets_held=1,
                datasets_rejected=1,
                jobs_created=4,
                assessments=2,
                assessments_failed=1,
            ),
            row(acme, datasets_screened=1, datasets_held=1),
        ),
    )
    assert list(found.by_tier_org) == [
        ("credentialed_academic", tartu.public_id),
        ("research_partner", northwind.public_id),
        ("verified_commercial", acme.public_id),
    ]


def test_fine_tuning_counts_of_another_stage_and_release(fine_tuning, acme, northwind):
    assert counts(stage="commercial") == FineTuningCounts(
        datasets_screened=1,
        datasets_held=1,
        jobs_created=1,
        rows=(row(acme, datasets_screened=1, datasets_held=1, jobs_created=1),),
    )
    assert counts(release="atlas-mini") == FineTuningCounts(
        datasets_screened=1,
        datasets_rejected=1,
        jobs_created=1,
        rows=(row(northwind, datasets_screened=1, datasets_rejected=1, jobs_created=1),),
    )


def test_fine_tuning_counts_without_fine_tuning_are_zero(release):
    assert counts() == FineTuningCounts()
    assert counts().as_dict() == {
        "datasets_screened": 0,
        "datasets_held": 0,
        "datasets_rejected": 0,
        "jobs_created": 0,
        "assessments": 0,
        "assessments_failed": 0,
        "by_tier_org": [],
    }


def test_fine_tuning_counts_as_dict_is_what_a_review_stores(fine_tuning, acme):
    stored = counts().as_dict()

    assert {key: value for key, value in stored.items() if key != "by_tier_org"} == {
        "datasets_screened": 4,
        "datasets_held": 2,
        "datasets_rejected": 1,
        "jobs_created": 4,
        "assessments": 3,
        "assessments_failed": 1,
    }
    assert stored["by_tier_org"][-1] == {
        "tier": "verified_commercial",
        "organization": acme.public_id,
        "organization_slug": "acme-commercial",
        "datasets_screened": 1,
        "datasets_held": 1,
        "datasets_rejected": 0,
        "jobs_created": 0,
        "assessments": 0,
        "assessments_failed": 0,
    }


def test_fine_tuning_counts_take_two_queries_whatever_the_jobs(
    fine_tuning, release, northwind, acme, tartu, django_assert_num_queries
):
    with django_assert_num_queries(2):
        before = counts()
    for org in (northwind, acme, tartu):
        for verdict in ("accept", "hold", "reject"):
            assess(fine_tuning_job(release, org, verdict=verdict), passed=verdict == "accept")

    with django_assert_num_queries(2):
        after = counts()

    assert (after.datasets_screened, after.jobs_created, after.assessments) == (
        before.datasets_screened + 9,
        before.jobs_created + 9,
        before.assessments + 9,
    )
    assert after.assessments_failed == before.assessments_failed + 6
