"""Judging a release's current stage: exit criteria, tripwires and the recommendation.

Pure Python (no Django, no database): the caller rolls telemetry up and loads the open
incidents, and this module turns that plain data plus the plan's ``ExitCriteria`` and
``Tripwire`` into one result per criterion or tripwire, each with a one-line explanation
for the console, and a recommendation to advance, hold or roll back.

Two rules carry the safety of the whole thing:

- **Missing or stale telemetry never passes.** A review must not advance a release on
  numbers that stopped updating; a rate tripwire must not fire on them either, so it
  reports that it cannot judge instead.
- **Rates are judged by their 95% Wilson upper bound**, not the raw ratio, so that a few
  clean requests cannot pass ``max_error_rate`` or ``max_flag_rate`` by luck. Tripwires,
  which act without a human, use the point rate over their window and a minimum volume,
  as the plan schema documents.
- **Fine-tuning rates are the exception: judged by the observed rate.** A stage sees a
  handful of training datasets and tuned models; a bound over so few would forbid
  advancing after any clean run a stage is likely to see (five clean datasets still
  bound the held rate at 43%), and every held dataset and failed tuned model is itself
  in front of reviewers already.

All datetimes must be timezone-aware; a naive one is a ``ValueError``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from rollout.plan_schema import SEVERITIES, ExitCriteria, Tripwire, severity_at_least
from rollout.stats import Z_95, wilson_upper_bound  # noqa: F401 - also read from here

NO_TELEMETRY = "no telemetry rolled up yet"

_DAY_HUNDREDTH = timedelta(days=1) / 100  # 14.4 minutes, the resolution of "days in stage"
_RATE_LABELS = {"flag_rate": "flag rate", "error_rate": "error rate"}


# --- inputs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Telemetry:
    """Rolled-up usage of one release in one stage over a window.

    ``requests`` counts admitted requests; ``errors`` and ``flagged`` are subsets of them,
    so each lies in ``0..requests``. ``flagged`` counts requests flagged by anything
    (screening, or the upstream's content filter); ``flagged_by_category`` counts, per
    screening category, the admitted requests flagged (or routed) in it, each in
    ``0..requests`` (a request flagged in two categories counts in both; a category
    absent counts 0). ``orgs_by_tier`` counts distinct orgs with at least one admitted
    request, per tier (a tier that is absent counts 0), and ``distinct_orgs`` the same
    over all tiers. Rollups are complete up to ``rolled_up_to`` (timezone-aware), or
    ``None`` when nothing has been rolled up yet.

    Human review of flags (``monitoring.flags``): ``confirmed`` counts the admitted
    requests whose retained sample a reviewer confirmed, ``pending`` those whose
    sample awaits a decision; ``confirmed`` is ``None`` when the stage keeps no samples
    (``screening.retain_flagged`` off), so there is nothing to judge. Inconsistent
    numbers are a ``ValueError`` here rather than a wrong verdict later.

    Fine-tuning in the stage (``tuning.telemetry``): ``datasets_screened`` counts the
    training datasets screened, ``datasets_held`` and ``datasets_rejected`` those whose
    verdict was hold or reject (together at most ``datasets_screened``);
    ``assessments`` counts the assessments of tuned models and ``assessments_failed``
    those that failed (at most ``assessments``). All default to 0, a stage without
    fine-tuning.
    """

    requests: int
    errors: int
    flagged: int
    orgs_by_tier: Mapping[str, int]
    distinct_orgs: int
    rolled_up_to: datetime | None
    flagged_by_category: Mapping[str, int] = field(default_factory=dict)
    confirmed: int | None = None
    pending: int = 0
    datasets_screened: int = 0
    datasets_held: int = 0
    datasets_rejected: int = 0
    assessments: int = 0
    assessments_failed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "requests",
            "errors",
            "flagged",
            "distinct_orgs",
            "pending",
            "datasets_screened",
            "datasets_held",
            "datasets_rejected",
            "assessments",
            "assessments_failed",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"Telemetry.{name} must be >= 0, got {getattr(self, name)}")
        if self.confirmed is not None and self.confirmed < 0:
            raise ValueError(f"Telemetry.confirmed must be >= 0, got {self.confirmed}")
        if self.errors > self.requests:
            raise ValueError(f"Telemetry.errors ({self.errors}) exceeds requests ({self.requests})")
        if self.flagged > self.requests:
            raise ValueError(
                f"Telemetry.flagged ({self.flagged}) exceeds requests ({self.requests})"
            )
        if self.datasets_held + self.datasets_rejected > self.datasets_screened:
            raise ValueError(
                f"Telemetry.datasets_held ({self.datasets_held}) plus datasets_rejected"
                f" ({self.datasets_rejected}) exceed datasets_screened ({self.datasets_screened})"
            )
        if self.assessments_failed > self.assessments:
            raise ValueError(
                f"Telemetry.assessments_failed ({self.assessments_failed}) exceeds"
                f" assessments ({self.assessments})"
            )
        for tier, count in self.orgs_by_tier.items():
            if count < 0:
                raise ValueError(f"Telemetry.orgs_by_tier[{tier!r}] must be >= 0, got {count}")
        for category, count in self.flagged_by_category.items():
            if not 0 <= count <= self.requests:
                raise ValueError(
                    f"Telemetry.flagged_by_category[{category!r}] must lie in"
                    f" 0..requests ({self.requests}), got {count}"
                )
        if self.rolled_up_to is not None:
            _require_aware("Telemetry.rolled_up_to", self.rolled_up_to)
        # A frozen dataclass should not change under the caller's later edits of the dict. A
        # plain dict (not a MappingProxyType) so that dataclasses.asdict and copy still work.
        object.__setattr__(self, "orgs_by_tier", dict(self.orgs_by_tier))
        object.__setattr__(self, "flagged_by_category", dict(self.flagged_by_category))


@dataclass(frozen=True)
class Incident:
    """An open incident of the release, opened against ``stage``.

    ``severity`` is one of ``plan_schema.SEVERITIES``; anything else is a ``ValueError``.
    """

    public_id: str
    stage: str
    severity: str

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(
                f"Incident.severity must be one of {', '.join(SEVERITIES)}, got {self.severity!r}"
            )


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CriterionResult:
    """The verdict on one exit criterion.

    ``name`` is a stable code (see ``evaluate_exit``); ``observed`` is ``None`` when the
    telemetry it needs is missing or stale; ``threshold`` is the plan's value (a severity
    name for ``no_open_incident``); ``explanation`` is one line for people.
    """

    name: str
    observed: float | int | None
    threshold: float | int | str
    passed: bool
    explanation: str

    def as_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data, keys in field order."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TripwireResult:
    """The verdict on one tripwire: ``name``, ``metric`` and ``action`` come from the plan.

    ``observed`` is the point rate over the window (rate tripwires, ``None`` when the
    telemetry is missing or stale) or the count of matching open incidents (``incident``);
    ``threshold`` is the rate or the severity name. ``explanation`` is one line.
    """

    name: str
    metric: str
    action: str
    fired: bool
    observed: float | int | None
    threshold: float | str
    explanation: str

    def as_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data, keys in field order."""
        return dataclasses.asdict(self)


