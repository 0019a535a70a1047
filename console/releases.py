"""What the release page shows, assembled from the services and selectors: exit
criteria with their progress and the 95% upper bound in words, one tile per
tripwire, and the charts of the chosen range, all from rollups (never raw events).

Every function here does a fixed number of queries, whatever the traffic or the
length of the release's history.
"""

from __future__ import annotations

import difflib
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.utils.safestring import SafeString

from console.charts import Series, Threshold, bar_chart, line_chart, nice_ceiling
from monitoring.flags import SampleCounts
from monitoring.rollups import window_totals
from monitoring.series import (
    DAY,
    HOUR,
    Bucket,
    flags_per_bucket,
    refusals_by_reason,
    regroup,
    totals_per_bucket,
)
from rollout.criteria import CriterionResult, TripwireResult, wilson_upper_bound
from rollout.models import Recommendation, Release, RolloutPlan
from rollout.plan_schema import StagePolicy, Tripwire, canonical_yaml
from rollout.plans import plan_doc
from rollout.reviews import Evaluation, armed_since
from rollout.transitions import counted_approvals, stale_reason

# ?range=: what the charts span. Unknown values fall back to the default.
RANGES = {"24h": timedelta(days=1), "7d": timedelta(days=7), "30d": timedelta(days=30)}
STINT = "stint"
DEFAULT_RANGE = "7d"
RANGE_CHOICES = (STINT, *RANGES)
MAX_STINT_SPAN = timedelta(days=90)  # a stint's charts read at most this much history

_METRIC_NOUNS = {
    "error_rate": ("error", "errors"),
    "flag_rate": ("flagged", "flagged"),
    "confirmed_flag_rate": ("confirmed", "confirmed"),
}
_LABELS = {
    "min_days_in_stage": "days in stage",
    "min_requests": "admitted requests",
    "min_distinct_orgs": "distinct organizations",
    "max_flag_rate": "flag rate",
    "max_error_rate": "error rate",
    "max_confirmed_flag_rate": "confirmed flag rate",
    "max_held_dataset_rate": "held dataset rate",
    "max_failed_assessment_rate": "failed assessment rate",
    "no_open_incident": "no open incident",
    "approvals": "approvals",
}


def percent(rate: float) -> str:
    """0.02 -> 2%, 0.0025 -> 0.25%, 0.00004 -> 0.004%: as people write a rate."""
    value = rate * 100
    if 0 < value < 0.01:
        return f"{value:.2g}%"
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{text}%"


def _count(number: int, one: str, many: str) -> str:
    return f"{number:,} {one if number == 1 else many}"


def rate_in_words(*, events: int, trials: int, maximum: float, metric: str) -> str:
    """The 95% upper bound of ``events / trials`` against ``maximum``, in one sentence:
    "3 errors in 1,200 requests: observed 0.25%; with 95% confidence the true rate is
    below 0.61%, which is under the 2% maximum"."""
    one, many = _METRIC_NOUNS.get(metric, ("event", "events"))
    bound = wilson_upper_bound(events, trials)
    if trials == 0:
        return (
            f"no admitted requests yet: nothing is known, so the 95% upper bound is 100%,"
            f" which is above the {percent(maximum)} maximum"
        )
    side = "under" if bound < maximum else ("at" if bound == maximum else "above")
    return (
        f"{_count(events, one, many)} in {_count(trials, 'request', 'requests')}:"
        f" observed {percent(events / trials)}; with 95% confidence the true rate is below"
        f" {percent(bound)}, which is {side} the {percent(maximum)} maximum"
    )


# --- exit criteria ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CriterionRow:
    name: str
    label: str
    observed: str
    threshold: str
    passed: bool
    explanation: str  # the review's own line
    words: str  # the rate's 95% bound explained, or ""
    progress: float | None  # observed, for a <progress> up to ``goal``; None: no bar
    goal: float | None
    to_go: str  # "1,200 to go", or ""


