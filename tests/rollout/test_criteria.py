"""Exit criteria, tripwires and the recommendation, judged from plain data.

Pure Python: no database, no Django. The cast is one stage, ``research_preview``, entered
20 days before ``NOW`` with healthy, freshly rolled-up telemetry; each test changes the
one thing it is about.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, localcontext
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rollout.criteria import (
    CriterionResult,
    Incident,
    Recommendation,
    Telemetry,
    TripwireResult,
    evaluate_exit,
    evaluate_tripwire,
    recommend,
    telemetry_is_fresh,
    wilson_upper_bound,
)
from rollout.plan_schema import SEVERITIES, ExitCriteria, Tripwire

Z = 1.959963984540054
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
STAGE = "research_preview"
OTHER_STAGE = "commercial"
ENTERED = NOW - timedelta(days=20)
STALENESS = timedelta(minutes=30)
TOKYO = timezone(timedelta(hours=9))

TELEMETRY_NAMES = [
    "min_requests",
    "min_distinct_orgs",
    "min_distinct_orgs:research_partner",
    "max_flag_rate",
    "max_error_rate",
]


def make_criteria(**overrides: Any) -> ExitCriteria:
    fields: dict[str, Any] = {
        "min_days_in_stage": 14,
        "min_requests": 1000,
        "min_distinct_orgs": 3,
        "min_distinct_orgs_per_tier": {"research_partner": 3},
        "max_flag_rate": 0.01,
        "max_error_rate": 0.02,
        "block_on_incident_severity": "high",
        "approvals_needed": 2,
    }
    return ExitCriteria(**(fields | overrides))


def make_telemetry(**overrides: Any) -> Telemetry:
    fields: dict[str, Any] = {
        "requests": 10_000,
        "errors": 50,
        "flagged": 20,
        "orgs_by_tier": {"research_partner": 3},
        "distinct_orgs": 3,
        "rolled_up_to": NOW - timedelta(minutes=5),
    }
    return Telemetry(**(fields | overrides))


def judge(criteria: ExitCriteria | None = None, **overrides: Any) -> list[CriterionResult]:
    arguments: dict[str, Any] = {
        "telemetry": make_telemetry(),
        "stage": STAGE,
        "stage_entered_at": ENTERED,
        "now": NOW,
        "incidents": [],
        "approvals": 0,
        "max_staleness": STALENESS,
    }
    return evaluate_exit(criteria or make_criteria(), **(arguments | overrides))


def result(results: list[CriterionResult], name: str) -> CriterionResult:
    (found,) = [item for item in results if item.name == name]
    return found


def trip(tripwire: Tripwire, **overrides: Any) -> TripwireResult:
    arguments: dict[str, Any] = {
        "window": make_telemetry(),
        "stage": STAGE,
        "incidents": [],
        "now": NOW,
        "max_staleness": STALENESS,
    }
    return evaluate_tripwire(tripwire, **(arguments | overrides))


def error_spike(**overrides: Any) -> Tripwire:
    fields: dict[str, Any] = {
        "name": "error-spike",
        "metric": "error_rate",
        "threshold": 0.10,
        "window_minutes": 15,
        "min_requests": 100,
        "action": "pause",
    }
    return Tripwire(**(fields | overrides))


def serious_incident(severity: str = "high") -> Tripwire:
    return Tripwire(name="serious-incident", metric="incident", severity=severity, action="pause")


def wilson_reference(events: int, trials: int, z: float = Z) -> float:
    """The larger root of (p_hat - p)^2 = z^2 p (1 - p) / n, the Wilson interval's definition.

    Solved in 60-digit decimals: in floats the quadratic formula cancels badly near p = 1.
    """
    with localcontext() as context:
        context.prec = 60
        n, z_squared = Decimal(trials), Decimal(z) ** 2
        p_hat = Decimal(events) / n
        a = 1 + z_squared / n
        b = -(2 * p_hat + z_squared / n)
        c = p_hat * p_hat
        return float((-b + (b * b - 4 * a * c).sqrt()) / (2 * a))


def criterion(name: str, passed: bool) -> CriterionResult:
    return CriterionResult(name, 1, 1, passed, "")


def tripwire_result(name: str, fired: bool) -> TripwireResult:
    return TripwireResult(name, "error_rate", "pause", fired, 0.5, 0.1, "")


# --- wilson_upper_bound -------------------------------------------------------------------


def test_wilson_upper_bound_no_trials_is_one():
    assert wilson_upper_bound(0, 0) == 1.0


@pytest.mark.parametrize(
    ("events", "trials", "expected"),
    [(0, 100, 0.0370), (10, 100, 0.1744), (0, 20, 0.1611), (50, 100, 0.5962), (12, 800, 0.0260)],
)
def test_wilson_upper_bound_known_values(events, trials, expected):
    assert wilson_upper_bound(events, trials) == pytest.approx(expected, abs=5e-5)
    assert wilson_upper_bound(events, trials) == pytest.approx(wilson_reference(events, trials))


def test_wilson_upper_bound_all_events_is_one():
    assert wilson_upper_bound(7, 7) == 1.0
    assert wilson_upper_bound(10**12, 10**12) == 1.0


def test_wilson_upper_bound_wider_z_is_higher():
    assert wilson_upper_bound(10, 100, z=2.576) > wilson_upper_bound(10, 100)
    assert wilson_upper_bound(10, 100, z=2.576) == pytest.approx(wilson_reference(10, 100, 2.576))


@pytest.mark.parametrize(("events", "trials"), [(-1, 10), (11, 10), (1, 0), (0, -1)])
def test_wilson_upper_bound_impossible_counts_raise(events, trials):
    with pytest.raises(ValueError, match="0 <= events <= trials"):
        wilson_upper_bound(events, trials)


@pytest.mark.parametrize("z", [0.0, -1.0, math.inf, math.nan])
def test_wilson_upper_bound_bad_z_raises(z):
    with pytest.raises(ValueError, match="z must be a positive finite number"):
        wilson_upper_bound(1, 10, z=z)


counts = st.integers(min_value=1, max_value=10**9).flatmap(
    lambda trials: st.tuples(st.integers(min_value=0, max_value=trials), st.just(trials))
)


@given(counts)
def test_wilson_upper_bound_between_point_rate_and_one(pair):
    events, trials = pair
    assert events / trials <= wilson_upper_bound(events, trials) <= 1.0


@given(counts)
def test_wilson_upper_bound_matches_quadratic_root(pair):
    events, trials = pair
    expected = wilson_reference(events, trials)
    assert wilson_upper_bound(events, trials) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@given(counts, st.integers(min_value=2, max_value=1000))
def test_wilson_upper_bound_shrinks_as_trials_grow_at_same_rate(pair, factor):
    events, trials = pair
    assert wilson_upper_bound(events * factor, trials * factor) <= wilson_upper_bound(
        events, trials
    )


@given(counts)
def test_wilson_upper_bound_drops_with_each_clean_trial(pair):
    events, trials = pair
    assert wilson_upper_bound(events, trials + 1) <= wilson_upper_bound(events, trials)


# --- inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"requests": -1}, r"Telemetry.requests must be >= 0"),
        ({"errors": 10_001}, r"Telemetry.errors \(10001\) exceeds requests \(10000\)"),
        ({"flagged": 10_001}, r"Telemetry.flagged \(10001\) exceeds requests \(10000\)"),
        ({"orgs_by_tier": {"public": -1}}, r"Telemetry.orgs_by_tier\['public'\] must be >= 0"),
        ({"rolled_up_to": datetime(2026, 11, 20, 12)}, r"must be timezone-aware"),
    ],
)
def test_telemetry_inconsistent_numbers_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_telemetry(**overrides)


def test_telemetry_orgs_by_tier_is_a_copy():
    orgs = {"research_partner": 3}
    telemetry = make_telemetry(orgs_by_tier=orgs)
    orgs["research_partner"] = 0
    assert dict(telemetry.orgs_by_tier) == {"research_partner": 3}


def test_incident_unknown_severity_raises():
    with pytest.raises(ValueError, match=r"Incident\.severity must be one of"):
        Incident("INC-1", STAGE, "severe")


# --- telemetry_is_fresh -------------------------------------------------------------------


def test_telemetry_is_fresh_missing_is_not_fresh():
    assert telemetry_is_fresh(None, now=NOW, max_staleness=STALENESS) is False


def test_telemetry_is_fresh_never_rolled_up_is_not_fresh():
    telemetry = make_telemetry(rolled_up_to=None)
    assert telemetry_is_fresh(telemetry, now=NOW, max_staleness=STALENESS) is False


def test_telemetry_is_fresh_at_the_limit_is_fresh():
    telemetry = make_telemetry(rolled_up_to=NOW - STALENESS)
    assert telemetry_is_fresh(telemetry, now=NOW, max_staleness=STALENESS) is True


def test_telemetry_is_fresh_past_the_limit_is_stale():
    telemetry = make_telemetry(rolled_up_to=NOW - STALENESS - timedelta(seconds=1))
    assert telemetry_is_fresh(telemetry, now=NOW, max_staleness=STALENESS) is False


def test_telemetry_is_fresh_future_rollup_is_fresh():
    telemetry = make_telemetry(rolled_up_to=NOW + timedelta(minutes=3))
    assert telemetry_is_fresh(telemetry, now=NOW, max_staleness=STALENESS) is True


def test_telemetry_is_fresh_other_timezone_compares_instants():
    # 20:50 in Tokyo is 11:50 UTC: ten minutes behind NOW, not eight hours ahead.
    telemetry = make_telemetry(rolled_up_to=datetime(2026, 11, 20, 20, 50, tzinfo=TOKYO))
    assert telemetry_is_fresh(telemetry, now=NOW, max_staleness=STALENESS) is True


def test_telemetry_is_fresh_naive_now_raises():
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        telemetry_is_fresh(make_telemetry(), now=NOW.replace(tzinfo=None), max_staleness=STALENESS)


def test_telemetry_is_fresh_negative_staleness_raises():
    with pytest.raises(ValueError, match="max_staleness must not be negative"):
        telemetry_is_fresh(make_telemetry(), now=NOW, max_staleness=timedelta(seconds=-1))


# --- evaluate_exit: shape -----------------------------------------------------------------


def test_evaluate_exit_results_in_documented_order():
    criteria = make_criteria(
        min_distinct_orgs_per_tier={"public": 1, "research_partner": 2, "verified_commercial": 1}
    )
    names = [item.name for item in judge(criteria)]
    assert names == [
        "min_days_in_stage",
        "min_requests",
        "min_distinct_orgs",
        "min_distinct_orgs:research_partner",
        "min_distinct_orgs:verified_commercial",
        "min_distinct_orgs:public",
        "max_flag_rate",
        "max_error_rate",
        "no_open_incident",
        "approvals",
    ]


def test_evaluate_exit_no_per_tier_minimums_no_per_tier_results():
    names = [item.name for item in judge(make_criteria(min_distinct_orgs_per_tier={}))]
    assert names == [
        "min_days_in_stage",
        "min_requests",
        "min_distinct_orgs",
        "max_flag_rate",
        "max_error_rate",
        "no_open_incident",
        "approvals",
    ]


def test_evaluate_exit_healthy_stage_passes_everything_but_approvals():
    verdicts = {item.name: item.passed for item in judge()}
    assert verdicts == {
        "min_days_in_stage": True,
        "min_requests": True,
        "min_distinct_orgs": True,
        "min_distinct_orgs:research_partner": True,
        "max_flag_rate": True,
        "max_error_rate": True,
        "no_open_incident": True,
        "approvals": False,
    }


def test_evaluate_exit_naive_stage_entered_at_raises():
    with pytest.raises(ValueError, match="stage_entered_at must be timezone-aware"):
        judge(stage_entered_at=ENTERED.replace(tzinfo=None))


def test_evaluate_exit_naive_now_raises():
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        judge(now=NOW.replace(tzinfo=None))


def test_evaluate_exit_negative_approvals_raises():
    with pytest.raises(ValueError, match="approvals must be >= 0"):
        judge(approvals=-1)


def test_criterion_result_as_dict_is_json_ready():
    for item in judge(telemetry=None):
        assert json.loads(json.dumps(item.as_dict())) == item.as_dict()
    assert result(judge(), "min_requests").as_dict() == {
        "name": "min_requests",
        "observed": 10_000,
        "threshold": 1000,
        "passed": True,
        "explanation": "10000 admitted requests, at least 1000 required",
    }


# --- evaluate_exit: days in stage ---------------------------------------------------------


def test_min_days_in_stage_exactly_reached_passes():
    item = result(judge(stage_entered_at=NOW - timedelta(days=14)), "min_days_in_stage")
    assert (item.observed, item.threshold, item.passed) == (14.0, 14, True)
    assert item.explanation == "14.00 days in stage, at least 14 required"


def test_min_days_in_stage_one_second_short_fails():
    entered = NOW - timedelta(days=14) + timedelta(seconds=1)
    item = result(judge(stage_entered_at=entered), "min_days_in_stage")
    assert (item.observed, item.passed) == (13.99, False)
    assert item.explanation == "13.99 days in stage, 14 required (0.01 to go)"


def test_min_days_in_stage_observed_is_truncated_to_hundredths():
    # 2 days 5 hours is 2.2083 days: shown as 2.20, never rounded up to 2.21.
    item = result(judge(stage_entered_at=NOW - timedelta(days=2, hours=5)), "min_days_in_stage")
    assert item.observed == 2.2


def test_min_days_in_stage_fraction_of_a_day():
    criteria = make_criteria(min_days_in_stage=0.5)
    passing = result(
        judge(criteria, stage_entered_at=NOW - timedelta(hours=12)), "min_days_in_stage"
    )
    failing = result(
        judge(criteria, stage_entered_at=NOW - timedelta(hours=11)), "min_days_in_stage"
    )
    assert (passing.observed, passing.passed) == (0.5, True)
    assert (failing.observed, failing.passed) == (0.45, False)
    assert failing.explanation == "0.45 days in stage, 0.5 required (0.05 to go)"


def test_min_days_in_stage_entered_in_future_counts_zero():
    entered = NOW + timedelta(minutes=2)
    zero = result(
        judge(make_criteria(min_days_in_stage=0), stage_entered_at=entered), "min_days_in_stage"
    )
    assert (zero.observed, zero.passed) == (0.0, True)


# --- evaluate_exit: counts ----------------------------------------------------------------


def test_min_requests_at_minimum_passes():
    item = result(judge(telemetry=make_telemetry(requests=1000)), "min_requests")
    assert (item.observed, item.threshold, item.passed) == (1000, 1000, True)


def test_min_requests_one_below_fails():
    item = result(
        judge(telemetry=make_telemetry(requests=999, errors=0, flagged=0)), "min_requests"
    )
    assert (item.observed, item.passed) == (999, False)
    assert item.explanation == "999 admitted requests, 1000 required (1 to go)"


def test_min_distinct_orgs_at_minimum_passes():
    item = result(judge(telemetry=make_telemetry(distinct_orgs=3)), "min_distinct_orgs")
    assert (item.observed, item.threshold, item.passed) == (3, 3, True)
    assert item.explanation == "3 distinct orgs, at least 3 required"


def test_min_distinct_orgs_one_below_fails():
    item = result(judge(telemetry=make_telemetry(distinct_orgs=2)), "min_distinct_orgs")
    assert (item.observed, item.passed) == (2, False)
    assert item.explanation == "2 distinct orgs, 3 required (1 to go)"


def test_min_distinct_orgs_per_tier_each_tier_judged_alone():
    criteria = make_criteria(
        min_distinct_orgs=0,
        min_distinct_orgs_per_tier={"research_partner": 2, "verified_commercial": 3},
    )
    telemetry = make_telemetry(
        orgs_by_tier={"research_partner": 2, "verified_commercial": 2}, distinct_orgs=4
    )
    results = judge(criteria, telemetry=telemetry)
    partner = result(results, "min_distinct_orgs:research_partner")
    commercial = result(results, "min_distinct_orgs:verified_commercial")
    assert (partner.observed, partner.threshold, partner.passed) == (2, 2, True)
    assert (commercial.observed, commercial.threshold, commercial.passed) == (2, 3, False)
    assert commercial.explanation == "2 distinct verified_commercial orgs, 3 required (1 to go)"


def test_min_distinct_orgs_per_tier_absent_tier_counts_zero():
    criteria = make_criteria(min_distinct_orgs_per_tier={"public": 1})
    item = result(judge(criteria), "min_distinct_orgs:public")
    assert (item.observed, item.threshold, item.passed) == (0, 1, False)


def test_min_distinct_orgs_per_tier_zero_minimum_passes_without_orgs():
    criteria = make_criteria(min_distinct_orgs_per_tier={"public": 0})
    assert result(judge(criteria), "min_distinct_orgs:public").passed is True


# --- evaluate_exit: rates -----------------------------------------------------------------


def test_max_error_rate_little_traffic_fails_where_point_rate_would_pass():
    telemetry = make_telemetry(requests=20, errors=0, flagged=0)
    item = result(judge(make_criteria(min_requests=0), telemetry=telemetry), "max_error_rate")
    assert item.passed is False
    assert item.observed == pytest.approx(0.16113, abs=1e-5)
    assert item.explanation == (
        "error rate 95% upper bound 16.11% (0 of 20, point rate 0.0%) is above the 2.0% maximum"
    )


def test_max_error_rate_enough_clean_traffic_passes():
    telemetry = make_telemetry(requests=200, errors=0, flagged=0)
    item = result(judge(telemetry=telemetry), "max_error_rate")
    assert item.passed is True
    assert item.explanation == (
        "error rate 95% upper bound 1.88% (0 of 200, point rate 0.0%) is within the 2.0% maximum"
    )


def test_max_error_rate_bound_equal_to_maximum_passes():
    bound = wilson_upper_bound(50, 10_000)
    item = result(judge(make_criteria(max_error_rate=bound)), "max_error_rate")
    assert (item.observed, item.threshold, item.passed) == (bound, bound, True)


def test_max_error_rate_bound_just_above_maximum_fails():
    maximum = math.nextafter(wilson_upper_bound(50, 10_000), 0)
    assert result(judge(make_criteria(max_error_rate=maximum)), "max_error_rate").passed is False


def test_max_error_rate_point_rate_under_maximum_but_bound_over_fails():
    # 12 of 800 is 1.5%, under the 2.0% maximum; the bound, 2.6%, is not.
    telemetry = make_telemetry(requests=800, errors=12, flagged=0)
    item = result(judge(telemetry=telemetry), "max_error_rate")
    assert item.passed is False
    assert item.explanation == (
        "error rate 95% upper bound 2.6% (12 of 800, point rate 1.5%) is above the 2.0% maximum"
    )


def test_max_error_rate_no_requests_fails_with_bound_one():
    telemetry = make_telemetry(requests=0, errors=0, flagged=0)
    item = result(judge(telemetry=telemetry), "max_error_rate")
    assert (item.observed, item.passed) == (1.0, False)
    assert (
        item.explanation == "error rate 95% upper bound 100.0% (0 of 0) is above the 2.0% maximum"
    )


def test_max_error_rate_no_requests_passes_a_maximum_of_one():
    telemetry = make_telemetry(requests=0, errors=0, flagged=0)
    item = result(judge(make_criteria(max_error_rate=1.0), telemetry=telemetry), "max_error_rate")
    assert (item.observed, item.passed) == (1.0, True)


def test_max_flag_rate_judges_flagged_not_errors():
    telemetry = make_telemetry(requests=1000, errors=0, flagged=30)
    results = judge(make_criteria(min_requests=0), telemetry=telemetry)
    flags = result(results, "max_flag_rate")
    assert flags.observed == pytest.approx(wilson_reference(30, 1000))
    assert flags.passed is False
    assert result(results, "max_error_rate").passed is True
    assert flags.explanation.startswith("flag rate 95% upper bound 4.25% (30 of 1000")


# --- evaluate_exit: screening's categories and the confirmed flag rate ---------------------


def test_max_flag_rate_by_category_judges_each_category_by_name():
    criteria = make_criteria(max_flag_rate_by_category={"weapons": 0.001, "cyber": 0.05})
    telemetry = make_telemetry(
        requests=1000, flagged=30, flagged_by_category={"cyber": 25, "weapons": 5, "other": 1}
    )
    results = judge(criteria, telemetry=telemetry)
    assert [item.name for item in results][3:8] == [
        "min_distinct_orgs:research_partner",
        "max_flag_rate",
        "max_flag_rate:cyber",
        "max_flag_rate:weapons",
        "max_error_rate",
    ]
    cyber, weapons = (
        result(results, "max_flag_rate:cyber"),
        result(results, "max_flag_rate:weapons"),
    )
    assert (cyber.observed, cyber.threshold, cyber.passed) == (
        pytest.approx(wilson_reference(25, 1000)),
        0.05,
        True,
    )
    assert (weapons.observed, weapons.passed) == (pytest.approx(wilson_reference(5, 1000)), False)
    assert weapons.explanation == (
        "weapons flag rate 95% upper bound 1.17% (5 of 1000, point rate 0.5%)"
        " is above the 0.1% maximum"
    )


def test_max_flag_rate_by_category_with_no_flag_in_it_judges_zero():
    criteria = make_criteria(max_flag_rate_by_category={"weapons": 0.01})
    item = result(judge(criteria), "max_flag_rate:weapons")
    assert (item.observed, item.passed) == (pytest.approx(wilson_reference(0, 10_000)), True)


def test_max_confirmed_flag_rate_judges_confirmed_requests():
    criteria = make_criteria(max_confirmed_flag_rate=0.01)
    passing = result(
        judge(criteria, telemetry=make_telemetry(confirmed=3)), "max_confirmed_flag_rate"
    )
    failing = result(
        judge(criteria, telemetry=make_telemetry(confirmed=90)), "max_confirmed_flag_rate"
    )
    assert (passing.observed, passing.threshold, passing.passed) == (
        pytest.approx(wilson_reference(3, 10_000)),
        0.01,
        True,
    )
    assert (failing.observed, failing.passed) == (
        pytest.approx(wilson_reference(90, 10_000)),
        False,
    )
    assert passing.explanation.startswith("confirmed flag rate 95% upper bound 0.09% (3 of 10000")
    assert [item.name for item in judge(criteria)][-3:] == [
        "max_confirmed_flag_rate",
        "no_open_incident",
        "approvals",
    ]


def test_max_confirmed_flag_rate_fails_while_a_flagged_request_awaits_review():
    criteria = make_criteria(max_confirmed_flag_rate=0.01)
    item = result(
        judge(criteria, telemetry=make_telemetry(confirmed=1, pending=2)), "max_confirmed_flag_rate"
    )
    assert (item.observed, item.passed) == (pytest.approx(wilson_reference(1, 10_000)), False)
    assert item.explanation.endswith(
        "is within the 1.0% maximum; 2 flagged requests still awaiting a reviewer's decision"
    )


def test_max_confirmed_flag_rate_fails_when_the_stage_keeps_no_samples():
    criteria = make_criteria(max_confirmed_flag_rate=0.5)
    item = result(
        judge(criteria, telemetry=make_telemetry(confirmed=None)), "max_confirmed_flag_rate"
    )
    assert (item.observed, item.passed) == (None, False)
    assert item.explanation == (
        "no flagged samples are kept in this stage (screening.retain_flagged is off),"
        " so none can be confirmed"
    )


def test_max_confirmed_flag_rate_never_reads_more_confirmed_than_requests_as_above_one():
    # Samples are counted apart from the rollups: a confirmed request the rollups have
    # not counted yet reads as all of them, never as a rate above 1.
    criteria = make_criteria(max_confirmed_flag_rate=0.5, min_requests=0)
    telemetry = make_telemetry(requests=1, errors=0, flagged=1, confirmed=2)
    item = result(judge(criteria, telemetry=telemetry), "max_confirmed_flag_rate")
    assert (item.observed, item.passed) == (1.0, False)


# --- fine-tuning: judged by the observed rate -----------------------------------------------

FINE_TUNING = {"max_held_dataset_rate": 0.2, "max_failed_assessment_rate": 0.25}


def test_fine_tuning_criteria_come_after_the_confirmed_rate_in_order():
    criteria = make_criteria(max_confirmed_flag_rate=0.01, **FINE_TUNING)
    names = [item.name for item in judge(criteria, telemetry=make_telemetry(confirmed=0))]
    assert names[-5:] == [
        "max_confirmed_flag_rate",
        "max_held_dataset_rate",
        "max_failed_assessment_rate",
        "no_open_incident",
        "approvals",
    ]


def test_fine_tuning_criteria_absent_from_the_plan_are_not_judged():
    names = [item.name for item in judge(make_criteria(max_held_dataset_rate=0.1))]
    assert [name for name in names if "dataset" in name or "assessment" in name] == [
        "max_held_dataset_rate"
    ]


def test_max_held_dataset_rate_at_the_maximum_passes_on_the_observed_rate():
    telemetry = make_telemetry(datasets_screened=10, datasets_held=1, datasets_rejected=1)
    item = result(judge(make_criteria(**FINE_TUNING), telemetry=telemetry), "max_held_dataset_rate")
    assert item == CriterionResult(
        "max_held_dataset_rate",
        0.2,
        0.2,
        True,
        "held dataset rate 20.0% observed (2 of 10 screened datasets held or rejected:"
        " 1 held, 1 rejected) is within the 20.0% maximum",
    )


def test_max_held_dataset_rate_above_the_maximum_fails():
    telemetry = make_telemetry(datasets_screened=8, datasets_held=1, datasets_rejected=2)
    item = result(judge(make_criteria(**FINE_TUNING), telemetry=telemetry), "max_held_dataset_rate")
    assert (item.observed, item.passed) == (0.375, False)
    assert item.explanation == (
        "held dataset rate 37.5% observed (3 of 8 screened datasets held or rejected:"
        " 1 held, 2 rejected) is above the 20.0% maximum"
    )


def test_max_held_dataset_rate_few_clean_datasets_pass_where_a_bound_would_not():
    # Three clean datasets: the 95% upper bound (56%) is far above a 10% maximum, but the
    # stage has seen nothing held; a bound would hold the release however clean it ran.
    telemetry = make_telemetry(datasets_screened=3)
    item = result(
        judge(make_criteria(max_held_dataset_rate=0.1), telemetry=telemetry),
        "max_held_dataset_rate",
    )
    assert wilson_upper_bound(0, 3) > 0.5
    assert (item.observed, item.passed) == (0.0, True)


def test_max_held_dataset_rate_without_screened_datasets_passes_and_says_so():
    item = result(judge(make_criteria(**FINE_TUNING)), "max_held_dataset_rate")
    assert item == CriterionResult(
        "max_held_dataset_rate", 0.0, 0.2, True, "no datasets screened in this stage"
    )


def test_max_failed_assessment_rate_judges_failed_over_assessments():
    criteria = make_criteria(**FINE_TUNING)
    passing = result(
        judge(criteria, telemetry=make_telemetry(assessments=4, assessments_failed=1)),
        "max_failed_assessment_rate",
    )
    failing = result(
        judge(criteria, telemetry=make_telemetry(assessments=3, assessments_failed=1)),
        "max_failed_assessment_rate",
    )
    assert (passing.observed, passing.threshold, passing.passed) == (0.25, 0.25, True)
    assert passing.explanation == (
        "failed assessment rate 25.0% observed (1 of 4 tuned model assessments failed)"
        " is within the 25.0% maximum"
    )
    assert (failing.observed, failing.passed) == (pytest.approx(1 / 3), False)
    assert failing.explanation == (
        "failed assessment rate 33.33% observed (1 of 3 tuned model assessments failed)"
        " is above the 25.0% maximum"
    )


def test_max_failed_assessment_rate_without_assessments_passes_and_says_so():
    item = result(judge(make_criteria(**FINE_TUNING)), "max_failed_assessment_rate")
    assert item == CriterionResult(
        "max_failed_assessment_rate", 0.0, 0.25, True, "no tuned models assessed in this stage"
    )


def test_fine_tuning_criteria_without_telemetry_fail_like_every_telemetry_criterion():
    results = judge(make_criteria(**FINE_TUNING), telemetry=None)
    assert [
        (item.name, item.observed, item.threshold, item.passed, item.explanation)
        for item in results
        if item.name in FINE_TUNING
    ] == [
        ("max_held_dataset_rate", None, 0.2, False, "no telemetry rolled up yet"),
        ("max_failed_assessment_rate", None, 0.25, False, "no telemetry rolled up yet"),
    ]


def test_fine_tuning_failures_hold_the_release():
    telemetry = make_telemetry(datasets_screened=2, datasets_held=1)
    recommendation, summary = recommend(
        judge(make_criteria(**FINE_TUNING), telemetry=telemetry), [], has_next_stage=True
    )
    assert (recommendation, summary) == (
        Recommendation.HOLD,
        "exit criteria not met: max_held_dataset_rate",
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"datasets_screened": -1}, r"Telemetry\.datasets_screened must be >= 0"),
        ({"assessments_failed": -1}, r"Telemetry\.assessments_failed must be >= 0"),
        (
            {"datasets_screened": 2, "datasets_held": 2, "datasets_rejected": 1},
            r"Telemetry\.datasets_held \(2\) plus datasets_rejected \(1\) exceed"
            r" datasets_screened \(2\)",
        ),
        (
            {"assessments": 1, "assessments_failed": 2},
            r"Telemetry\.assessments_failed \(2\) exceeds assessments \(1\)",
        ),
    ],
)
def test_telemetry_inconsistent_fine_tuning_counts_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_telemetry(**overrides)


def test_category_criteria_without_telemetry_fail_by_name():
    criteria = make_criteria(max_flag_rate_by_category={"cyber": 0.1}, max_confirmed_flag_rate=0.1)
    results = judge(criteria, telemetry=None)
    assert [
        (item.name, item.observed, item.passed)
        for item in results
        if item.name in ("max_flag_rate:cyber", "max_confirmed_flag_rate")
    ] == [("max_flag_rate:cyber", None, False), ("max_confirmed_flag_rate", None, False)]


def test_telemetry_refuses_a_category_count_outside_its_requests():
    with pytest.raises(ValueError, match=r"flagged_by_category\['cyber'\] must lie in 0..requests"):
        make_telemetry(requests=10, errors=0, flagged=10, flagged_by_category={"cyber": 11})
    with pytest.raises(ValueError, match=r"Telemetry\.pending must be >= 0"):
        make_telemetry(pending=-1)
    with pytest.raises(ValueError, match=r"Telemetry\.confirmed must be >= 0"):
        make_telemetry(confirmed=-1)


# --- evaluate_exit: missing and stale telemetry -------------------------------------------


def test_evaluate_exit_missing_telemetry_fails_every_telemetry_criterion():
    results = judge(telemetry=None)
    telemetry_results = [item for item in results if item.name in TELEMETRY_NAMES]
    assert [
        (item.name, item.observed, item.passed, item.explanation) for item in telemetry_results
    ] == [(name, None, False, "no telemetry rolled up yet") for name in TELEMETRY_NAMES]
    assert [item.threshold for item in telemetry_results] == [1000, 3, 3, 0.01, 0.02]


def test_evaluate_exit_never_rolled_up_fails_every_telemetry_criterion():
    results = judge(telemetry=make_telemetry(rolled_up_to=None))
    assert [item.explanation for item in results if item.name in TELEMETRY_NAMES] == [
        "no telemetry rolled up yet"
    ] * len(TELEMETRY_NAMES)
    assert [item.passed for item in results if item.name in TELEMETRY_NAMES] == [False] * 5


def test_evaluate_exit_stale_telemetry_fails_every_telemetry_criterion():
    stale = make_telemetry(rolled_up_to=NOW - timedelta(minutes=61, seconds=10))
    results = judge(telemetry=stale)
    explanation = "telemetry is stale: rolled up to 2026-11-20T10:58:50+00:00, 62 min behind"
    assert [
        (item.name, item.observed, item.passed, item.explanation)
        for item in results
        if item.name in TELEMETRY_NAMES
    ] == [(name, None, False, explanation) for name in TELEMETRY_NAMES]


def test_evaluate_exit_stale_explanation_shows_utc():
    stale = make_telemetry(rolled_up_to=datetime(2026, 11, 20, 19, 0, tzinfo=TOKYO))
    assert result(judge(telemetry=stale), "min_requests").explanation == (
        "telemetry is stale: rolled up to 2026-11-20T10:00:00+00:00, 120 min behind"
    )


def test_evaluate_exit_stale_telemetry_still_judges_time_incidents_and_approvals():
    stale = make_telemetry(rolled_up_to=NOW - timedelta(hours=2))
    results = judge(telemetry=stale, approvals=2)
    assert [(item.name, item.passed) for item in results if item.name not in TELEMETRY_NAMES] == [
        ("min_days_in_stage", True),
        ("no_open_incident", True),
        ("approvals", True),
    ]


def test_evaluate_exit_future_rollup_counts_as_fresh():
    results = judge(telemetry=make_telemetry(rolled_up_to=NOW + timedelta(minutes=2)))
    assert [item.passed for item in results if item.name in TELEMETRY_NAMES] == [True] * 5


# --- evaluate_exit: incidents -------------------------------------------------------------


def test_no_open_incident_blocking_incident_fails_and_is_named():
    incidents = [
        Incident("INC-7", STAGE, "high"),
        Incident("INC-8", STAGE, "low"),
        Incident("INC-9", STAGE, "critical"),
    ]
    item = result(judge(incidents=incidents), "no_open_incident")
    assert (item.observed, item.threshold, item.passed) == (2, "high", False)
    assert item.explanation == (
        "2 open incidents at or above high in this stage: INC-7 (high), INC-9 (critical)"
    )


def test_no_open_incident_below_floor_passes():
    item = result(judge(incidents=[Incident("INC-8", STAGE, "medium")]), "no_open_incident")
    assert (item.observed, item.passed) == (0, True)
    assert item.explanation == "no open incident at or above high in this stage"


def test_no_open_incident_other_stage_does_not_count():
    incidents = [Incident("INC-3", OTHER_STAGE, "critical")]
    item = result(judge(incidents=incidents), "no_open_incident")
    assert (item.observed, item.passed) == (0, True)


@pytest.mark.parametrize("floor", SEVERITIES)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_no_open_incident_severity_ordering(severity, floor):
    criteria = make_criteria(block_on_incident_severity=floor)
    item = result(
        judge(criteria, incidents=[Incident("INC-1", STAGE, severity)]), "no_open_incident"
    )
    blocks = SEVERITIES.index(severity) >= SEVERITIES.index(floor)
    assert (item.passed, item.threshold) == (not blocks, floor)


def test_no_open_incident_id_with_newline_stays_one_line():
    item = result(judge(incidents=[Incident("INC\n1", STAGE, "critical")]), "no_open_incident")
    assert item.explanation == "1 open incident at or above high in this stage: INC 1 (critical)"


# --- evaluate_exit: approvals -------------------------------------------------------------


def test_approvals_enough_passes():
    item = result(judge(approvals=2), "approvals")
    assert (item.observed, item.threshold, item.passed) == (2, 2, True)
    assert item.explanation == "2 of 2 required approvals recorded"


def test_approvals_one_short_fails():
    item = result(judge(approvals=1), "approvals")
    assert (item.observed, item.passed) == (1, False)
    assert item.explanation == "1 of 2 required approvals recorded"


def test_approvals_none_needed_passes():
    item = result(judge(make_criteria(approvals_needed=0)), "approvals")
    assert (item.observed, item.threshold, item.passed) == (0, 0, True)
    assert item.explanation == "no approvals required (0 recorded)"


# --- evaluate_tripwire --------------------------------------------------------------------


def test_evaluate_tripwire_rate_at_threshold_fires():
    window = make_telemetry(requests=100, errors=10, flagged=0)
    fired = trip(error_spike(), window=window)
    assert fired == TripwireResult(
        name="error-spike",
        metric="error_rate",
        action="pause",
        fired=True,
        observed=0.1,
        threshold=0.1,
        explanation="fired: error rate 10.0% (10 of 100) in the last 15 min reached the 10.0%"
        " threshold",
    )


def test_evaluate_tripwire_rate_below_threshold_does_not_fire():
    window = make_telemetry(requests=100, errors=9, flagged=0)
    item = trip(error_spike(), window=window)
    assert (item.fired, item.observed) == (False, 0.09)
    assert (
        item.explanation
        == "error rate 9.0% (9 of 100) in the last 15 min is below the 10.0% threshold"
    )


def test_evaluate_tripwire_too_few_requests_does_not_fire():
    window = make_telemetry(requests=99, errors=99, flagged=0)
    item = trip(error_spike(), window=window)
    assert (item.fired, item.observed) == (False, 1.0)
    assert item.explanation == (
        "error rate 100.0% (99 of 99) in the last 15 min: fewer than the 100 requests needed"
        " to judge"
    )


def test_evaluate_tripwire_exactly_min_requests_fires():
    window = make_telemetry(requests=100, errors=100, flagged=0)
    assert trip(error_spike(), window=window).fired is True


def test_evaluate_tripwire_no_requests_with_zero_minimum_does_not_fire():
    window = make_telemetry(requests=0, errors=0, flagged=0)
    item = trip(error_spike(min_requests=0), window=window)
    assert (item.fired, item.observed) == (False, 0.0)


def test_evaluate_tripwire_flag_rate_judges_flagged():
    flags = error_spike(name="flag-spike", metric="flag_rate", threshold=0.05, action="rollback")
    window = make_telemetry(requests=200, errors=0, flagged=10)
    item = trip(flags, window=window)
    assert (item.name, item.metric, item.action, item.fired) == (
        "flag-spike",
        "flag_rate",
        "rollback",
        True,
    )
    assert item.explanation == (
        "fired: flag rate 5.0% (10 of 200) in the last 15 min reached the 5.0% threshold"
    )


def test_evaluate_tripwire_flag_rate_of_a_category_judges_that_category_only():
    cyber = error_spike(
        name="cyber-spike", metric="flag_rate", category="cyber", threshold=0.05, action="pause"
    )
    window = make_telemetry(requests=200, errors=0, flagged=40, flagged_by_category={"cyber": 9})
    item = trip(cyber, window=window)
    assert (item.fired, item.observed) == (False, 0.045)
    assert item.explanation == (
        "cyber flag rate 4.5% (9 of 200) in the last 15 min is below the 5.0% threshold"
    )
    fired = trip(cyber, window=replace(window, flagged_by_category={"cyber": 10}))
    assert (fired.fired, fired.observed) == (True, 0.05)
    assert trip(cyber, window=replace(window, flagged_by_category={})).observed == 0.0


def test_evaluate_tripwire_missing_telemetry_cannot_judge():
    item = trip(error_spike(), window=None)
    assert (item.fired, item.observed, item.threshold) == (False, None, 0.1)
    assert item.explanation == "cannot judge: no telemetry rolled up yet"


def test_evaluate_tripwire_stale_telemetry_cannot_judge():
    window = make_telemetry(requests=100, errors=100, rolled_up_to=NOW - timedelta(minutes=45))
    item = trip(error_spike(), window=window)
    assert (item.fired, item.observed) == (False, None)
    assert item.explanation == (
        "cannot judge: telemetry is stale: rolled up to 2026-11-20T11:15:00+00:00, 45 min behind"
    )


def test_evaluate_tripwire_incident_at_severity_fires():
    incidents = [Incident("INC-4", STAGE, "high"), Incident("INC-5", STAGE, "low")]
    item = trip(serious_incident("high"), incidents=incidents, window=None)
    assert item == TripwireResult(
        name="serious-incident",
        metric="incident",
        action="pause",
        fired=True,
        observed=1,
        threshold="high",
        explanation="fired: 1 open incident at or above high in this stage: INC-4 (high)",
    )


def test_evaluate_tripwire_incident_below_severity_does_not_fire():
    item = trip(serious_incident("critical"), incidents=[Incident("INC-4", STAGE, "high")])
    assert (item.fired, item.observed) == (False, 0)
    assert item.explanation == "no open incident at or above critical in this stage"


def test_evaluate_tripwire_incident_of_other_stage_does_not_fire():
    incidents = [Incident("INC-4", OTHER_STAGE, "critical")]
    assert trip(serious_incident("low"), incidents=incidents).fired is False


@pytest.mark.parametrize("floor", SEVERITIES)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_evaluate_tripwire_incident_severity_ordering(severity, floor):
    item = trip(serious_incident(floor), incidents=[Incident("INC-1", STAGE, severity)])
    assert item.fired is (SEVERITIES.index(severity) >= SEVERITIES.index(floor))


def test_evaluate_tripwire_naive_now_raises():
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        trip(error_spike(), now=NOW.replace(tzinfo=None))


def test_tripwire_result_as_dict_is_json_ready():
    item = trip(error_spike(), window=make_telemetry(requests=100, errors=10, flagged=0))
    assert json.loads(json.dumps(item.as_dict())) == {
        "name": "error-spike",
        "metric": "error_rate",
        "action": "pause",
        "fired": True,
        "observed": 0.1,
        "threshold": 0.1,
        "explanation": "fired: error rate 10.0% (10 of 100) in the last 15 min reached the 10.0%"
        " threshold",
    }
    incident = trip(serious_incident(), incidents=[])
    assert json.loads(json.dumps(incident.as_dict())) == incident.as_dict()


# --- recommend ----------------------------------------------------------------------------


def test_recommend_all_met_without_approvals_advances():
    results = judge(approvals=1)
    assert recommend(results, [], has_next_stage=True) == (
        Recommendation.ADVANCE,
        "every exit criterion is met; approvals: 1 of 2 recorded",
    )


def test_recommend_failing_criteria_holds_and_names_them():
    results = [
        criterion("min_days_in_stage", True),
        criterion("min_requests", False),
        criterion("max_error_rate", False),
        criterion("approvals", False),
    ]
    assert recommend(results, [tripwire_result("error-spike", False)], has_next_stage=True) == (
        Recommendation.HOLD,
        "exit criteria not met: min_requests, max_error_rate",
    )


def test_recommend_stale_telemetry_holds():
    results = judge(telemetry=make_telemetry(rolled_up_to=NOW - timedelta(days=1)), approvals=2)
    assert recommend(results, [], has_next_stage=True) == (
        Recommendation.HOLD,
        "exit criteria not met: " + ", ".join(TELEMETRY_NAMES),
    )


def test_recommend_fired_tripwire_rolls_back_and_names_it():
    tripwires = [
        tripwire_result("flag-spike", False),
        tripwire_result("error-spike", True),
        replace(tripwire_result("serious-incident", True), metric="incident"),
    ]
    assert recommend(judge(approvals=2), tripwires, has_next_stage=True) == (
        Recommendation.ROLLBACK,
        "tripwires fired: error-spike (error_rate), serious-incident (incident)",
    )


def test_recommend_one_fired_tripwire_wins_over_final_stage():
    assert recommend([], [tripwire_result("error-spike", True)], has_next_stage=False) == (
        Recommendation.ROLLBACK,
        "tripwire fired: error-spike (error_rate)",
    )


def test_recommend_final_stage_holds():
    assert recommend([], [tripwire_result("error-spike", False)], has_next_stage=False) == (
        Recommendation.HOLD,
        "final stage: there is no stage to advance to",
    )


def test_recommend_no_exit_results_holds():
    assert recommend([criterion("approvals", True)], [], has_next_stage=True) == (
        Recommendation.HOLD,
        "no exit criteria were evaluated",
    )


def test_recommendation_values_are_strings():
    assert [str(item) for item in Recommendation] == ["advance", "hold", "rollback"]
    assert (
        json.dumps({"recommendation": Recommendation.ROLLBACK}) == '{"recommendation": "rollback"}'
    )


@given(
    st.lists(st.tuples(st.sampled_from(["a", "b", "approvals"]), st.booleans()), max_size=6),
    st.lists(st.booleans(), max_size=4),
    st.booleans(),
)
def test_recommend_explanation_is_one_line(exits, fired, has_next_stage):
    results = [criterion(name, passed) for name, passed in exits]
    tripwires = [tripwire_result(f"t{index}", flag) for index, flag in enumerate(fired)]
    recommendation, explanation = recommend(results, tripwires, has_next_stage=has_next_stage)
    assert explanation.splitlines() == [explanation]
    assert (recommendation is Recommendation.ROLLBACK) == any(fired)