class Recommendation(StrEnum):
    """What a review recommends for the release in its current stage."""

    ADVANCE = "advance"
    HOLD = "hold"
    ROLLBACK = "rollback"


# --- statistics and freshness -------------------------------------------------------------


def telemetry_is_fresh(
    telemetry: Telemetry | None, *, now: datetime, max_staleness: timedelta
) -> bool:
    """True when ``telemetry`` exists and was rolled up at most ``max_staleness`` before ``now``.

    ``None`` telemetry, or telemetry never rolled up, is not fresh. Telemetry rolled up
    "after" ``now`` (clock skew between hosts) counts as fresh. Raises ``ValueError`` for a
    naive ``now`` or a negative ``max_staleness``.
    """
    return _telemetry_problem(telemetry, now=now, max_staleness=max_staleness) is None


def _telemetry_problem(
    telemetry: Telemetry | None, *, now: datetime, max_staleness: timedelta
) -> str | None:
    """Why ``telemetry`` cannot be judged, as one line, or ``None`` when it is fresh."""
    _require_aware("now", now)
    if max_staleness < timedelta(0):
        raise ValueError(f"max_staleness must not be negative, got {max_staleness}")
    if telemetry is None or telemetry.rolled_up_to is None:
        return NO_TELEMETRY
    behind = now - telemetry.rolled_up_to
    if behind <= max_staleness:
        return None
    # Rounded up, so a stale rollup never reads as "N min behind" with N within the limit.
    minutes = -(-behind // timedelta(minutes=1))
    rolled_up_to = telemetry.rolled_up_to.astimezone(UTC).isoformat(timespec="seconds")
    return f"telemetry is stale: rolled up to {rolled_up_to}, {minutes} min behind"


# --- exit criteria ------------------------------------------------------------------------


def evaluate_exit(
    criteria: ExitCriteria,
    *,
    telemetry: Telemetry | None,
    stage: str,
    stage_entered_at: datetime,
    now: datetime,
    incidents: Sequence[Incident],
    approvals: int,
    max_staleness: timedelta,
) -> list[CriterionResult]:
    """Judge the current ``stage`` against its exit ``criteria``: one result per criterion.

    Results come in this order, with these names: ``min_days_in_stage``,
    ``min_requests``, ``min_distinct_orgs``, one ``min_distinct_orgs:<tier>`` per entry of
    ``min_distinct_orgs_per_tier`` (in ``TIERS`` order), ``max_flag_rate``, one
    ``max_flag_rate:<category>`` per entry of ``max_flag_rate_by_category`` (sorted),
    ``max_error_rate``, ``max_confirmed_flag_rate``, ``max_held_dataset_rate``,
    ``max_failed_assessment_rate`` (each of these three when the plan sets it),
    ``no_open_incident``, ``approvals``.

    - Days in stage are observed truncated to hundredths of a day and pass when that value
      reaches the minimum, so the criterion never passes before the time is up.
    - Rates pass when the 95% Wilson upper bound of the observed rate is at most the
      maximum; zero requests give a bound of 1.0. A category's flag rate is its flagged
      requests over all admitted requests.
    - ``max_confirmed_flag_rate`` judges the requests a reviewer confirmed over the
      admitted requests. It fails while a flagged request of the period still awaits a
      reviewer's decision (unreviewed evidence does not pass, as missing telemetry does
      not), and when the stage keeps no samples to review (``telemetry.confirmed`` None).
    - ``max_held_dataset_rate`` judges the datasets screening held or rejected over the
      datasets screened, ``max_failed_assessment_rate`` the failed assessments over the
      assessments: by the observed rate, not a bound (module docstring), passing at or
      below the maximum. With nothing screened (or assessed) in the stage they pass,
      with ``observed`` 0.0, and say so.
    - ``no_open_incident`` fails when an incident of ``stage`` at or above
      ``block_on_incident_severity`` is open; incidents of other stages do not count.
    - Every telemetry-based criterion fails, with ``observed=None``, when ``telemetry``
      is missing or older than ``max_staleness``.

    Raises ``ValueError`` for naive datetimes, negative ``approvals`` or a negative
    ``max_staleness``.
    """
    _require_aware("stage_entered_at", stage_entered_at)
    _require_aware("now", now)
    if approvals < 0:
        raise ValueError(f"approvals must be >= 0, got {approvals}")
    results = [_days_in_stage(criteria.min_days_in_stage, stage_entered_at, now)]
    problem = _telemetry_problem(telemetry, now=now, max_staleness=max_staleness)
    if problem is not None or telemetry is None:  # the second test only narrows the type
        results += [
            CriterionResult(name, None, threshold, False, problem or NO_TELEMETRY)
            for name, threshold in _telemetry_thresholds(criteria)
        ]
    else:
        results += _telemetry_criteria(criteria, telemetry)
    results.append(_no_open_incident(criteria, stage, incidents))
    results.append(_approvals(criteria.approvals_needed, approvals))
    return results


def _telemetry_thresholds(criteria: ExitCriteria) -> list[tuple[str, float | int]]:
    """The telemetry-based criteria as (name, threshold), in result order."""
    return [
        ("min_requests", criteria.min_requests),
        ("min_distinct_orgs", criteria.min_distinct_orgs),
        *(
            (f"min_distinct_orgs:{tier}", minimum)
            for tier, minimum in criteria.min_distinct_orgs_per_tier.items()
        ),
        ("max_flag_rate", criteria.max_flag_rate),
        *(
            (f"max_flag_rate:{category}", maximum)
            for category, maximum in criteria.max_flag_rate_by_category.items()
        ),
        ("max_error_rate", criteria.max_error_rate),
        *(
            (name, maximum)
            for name, maximum in (
                ("max_confirmed_flag_rate", criteria.max_confirmed_flag_rate),
                ("max_held_dataset_rate", criteria.max_held_dataset_rate),
                ("max_failed_assessment_rate", criteria.max_failed_assessment_rate),
            )
            if maximum is not None
        ),
    ]


def _telemetry_criteria(criteria: ExitCriteria, telemetry: Telemetry) -> list[CriterionResult]:
    results = [
        _at_least("min_requests", telemetry.requests, criteria.min_requests, "admitted requests"),
        _at_least(
            "min_distinct_orgs",
            telemetry.distinct_orgs,
            criteria.min_distinct_orgs,
            "distinct orgs",
        ),
    ]
    for tier, minimum in criteria.min_distinct_orgs_per_tier.items():
        observed = telemetry.orgs_by_tier.get(tier, 0)
        results.append(
            _at_least(f"min_distinct_orgs:{tier}", observed, minimum, f"distinct {tier} orgs")
        )
    results.append(
        _rate_at_most(
            "max_flag_rate",
            "flag rate",
            telemetry.flagged,
            telemetry.requests,
            criteria.max_flag_rate,
        )
    )
    for category, maximum in criteria.max_flag_rate_by_category.items():
        results.append(
            _rate_at_most(
                f"max_flag_rate:{category}",
                f"{category} flag rate",
                telemetry.flagged_by_category.get(category, 0),
                telemetry.requests,
                maximum,
            )
        )
    results.append(
        _rate_at_most(
            "max_error_rate",
            "error rate",
            telemetry.errors,
            telemetry.requests,
            criteria.max_error_rate,
        )
    )
    if criteria.max_confirmed_flag_rate is not None:
        results.append(_confirmed_rate(criteria.max_confirmed_flag_rate, telemetry))
    if criteria.max_held_dataset_rate is not None:
        held, rejected = telemetry.datasets_held, telemetry.datasets_rejected
        results.append(
            _observed_rate_at_most(
                "max_held_dataset_rate",
                "held dataset rate",
                held + rejected,
                telemetry.datasets_screened,
                criteria.max_held_dataset_rate,
                counted=f"screened datasets held or rejected: {held} held, {rejected} rejected",
                nothing="no datasets screened in this stage",
            )
        )
    if criteria.max_failed_assessment_rate is not None:
        results.append(
            _observed_rate_at_most(
                "max_failed_assessment_rate",
                "failed assessment rate",
                telemetry.assessments_failed,
                telemetry.assessments,
                criteria.max_failed_assessment_rate,
                counted="tuned model assessments failed",
                nothing="no tuned models assessed in this stage",
            )
        )
    return results


def _confirmed_rate(maximum: float, telemetry: Telemetry) -> CriterionResult:
    name = "max_confirmed_flag_rate"
    if telemetry.confirmed is None:
        explanation = (
            "no flagged samples are kept in this stage (screening.retain_flagged is off),"
            " so none can be confirmed"
        )
        return CriterionResult(name, None, maximum, False, explanation)
    # Samples are counted apart from the rollups: never let one read a request the
    # rollups have not counted yet as a rate above 1.
    requests = max(telemetry.requests, telemetry.confirmed)
    result = _rate_at_most(name, "confirmed flag rate", telemetry.confirmed, requests, maximum)
    if not telemetry.pending:
        return result
    waiting = _count(telemetry.pending, "flagged request")
    return dataclasses.replace(
        result,
        passed=False,
        explanation=f"{result.explanation}; {waiting} still awaiting a reviewer's decision",
    )


def _days_in_stage(minimum: float, entered_at: datetime, now: datetime) -> CriterionResult:
    # Whole hundredths of a day by exact integer arithmetic: rounding to nearest could show
    # (and pass) 14.00 days seven minutes early. A stage entered "in the future" (clock
    # skew) has been entered just now.
    hundredths = max(0, (now - entered_at) // _DAY_HUNDREDTH)
    days = hundredths / 100
    passed = days >= minimum
    if passed:
        explanation = f"{days:.2f} days in stage, at least {_number(minimum)} required"
    else:
        explanation = (
            f"{days:.2f} days in stage, {_number(minimum)} required ({minimum - days:.2f} to go)"
        )
    return CriterionResult("min_days_in_stage", days, minimum, passed, explanation)


def _at_least(name: str, observed: int, minimum: int, what: str) -> CriterionResult:
    passed = observed >= minimum
    if passed:
        explanation = f"{observed} {what}, at least {minimum} required"
    else:
        explanation = f"{observed} {what}, {minimum} required ({minimum - observed} to go)"
    return CriterionResult(name, observed, minimum, passed, explanation)


def _rate_at_most(
    name: str, label: str, events: int, requests: int, maximum: float
) -> CriterionResult:
    bound = wilson_upper_bound(events, requests)
    passed = bound <= maximum
    point = f", point rate {_percent(events / requests)}" if requests else ""
    verdict = "within" if passed else "above"
    explanation = (
        f"{label} 95% upper bound {_percent(bound)} ({events} of {requests}{point})"
        f" is {verdict} the {_percent(maximum)} maximum"
    )
    return CriterionResult(name, bound, maximum, passed, explanation)


def _observed_rate_at_most(
    name: str,
    label: str,
    events: int,
    trials: int,
    maximum: float,
    *,
    counted: str,
    nothing: str,
) -> CriterionResult:
    """A rate judged by its observed value (fine-tuning: module docstring). ``counted``
    says what ``events`` are, after "N of M"; ``nothing`` is the whole explanation when
    there were no ``trials``."""
    if not trials:
        # Nothing was screened, so nothing was held: as a tripwire reads an empty window.
        return CriterionResult(name, 0.0, maximum, True, nothing)
    rate = events / trials
    passed = rate <= maximum
    verdict = "within" if passed else "above"
    explanation = (
        f"{label} {_percent(rate)} observed ({events} of {trials} {counted})"
        f" is {verdict} the {_percent(maximum)} maximum"
    )
    return CriterionResult(name, rate, maximum, passed, explanation)


def _no_open_incident(
    criteria: ExitCriteria, stage: str, incidents: Sequence[Incident]
) -> CriterionResult:
    floor = criteria.block_on_incident_severity
    blocking = _open_at_least(incidents, stage, floor)
    if blocking:
        explanation = (
            f"{_count(len(blocking), 'open incident')} at or above {floor} in this stage:"
            f" {_incident_list(blocking)}"
        )
    else:
        explanation = f"no open incident at or above {floor} in this stage"
    return CriterionResult("no_open_incident", len(blocking), floor, not blocking, explanation)


def _approvals(needed: int, approvals: int) -> CriterionResult:
    passed = approvals >= needed
    if needed == 0:
        explanation = f"no approvals required ({approvals} recorded)"
    else:
        explanation = f"{approvals} of {needed} required approvals recorded"
    return CriterionResult("approvals", approvals, needed, passed, explanation)


# --- tripwires ----------------------------------------------------------------------------


def evaluate_tripwire(
    tripwire: Tripwire,
    *,
    window: Telemetry | None,
    stage: str,
    incidents: Sequence[Incident],
    now: datetime,
    max_staleness: timedelta,
) -> TripwireResult:
    """Whether ``tripwire`` of ``stage`` fires now.

    A ``flag_rate`` / ``error_rate`` tripwire fires when the point rate over ``window``
    (the telemetry of its last ``window_minutes``, rolled up by the caller) reaches the
    threshold and the window holds at least ``min_requests`` admitted requests. A
    ``flag_rate`` tripwire with a ``category`` counts that category's flags only. With
    missing or stale telemetry it cannot tell, so it does not fire and says so. An
    ``incident`` tripwire fires when an incident of ``stage`` at or above its severity is
    open; it needs no telemetry.

    Never raises over the data it judges. Programming errors are a ``ValueError``: a naive
    ``now``, a negative ``max_staleness``, or a tripwire built without the threshold or
    severity its metric requires (only possible by bypassing the schema's validation).
    """
    _require_aware("now", now)
    if max_staleness < timedelta(0):
        raise ValueError(f"max_staleness must not be negative, got {max_staleness}")
    if tripwire.metric == "incident":
        return _incident_tripwire(tripwire, stage, incidents)
    threshold = tripwire.threshold
    if threshold is None:  # the schema requires it for rate tripwires; be explicit anyway
        raise ValueError(f"tripwire {tripwire.name!r} ({tripwire.metric}) has no threshold")
    problem = _telemetry_problem(window, now=now, max_staleness=max_staleness)
    if problem is not None or window is None:  # the second test only narrows the type
        reason = f"cannot judge: {problem or NO_TELEMETRY}"
        return _tripwire_result(tripwire, False, None, threshold, reason)

    label = _RATE_LABELS[tripwire.metric]
    if tripwire.metric == "error_rate":
        events = window.errors
    elif tripwire.category is None:
        events = window.flagged
    else:
        events = window.flagged_by_category.get(tripwire.category, 0)
        label = f"{tripwire.category} {label}"
    # Zero requests means nothing went wrong in the window: 0.0 cannot reach a threshold > 0.
    rate = events / window.requests if window.requests else 0.0
    observed = (
        f"{label} {_percent(rate)} ({events} of {window.requests})"
        f" in the last {tripwire.window_minutes} min"
    )
    enough = window.requests >= tripwire.min_requests
    fired = enough and rate >= threshold
    if fired:
        explanation = f"fired: {observed} reached the {_percent(threshold)} threshold"
    elif not enough:
        explanation = f"{observed}: fewer than the {tripwire.min_requests} requests needed to judge"
    else:
        explanation = f"{observed} is below the {_percent(threshold)} threshold"
    return _tripwire_result(tripwire, fired, rate, threshold, explanation)


def _incident_tripwire(
    tripwire: Tripwire, stage: str, incidents: Sequence[Incident]
) -> TripwireResult:
    floor = tripwire.severity
    if floor is None:  # the schema requires it for incident tripwires
        raise ValueError(f"tripwire {tripwire.name!r} (incident) has no severity")
    matching = _open_at_least(incidents, stage, floor)
    if matching:
        explanation = (
            f"fired: {_count(len(matching), 'open incident')} at or above {floor} in this"
            f" stage: {_incident_list(matching)}"
        )
    else:
        explanation = f"no open incident at or above {floor} in this stage"
    return _tripwire_result(tripwire, bool(matching), len(matching), floor, explanation)


def _tripwire_result(
    tripwire: Tripwire,
    fired: bool,
    observed: float | int | None,
    threshold: float | str,
    explanation: str,
) -> TripwireResult:
    return TripwireResult(
        name=tripwire.name,
        metric=tripwire.metric,
        action=tripwire.action,
        fired=fired,
        observed=observed,
        threshold=threshold,
        explanation=explanation,
    )


# --- the recommendation -------------------------------------------------------------------


def recommend(
    exit_results: Sequence[CriterionResult],
    tripwires: Sequence[TripwireResult],
    *,
    has_next_stage: bool,
) -> tuple[Recommendation, str]:
    """The review's recommendation and a one-line reason.

    ``ROLLBACK`` when any tripwire fired, whatever its own action; else ``ADVANCE`` when
    there is a next stage and every exit result but ``approvals`` passed (approvals are
    collected after the review, so they gate the transition, not the recommendation);
    else ``HOLD``. With no exit results at all there is no evidence, so the answer is
    ``HOLD``, never ``ADVANCE``.
    """
    fired = [tripwire for tripwire in tripwires if tripwire.fired]
    if fired:
        names = ", ".join(f"{tripwire.name} ({tripwire.metric})" for tripwire in fired)
        label = "tripwire" if len(fired) == 1 else "tripwires"
        return Recommendation.ROLLBACK, f"{label} fired: {names}"
    if not has_next_stage:
        return Recommendation.HOLD, "final stage: there is no stage to advance to"
    gating = [result for result in exit_results if result.name != "approvals"]
    if not gating:
        return Recommendation.HOLD, "no exit criteria were evaluated"
    failing = [result.name for result in gating if not result.passed]
    if failing:
        return Recommendation.HOLD, f"exit criteria not met: {', '.join(failing)}"
    approvals = next((result for result in exit_results if result.name == "approvals"), None)
    explanation = "every exit criterion is met"
    if approvals is not None:
        explanation += f"; approvals: {approvals.observed} of {approvals.threshold} recorded"
    return Recommendation.ADVANCE, explanation


# --- helpers ------------------------------------------------------------------------------


def _require_aware(name: str, value: datetime) -> None:
    """Raise ``ValueError`` unless ``value`` is a timezone-aware datetime."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (UTC), got naive {value.isoformat()}")


def _open_at_least(incidents: Sequence[Incident], stage: str, floor: str) -> list[Incident]:
    """The incidents of ``stage`` at or above severity ``floor``, in the given order."""
    return [
        incident
        for incident in incidents
        if incident.stage == stage and severity_at_least(incident.severity, floor)
    ]


def _incident_list(incidents: Sequence[Incident]) -> str:
    # Ids come from the database; collapse whitespace so the explanation stays one line.
    return ", ".join(
        f"{' '.join(incident.public_id.split())} ({incident.severity})" for incident in incidents
    )


def _count(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _number(value: float) -> str:
    """``14.0`` -> ``14``, ``0.5`` -> ``0.5``: the plan's number as people wrote it."""
    return f"{value:g}"


def _percent(rate: float) -> str:
    """A rate as a percentage with one or two decimals: 0.02 -> 2.0%, 0.0314 -> 3.14%."""
    percent = rate * 100
    if 0 < percent < 0.01:
        return f"{percent:.2g}%"  # a tiny maximum such as 0.00005 must not read as 0.0%
    text = f"{percent:.2f}".rstrip("0")
    return f"{text}0%" if text.endswith(".") else f"{text}%"