def _label(name: str) -> str:
    if name.startswith("min_distinct_orgs:"):
        return f"distinct {name.split(':', 1)[1]} organizations"
    if name.startswith("max_flag_rate:"):
        return f"{name.split(':', 1)[1]} flag rate"
    return _LABELS.get(name, name)


def _rate_events(name: str, totals, samples: SampleCounts) -> tuple[int, int, str]:
    """What a rate criterion counts: (events, trials, metric) from the evaluation."""
    if name == "max_error_rate":
        return totals.errors, totals.allowed, "error_rate"
    if name == "max_flag_rate":
        return totals.flagged, totals.allowed, "flag_rate"
    if name == "max_confirmed_flag_rate":
        confirmed = samples.confirmed_requests
        return confirmed, max(totals.allowed, confirmed), "confirmed_flag_rate"
    category = name.split(":", 1)[1]
    return totals.flagged_by_category.get(category, 0), totals.allowed, "flag_rate"


def _number(value: float | int | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.2f}"
    return f"{int(value):,}"


def criterion_rows(evaluation: Evaluation, *, approvals: int | None) -> list[CriterionRow]:
    """The stage's exit criteria as rows, with the rate bounds in words and progress
    bars for the minimums. ``approvals``: counted approvals of the standing review, if
    any (the evaluation itself never counts them)."""
    rows = []
    for result in evaluation.criteria:
        rows.append(_criterion_row(result, evaluation, approvals))
    return rows


OBSERVED_RATES = frozenset({"max_held_dataset_rate", "max_failed_assessment_rate"})


def _criterion_row(
    result: CriterionResult, evaluation: Evaluation, approvals: int | None
) -> CriterionRow:
    name, observed, threshold = result.name, result.observed, result.threshold
    words, progress, goal, to_go = "", None, None, ""
    explanation = result.explanation
    passed = result.passed
    if name.startswith("max_"):  # every max_ criterion is a rate
        shown, limit = (percent(observed) if observed is not None else "—"), percent(threshold)
        # The fine-tuning rates are judged as observed, not by a bound: the review's own
        # explanation says it all (rollout.criteria).
        if observed is not None and name not in OBSERVED_RATES:
            events, trials, metric = _rate_events(name, evaluation.totals, evaluation.samples)
            words = rate_in_words(events=events, trials=trials, maximum=threshold, metric=metric)
        return CriterionRow(
            name,
            _label(name),
            shown,
            f"at most {limit}",
            passed,
            explanation,
            words,
            None,
            None,
            "",
        )
    if name == "no_open_incident":
        return CriterionRow(
            name,
            f"no open incident at or above {threshold}",
            _number(observed),
            "0",
            passed,
            explanation,
            "",
            None,
            None,
            "",
        )
    if name == "approvals":
        observed = approvals or 0
        passed = observed >= threshold
        explanation = (
            f"{observed} of {threshold} approvals from distinct reviewers on the standing review"
            if approvals is not None
            else f"{threshold} approvals are collected once a review recommends advance"
        )
    if observed is not None and isinstance(threshold, int | float):
        goal = float(threshold)
        progress = min(float(observed), goal)
        missing = goal - float(observed)
        if missing > 0:
            to_go = (
                f"{missing:,.2f} days to go"
                if name == "min_days_in_stage"
                else f"{missing:,.0f} to go"
            )
    return CriterionRow(
        name,
        _label(name),
        _number(observed),
        f"at least {_number(threshold)}",
        passed,
        explanation,
        words,
        progress,
        goal,
        to_go,
    )


def standing_approvals(release: Release) -> int | None:
    """Counted approvals of the release's latest review, when it recommends advance and
    still stands (same stint, plan and state); None otherwise."""
    review = release.reviews.order_by("-created_at", "-id").first()
    if review is None or review.recommendation != Recommendation.ADVANCE:
        return None
    if stale_reason(review, release) is not None:
        return None
    return len(counted_approvals(review))


