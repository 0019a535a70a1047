"""Fine-tuning telemetry: files screened, jobs, dataset verdicts and assessments of one
release in one stage over a period, per (tier, organization) and in total.

Stage reviews judge ``max_held_dataset_rate`` and ``max_failed_assessment_rate`` on these
counts (``rollout.reviews``) and store them with the review; the console shows them.
Read straight from the jobs and assessments (two aggregate queries, whatever the
number of jobs), not from rollups: a stage sees few of them.

Imports nothing but ``tuning.models``: rollout reads this module, never the reverse.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from datetime import datetime

from django.db.models import Count, Q

from tuning.models import (
    Assessment,
    DatasetVerdict,
    FineTuningJob,
    JobStatus,
    ReviewStatus,
    TunedModel,
    TunedModelStatus,
)

_SCREENED = ("datasets_screened", "datasets_held", "datasets_rejected", "jobs_created")
_ASSESSED = ("assessments", "assessments_failed")


@dataclass(frozen=True)
class TierOrgCounts:
    """The counts of one (tier, organization), as ``FineTuningCounts`` defines them;
    ``organization`` is the organization's public id, ``organization_slug`` its slug."""

    tier: str
    organization: str
    organization_slug: str
    datasets_screened: int = 0
    datasets_held: int = 0
    datasets_rejected: int = 0
    jobs_created: int = 0
    assessments: int = 0
    assessments_failed: int = 0


@dataclass(frozen=True)
class FineTuningCounts:
    """Fine-tuning of one release in one stage over [since, until).

    ``datasets_screened`` counts the jobs whose training file was screened in the period
    (by ``screened_at``), ``datasets_held`` and ``datasets_rejected`` those of them whose
    verdict was ``hold`` or ``reject`` (a held dataset reviewers released later still
    counts as held: the rate is about what screening found). ``jobs_created`` counts
    jobs created in the period, ``assessments`` the assessment runs of tuned models made
    in it and ``assessments_failed`` those that failed. A job counts under the stage,
    tier and organization it records. ``rows`` holds the same counts per (tier,
    organization), sorted by tier then slug; a pair with nothing in the period is absent.
    """

    datasets_screened: int = 0
    datasets_held: int = 0
    datasets_rejected: int = 0
    jobs_created: int = 0
    assessments: int = 0
    assessments_failed: int = 0
    rows: tuple[TierOrgCounts, ...] = field(default=())

    @property
    def by_tier_org(self) -> dict[tuple[str, str], TierOrgCounts]:
        """``rows`` keyed by (tier, organization public id)."""
        return {(row.tier, row.organization): row for row in self.rows}

    def as_dict(self) -> dict:
        """JSON-ready, as a review stores it: the totals and ``by_tier_org``, a list of
        the rows as dicts."""
        totals = {name: getattr(self, name) for name in (*_SCREENED, *_ASSESSED)}
        return totals | {"by_tier_org": [asdict(row) for row in self.rows]}


def fine_tuning_counts(
    *, release: str, stage: str, since: datetime, until: datetime
) -> FineTuningCounts:
    """The fine-tuning of ``release`` (its name) in ``stage`` over [since, until), as
    ``FineTuningCounts`` defines it. Two queries."""
    created = Q(created_at__gte=since, created_at__lt=until)
    screened = Q(screened_at__gte=since, screened_at__lt=until)
    key = ("tier", "organization__public_id", "organization__slug")
    jobs = (
        FineTuningJob.objects.filter(release__name=release, stage=stage)
        .filter(created | screened)
        .values(*key)
        .order_by()
        .annotate(
            datasets_screened=Count("id", filter=screened),
            datasets_held=Count("id", filter=screened & Q(verdict=DatasetVerdict.HOLD)),
            datasets_rejected=Count("id", filter=screened & Q(verdict=DatasetVerdict.REJECT)),
            jobs_created=Count("id", filter=created),
        )
    )
    assessments = (
        Assessment.objects.filter(release__name=release, stage=stage)
        .filter(created)
        .values(*key)
        .order_by()
        .annotate(assessments=Count("id"), assessments_failed=Count("id", filter=Q(passed=False)))
    )
    merged: dict[tuple[str, str, str], dict[str, int]] = {}
    for names, group in ((_SCREENED, jobs), (_ASSESSED, assessments)):
        for row in group:
            counts = merged.setdefault(tuple(row[part] for part in key), {})
            counts.update({name: row[name] for name in names})
    rows = tuple(
        TierOrgCounts(tier=tier, organization=public_id, organization_slug=slug, **counts)
        for (tier, public_id, slug), counts in sorted(
            merged.items(), key=lambda item: (item[0][0], item[0][2])
        )
    )
    totals = {
        counter.name: sum(getattr(row, counter.name) for row in rows)
        for counter in fields(FineTuningCounts)
        if counter.name != "rows"
    }
    return FineTuningCounts(**totals, rows=rows)


def jobs_by_status() -> dict[tuple[str, str], int]:
    """Every release's fine-tuning jobs by status, for the metrics: (release, status)
    -> jobs (one query)."""
    return {
        (row["release__name"], row["status"]): row["n"]
        for row in FineTuningJob.objects.values("release__name", "status")
        .order_by()
        .annotate(n=Count("id"))
    }


def awaiting_review() -> dict[tuple[str, str], int]:
    """What waits for reviewers, per release: (release, "dataset" | "model") -> count
    (two queries)."""
    datasets = (
        FineTuningJob.objects.filter(
            dataset_review=ReviewStatus.PENDING, status=JobStatus.VALIDATING_FILES
        )
        .values("release__name")
        .order_by()
        .annotate(n=Count("id"))
    )
    models = (
        TunedModel.objects.filter(status=TunedModelStatus.HELD)
        .values("parent__name")
        .order_by()
        .annotate(n=Count("id"))
    )
    found = {(row["release__name"], "dataset"): row["n"] for row in datasets}
    found.update({(row["parent__name"], "model"): row["n"] for row in models})
    return found
