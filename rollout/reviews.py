"""Stage reviews: judge a release's current stage on its rolled-up telemetry, open
incidents and tripwires, and store the verdict as an immutable ``Review``.

``evaluate`` is read-only and shared with the tripwire check and the console;
``create_review`` stores one review with its audit row. Reviews read rollups
(``monitoring.rollups``), never raw usage events, so a review costs the same at a
thousand events or a billion; the flagged samples kept for human review
(``monitoring.flags``), counted by status, for the confirmed flag rate; and the
fine-tuning of the stage (``tuning.telemetry``: datasets screened and held, jobs,
assessments), for the held dataset and failed assessment rates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from monitoring import audit
from monitoring.flags import SampleCounts, sample_counts
from monitoring.rollups import Totals, rollup_pending, stage_totals, window_totals
from rollout import criteria
from rollout.models import (
    Incident,
    IncidentStatus,
    Release,
    ReleaseState,
    Review,
    ReviewTrigger,
    StageTransition,
    TransitionKind,
)
from rollout.plan_schema import RolloutPlanDoc, StagePolicy
from rollout.plans import plan_doc
from stagegate.errors import Refused
from tuning.telemetry import FineTuningCounts, fine_tuning_counts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evaluation:
    """What a review says about a release's current stage, before it is stored."""

    release: Release
    doc: RolloutPlanDoc
    stage: StagePolicy
    next_stage: str | None
    totals: Totals
    samples: SampleCounts  # the flagged samples kept of the period, by status
    criteria: list[criteria.CriterionResult]
    tripwires: list[criteria.TripwireResult]
    recommendation: criteria.Recommendation
    summary: str
    now: datetime
    # Datasets, jobs and assessments of the stage's stint (tuning.telemetry).
    fine_tuning: FineTuningCounts = field(default_factory=FineTuningCounts)


def max_staleness() -> timedelta:
    return timedelta(seconds=settings.STAGEGATE_TELEMETRY_MAX_STALENESS)


def as_telemetry(
    totals: Totals,
    samples: SampleCounts | None = None,
    fine_tuning: FineTuningCounts | None = None,
) -> criteria.Telemetry:
    """The criteria's view of rolled-up totals: admitted traffic only; with the flagged
    samples' counts when the stage keeps samples (``samples``), else no confirmed
    count to judge; with the stage's fine-tuning counts (``fine_tuning``, none when
    absent)."""
    fine_tuning = fine_tuning or FineTuningCounts()
    return criteria.Telemetry(
        requests=totals.allowed,
        errors=totals.errors,
        flagged=totals.flagged,
        orgs_by_tier={tier: len(orgs) for tier, orgs in totals.orgs_by_tier.items()},
        distinct_orgs=totals.distinct_orgs,
        rolled_up_to=totals.rolled_up_to,
        flagged_by_category=totals.flagged_by_category,
        confirmed=None if samples is None else samples.confirmed_requests,
        pending=0 if samples is None else samples.pending_requests,
        datasets_screened=fine_tuning.datasets_screened,
        datasets_held=fine_tuning.datasets_held,
        datasets_rejected=fine_tuning.datasets_rejected,
        assessments=fine_tuning.assessments,
        assessments_failed=fine_tuning.assessments_failed,
    )


def keeps_samples(stage: StagePolicy) -> bool:
    """Whether the stage's plan keeps flagged samples for human review."""
    return stage.screening is not None and stage.screening.retain_flagged is not None


def stage_samples(release: Release, stage: StagePolicy, totals: Totals) -> SampleCounts:
    """The flagged samples of the stage's period as far as ``totals`` counted its
    requests (to its end, or to the rollups' freshness if that is earlier), so the
    confirmed requests never run ahead of the admitted ones."""
    until = totals.until
    if totals.rolled_up_to is not None:
        until = min(until, totals.rolled_up_to)
    return sample_counts(
        release=release.name, stage=stage.name, since=totals.since, until=max(until, totals.since)
    )