# --- charts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChartRange:
    code: str
    since: datetime
    until: datetime
    step: timedelta

    @property
    def label(self) -> str:
        return "this stint" if self.code == STINT else f"the last {self.code}"


def chart_range(code: str | None, release: Release, now: datetime) -> ChartRange:
    """The range ``?range=`` asks for; anything unknown is the default (7 days)."""
    if code not in RANGE_CHOICES:
        code = DEFAULT_RANGE
    if code == STINT:
        since = max(release.stage_entered_at, now - MAX_STINT_SPAN)
    else:
        since = now - RANGES[code]
    step = HOUR if now - since <= timedelta(days=8) else DAY
    return ChartRange(code, since, now, step)


def _points(buckets, value) -> list[tuple[datetime, float]]:
    return [(bucket.start, value(bucket)) for bucket in buckets]


def _rate_chart(title: str, buckets, metric: str, maximum: float | None, label: str) -> SafeString:
    """Rate per bucket, and its cumulative 95% upper bound, against ``maximum``."""
    events_of = (lambda b: b.errors) if metric == "error_rate" else (lambda b: b.flagged)
    point, bound = [], []
    events = trials = 0
    for bucket in buckets:
        if not bucket.allowed:
            continue
        events += events_of(bucket)
        trials += bucket.allowed
        point.append((bucket.start, events_of(bucket) / bucket.allowed))
        bound.append((bucket.start, wilson_upper_bound(events, trials)))
    peak = max([rate for _, rate in point] + [(maximum or 0) * 2.5, 0.001])
    threshold = Threshold(maximum, label) if maximum is not None else None
    return line_chart(
        title=title,
        series=[
            Series(f"{_LABELS['max_' + metric]} per bucket", point),
            Series("95% upper bound, cumulative", bound, css="bound"),
        ],
        y_unit="%",
        threshold=threshold,
        y_max=nice_ceiling(min(1.0, peak * 1.1)),
        empty_message="No admitted requests in this range yet.",
    )


TOP_REASONS = 5  # refusal reasons drawn on their own; the rest are "other"
OTHER_REASONS = "other"
UNRECORDED_REASON = "reason not recorded"  # refusals rolled up before reasons were kept


def refusal_series(by_reason: dict[datetime, Counter[str]]) -> list[Series]:
    """One series per refusal reason, the ``TOP_REASONS`` most frequent of the range
    first (ties by name), then one "other" for the rest."""
    totals: Counter[str] = Counter()
    for counts in by_reason.values():
        totals.update(counts)
    ranked = sorted(totals, key=lambda reason: (-totals[reason], reason))
    top, rest = ranked[:TOP_REASONS], set(ranked[TOP_REASONS:])
    series = [
        Series(
            reason or UNRECORDED_REASON,
            [(start, counts[reason]) for start, counts in by_reason.items() if counts[reason]],
        )
        for reason in top
    ]
    if rest:
        others = [
            (start, sum(counts[reason] for reason in rest)) for start, counts in by_reason.items()
        ]
        series.append(Series(OTHER_REASONS, [(start, n) for start, n in others if n]))
    return series


@dataclass(frozen=True)
class Charts:
    requests_by_tier: SafeString
    admitted_refused: SafeString
    error_rate: SafeString
    flag_rate: SafeString
    tokens: SafeString


def release_charts(stage: StagePolicy, span: ChartRange, usage: list[Bucket]) -> Charts:
    """The page's charts from ``usage`` (``monitoring.series.hourly_usage`` rows of
    the range): every stage for volumes, the current stage for rates."""
    grouped = regroup(usage, step=span.step)
    totals = totals_per_bucket(grouped)
    tiers = sorted({tier for by_tier in grouped.values() for tier in by_tier})
    by_tier = [
        Series(
            tier or "(none)",
            [(start, by[tier].requests) for start, by in grouped.items() if tier in by],
        )
        for tier in tiers
    ]
    seconds = int(span.step.total_seconds())
    stage_buckets = totals_per_bucket(regroup(usage, step=span.step, stage=stage.name))
    exit_criteria = stage.exit_criteria
    return Charts(
        requests_by_tier=bar_chart(
            title=f"Requests by tier, {span.label}",
            series=by_tier,
            bucket_seconds=seconds,
        ),
        admitted_refused=bar_chart(
            title=f"Admitted vs refused by reason, {span.label}",
            series=[
                Series("admitted", _points(totals, lambda b: b.allowed)),
                *refusal_series(refusals_by_reason(usage, step=span.step)),
            ],
            bucket_seconds=seconds,
        ),
        error_rate=_rate_chart(
            f"Error rate in {stage.name}, {span.label}",
            stage_buckets,
            "error_rate",
            exit_criteria.max_error_rate if exit_criteria else None,
            "max error rate",
        ),
        flag_rate=_rate_chart(
            f"Flag rate in {stage.name}, {span.label}",
            stage_buckets,
            "flag_rate",
            exit_criteria.max_flag_rate if exit_criteria else None,
            "max flag rate",
        ),
        tokens=bar_chart(
            title=f"Tokens, {span.label}",
            series=[
                Series("prompt tokens", _points(totals, lambda b: b.prompt_tokens)),
                Series("completion tokens", _points(totals, lambda b: b.completion_tokens)),
            ],
            bucket_seconds=seconds,
        ),
    )


# --- tripwires -------------------------------------------------------------------------------

FIRED, CANNOT_JUDGE, NOT_ENOUGH, ARMED = "fired", "cannot judge", "not enough traffic yet", "armed"


@dataclass(frozen=True)
class TripwireTile:
    tripwire: Tripwire
    result: TripwireResult
    state: str  # FIRED, CANNOT_JUDGE, NOT_ENOUGH or ARMED
    sample: int | None  # admitted requests in the window (rate tripwires)
    summary: str
    chart: SafeString | None


def tripwire_tiles(
    release: Release, evaluation: Evaluation, span: ChartRange, usage: list[Bucket]
) -> list[TripwireTile]:
    """One tile per tripwire of the current stage: its state now, the window's sample
    and, for rate tripwires, the hourly rate of the range against its threshold."""
    stage = evaluation.stage
    stage_buckets = totals_per_bucket(regroup(usage, step=span.step, stage=stage.name))
    tiles = []
    start = None
    for tripwire, result in zip(stage.tripwires, evaluation.tripwires, strict=True):
        if tripwire.metric == "incident":
            state = FIRED if result.fired else ARMED
            tiles.append(TripwireTile(tripwire, result, state, None, result.explanation, None))
            continue
        start = start or armed_since(release)
        window = window_totals(
            release=release.name,
            stage=stage.name,
            minutes=tripwire.window_minutes,
            now=evaluation.now,
            not_before=start,
        )
        sample = window.allowed
        if result.fired:
            state, summary = FIRED, result.explanation
        elif result.observed is None:
            state, summary = CANNOT_JUDGE, result.explanation
        elif sample < tripwire.min_requests:
            state = NOT_ENOUGH
            summary = (
                f"{sample:,} of the {tripwire.min_requests:,} admitted requests it needs in"
                f" the last {tripwire.window_minutes} min: it cannot fire until there are"
                " enough"
            )
            if start > evaluation.now - timedelta(minutes=tripwire.window_minutes):
                summary += f" (it counts from {start:%Y-%m-%d %H:%M} UTC, when it was armed)"
        else:
            state, summary = ARMED, result.explanation
        label = _LABELS["max_" + tripwire.metric]
        if tripwire.category is not None:  # that category's flags, from its own rollup
            label = f"{tripwire.category} {label}"
            flags = flags_per_bucket(
                release=release.name,
                stage=stage.name,
                category=tripwire.category,
                since=span.since,
                until=span.until,
                step=span.step,
            )

            def events_of(bucket, flags=flags):
                return flags.get(bucket.start, 0)

        elif tripwire.metric == "error_rate":

            def events_of(bucket):
                return bucket.errors

        else:

            def events_of(bucket):
                return bucket.flagged

        points = [(b.start, events_of(b) / b.allowed) for b in stage_buckets if b.allowed]
        peak = max([rate for _, rate in points] + [tripwire.threshold * 1.5])
        chart = line_chart(
            title=f"{tripwire.name}: {label}, {span.label}",
            series=[Series(f"{label} per bucket", points)],
            y_unit="%",
            threshold=Threshold(tripwire.threshold, f"{tripwire.name} threshold"),
            y_max=nice_ceiling(min(1.0, peak * 1.1)),
            empty_message="No admitted requests in this range yet.",
            width=420,
            height=180,
        )
        tiles.append(TripwireTile(tripwire, result, state, sample, summary, chart))
    return tiles