def totals_dict(
    totals: Totals,
    samples: SampleCounts | None = None,
    fine_tuning: FineTuningCounts | None = None,
) -> dict:
    """Totals as stored on a review (JSON-ready), with screening's flags by category,
    the flagged samples by status (``samples``: pending, confirmed, dismissed) and the
    stage's fine-tuning (``fine_tuning``: ``FineTuningCounts.as_dict``)."""
    return {
        "since": totals.since.isoformat(),
        "until": totals.until.isoformat(),
        "rolled_up_to": totals.rolled_up_to.isoformat() if totals.rolled_up_to else None,
        "requests": totals.requests,
        "allowed": totals.allowed,
        "denied": totals.denied,
        "errors": totals.errors,
        "flagged": totals.flagged,
        "prompt_tokens": totals.prompt_tokens,
        "completion_tokens": totals.completion_tokens,
        "distinct_orgs": totals.distinct_orgs,
        "orgs_by_tier": {tier: len(orgs) for tier, orgs in sorted(totals.orgs_by_tier.items())},
        "flagged_by_category": dict(totals.flagged_by_category),
        "denied_by_category": dict(totals.denied_by_category),
        "samples": (samples or SampleCounts()).as_dict(),
        "fine_tuning": (fine_tuning or FineTuningCounts()).as_dict(),
    }


def open_incidents(release: Release) -> list[criteria.Incident]:
    return [
        criteria.Incident(public_id=public_id, stage=stage, severity=severity)
        for public_id, stage, severity in Incident.objects.filter(
            release=release, status=IncidentStatus.OPEN
        ).values_list("public_id", "stage", "severity")
    ]


def armed_since(release: Release) -> datetime:
    """Since when the release has been serving its current stage: entering the stage,
    or the last resume after that. Rate tripwires count traffic from then on only, so a
    resumed release is not paused again at once for the traffic that paused it."""
    resumed = (
        StageTransition.objects.filter(
            release=release,
            kind=TransitionKind.RESUME,
            created_at__gte=release.stage_entered_at,
        )
        .order_by("-created_at")
        .values_list("created_at", flat=True)
        .first()
    )
    return max(release.stage_entered_at, resumed) if resumed else release.stage_entered_at


def check_tripwires(
    release: Release,
    stage: StagePolicy,
    *,
    incidents: list[criteria.Incident],
    now: datetime,
    incidents_only: bool = False,
) -> list[criteria.TripwireResult]:
    """Every tripwire of the stage judged now (rates over their own windows, from
    ``armed_since`` at the earliest), or only its incident tripwires, which read no
    telemetry."""
    results = []
    start = None
    for tripwire in stage.tripwires:
        window = None
        if tripwire.metric != "incident":
            if incidents_only:
                continue
            start = start or armed_since(release)
            totals = window_totals(
                release=release.name,
                stage=stage.name,
                minutes=tripwire.window_minutes,
                now=now,
                not_before=start,
            )
            window = as_telemetry(totals)
        results.append(
            criteria.evaluate_tripwire(
                tripwire,
                window=window,
                stage=stage.name,
                incidents=incidents,
                now=now,
                max_staleness=max_staleness(),
            )
        )
    return results


def evaluate(release: Release, *, now: datetime | None = None) -> Evaluation:
    """Judge ``release``'s current stage now. Reads only; stores nothing."""
    now = now or timezone.now()
    if release.active_plan is None:
        raise Refused("no_plan", f"{release.name} has no rollout plan")
    doc = plan_doc(release.active_plan)
    stage = doc.stage(release.current_stage)
    if stage is None:  # apply_plan refuses plans without the current stage
        raise Refused(
            "stage_not_in_plan", f"{release.name}'s plan has no stage {release.current_stage!r}"
        )
    next_stage = doc.next_stage(stage.name)
    totals = stage_totals(
        release=release.name, stage=stage.name, since=release.stage_entered_at, until=now
    )
    samples = stage_samples(release, stage, totals)
    # Read live, not rolled up: up to now, so a job screened this minute counts at once.
    fine_tuning = fine_tuning_counts(
        release=release.name, stage=stage.name, since=release.stage_entered_at, until=now
    )
    incidents = open_incidents(release)
    results: list[criteria.CriterionResult] = []
    if stage.exit_criteria is not None:
        results = criteria.evaluate_exit(
            stage.exit_criteria,
            telemetry=as_telemetry(totals, samples if keeps_samples(stage) else None, fine_tuning),
            stage=stage.name,
            stage_entered_at=release.stage_entered_at,
            now=now,
            incidents=incidents,
            approvals=0,  # collected after the review (rollout.transitions.approve)
            max_staleness=max_staleness(),
        )
    tripwires = check_tripwires(release, stage, incidents=incidents, now=now)
    recommendation, summary = criteria.recommend(
        results, tripwires, has_next_stage=next_stage is not None
    )
    return Evaluation(
        release=release,
        doc=doc,
        stage=stage,
        next_stage=next_stage,
        totals=totals,
        samples=samples,
        criteria=results,
        tripwires=tripwires,
        recommendation=recommendation,
        summary=summary,
        now=now,
        fine_tuning=fine_tuning,
    )


def create_review(
    release: Release,
    *,
    trigger: str,
    requested_by=None,
    now: datetime | None = None,
    roll_up: bool = True,
) -> Review:
    """Review ``release``'s current stage and store the result (immutable, audited).

    Rolls up pending usage first (unless ``roll_up`` is False) so the review sees
    the latest telemetry. A new review voids the approvals of every earlier one.
    """
    if roll_up:
        rollup_pending()
    with transaction.atomic():
        # The lock keeps the stage and plan from changing under the evaluation.
        release = (
            Release.objects.select_for_update(of=("self",))
            .select_related("active_plan")
            .get(pk=release.pk)
        )
        if release.state == ReleaseState.RETIRED:
            raise Refused("release_retired", f"{release.name} is retired; nothing to review")
        evaluation = evaluate(release, now=now)
        stage = evaluation.stage
        review = Review.objects.create(
            release=release,
            plan=release.active_plan,
            stage=stage.name,
            stage_entered_at=release.stage_entered_at,
            next_stage=evaluation.next_stage or "",
            recommendation=evaluation.recommendation.value,
            summary=evaluation.summary[:500],
            criteria=[result.as_dict() for result in evaluation.criteria],
            tripwires=[result.as_dict() for result in evaluation.tripwires],
            telemetry=totals_dict(evaluation.totals, evaluation.samples, evaluation.fine_tuning),
            approvals_needed=stage.exit_criteria.approvals_needed if stage.exit_criteria else 0,
            trigger=trigger,
            requested_by=requested_by if getattr(requested_by, "pk", None) else None,
            created_at=evaluation.now,
        )
        audit.record(
            "review.created",
            actor=requested_by or "system:reviews",
            object_type=audit.ObjectType.REVIEW,
            object_id=review.public_id,
            data={
                "release": release.name,
                "stage": review.stage,
                "plan_version": release.active_plan.version,
                "recommendation": review.recommendation,
                "summary": review.summary,
            },
        )
    return review


def review_releases(*, now: datetime | None = None) -> list[Review]:
    """The periodic review: one new review for every active release with a plan. A
    release that fails to review is logged and does not stop the others."""
    rollup_pending()
    reviews = []
    for release in Release.objects.filter(state=ReleaseState.ACTIVE, active_plan__isnull=False):
        try:
            reviews.append(
                create_review(release, trigger=ReviewTrigger.SCHEDULE, now=now, roll_up=False)
            )
        except Exception:
            log.exception("periodic review of %s failed", release.name)
    return reviews


def latest_review(release: Release) -> Review | None:
    return release.reviews.order_by("-created_at", "-id").first()