# --- screening -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CategoryRow:
    category: str
    flagged: int  # admitted requests flagged (or routed) in the category
    denied: int  # refused requests carrying it (blocked)
    rate: str  # flagged over admitted requests, in words ("0.25%"), "—" without traffic
    maximum: str  # the stage's max_flag_rate_by_category for it, or ""


@dataclass(frozen=True)
class ScreeningSummary:
    categories: list[CategoryRow]
    samples: SampleCounts
    retain_days: int | None  # None: the stage keeps no samples


def screening_summary(evaluation: Evaluation) -> ScreeningSummary | None:
    """The current stage's flags by category (every category the stage screens for,
    and any other that flagged or blocked a request) and its kept samples by status;
    None when the stage does not screen and nothing was flagged in it."""
    stage, totals, samples = evaluation.stage, evaluation.totals, evaluation.samples
    screening = stage.screening
    limits = stage.exit_criteria.max_flag_rate_by_category if stage.exit_criteria else {}
    names = {*totals.flagged_by_category, *totals.denied_by_category, *limits}
    if screening is not None:
        names |= set(screening.categories)
    if screening is None and not names and samples == SampleCounts():
        return None
    rows = []
    for name in sorted(names):
        flagged = totals.flagged_by_category.get(name, 0)
        rows.append(
            CategoryRow(
                name,
                flagged,
                totals.denied_by_category.get(name, 0),
                percent(flagged / totals.allowed) if totals.allowed else "—",
                percent(limits[name]) if name in limits else "",
            )
        )
    retain = screening.retain_flagged if screening is not None else None
    return ScreeningSummary(rows, samples, retain.days if retain is not None else None)


# --- plan versions ---------------------------------------------------------------------------


def plan_diff(older: RolloutPlan, newer: RolloutPlan) -> str:
    """The unified diff between two versions' canonical YAML (what ``export_plan``
    prints), labelled by version."""
    before = canonical_yaml(plan_doc(older)).splitlines(keepends=True)
    after = canonical_yaml(plan_doc(newer)).splitlines(keepends=True)
    name = older.release.name
    return "".join(
        difflib.unified_diff(
            before, after, fromfile=f"{name} v{older.version}", tofile=f"{name} v{newer.version}"
        )
    )


def diff_lines(diff: str) -> list[tuple[str, str]]:
    """(css class, line) pairs for showing a unified diff: add, del, hunk or ""."""
    lines = []
    for line in diff.splitlines():
        if line.startswith(("+++", "---")):
            css = "file"
        elif line.startswith("+"):
            css = "add"
        elif line.startswith("-"):
            css = "del"
        elif line.startswith("@@"):
            css = "hunk"
        else:
            css = ""
        lines.append((css, line))
    return lines
