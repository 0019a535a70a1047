"""The rollout plan schema: the example validates, every rule bites, bad input is PlanInvalid.

Pure Python: no database, no Django. The property tests mutate the example plan in ways
that must always be rejected and check that the rejection is a well-formed PlanInvalid,
whether the plan arrives as a mapping or as YAML text.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from rollout import plan_schema
from rollout.plan_schema import (
    MAX_PLAN_BYTES,
    MAX_STAGES,
    SEVERITIES,
    TIERS,
    VERIFICATION_KINDS,
    PlanError,
    PlanInvalid,
    RolloutPlanDoc,
    canonical_dict,
    canonical_yaml,
    cohort_bucket,
    parse_plan,
    plan_digest,
    severity_at_least,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_PATH = REPO / "docs" / "examples" / "atlas-2.yaml"
EXAMPLE_TEXT = EXAMPLE_PATH.read_text(encoding="utf-8")
EXAMPLE = yaml.safe_load(EXAMPLE_TEXT)

# The seeded demo orgs: each must get access in the stage that opens its tier.
DEMO_ORGS = {
    "northwind-research": ("research_partner", "research_preview"),
    "acme-commercial": ("verified_commercial", "commercial"),
    "tartu-university": ("credentialed_academic", "academic"),
    "public-dev": ("public", "general"),
}

CUSTOM_CODES = {
    "assessment_required",
    "assessment_cannot_pass",
    "duplicate_tier",
    "empty_allow_list",
    "duplicate_org",
    "org_allowed_and_denied",
    "duplicate_verification",
    "duplicate_stage",
    "duplicate_tripwire",
    "tier_not_admitted",
    "exit_criteria_required",
    "exit_criteria_on_final_stage",
    "rollback_on_first_stage",
    "max_tokens_above_tokens_per_minute",
    "tokens_per_day_below_tokens_per_minute",
    "threshold_required",
    "threshold_forbidden",
    "severity_required",
    "severity_forbidden",
    "invalid_url",
    "url_credentials",
    "too_short",
    "too_long",
    "yaml_syntax",
    "yaml_value",
    "duplicate_key",
    "encoding",
    "empty_document",
    "not_a_mapping",
    "too_large",
    "too_deep",
    "empty_keyword",
    "duplicate_keyword",
    "duplicate_pattern",
    "invalid_pattern",
    "pattern_matches_empty",
    "route_to_required",
    "route_to_forbidden",
    "route_to_self",
    "empty_rule",
    "duplicate_category",
    "category_blocked_and_flagged",
    "nothing_to_screen",
    "category_forbidden",
}


def example() -> dict[str, Any]:
    """A fresh, mutable copy of the example plan as parsed YAML."""
    return copy.deepcopy(EXAMPLE)


def assert_well_formed(exc: PlanInvalid) -> None:
    assert isinstance(exc.errors, list)
    assert len(exc.errors) >= 1
    for error in exc.errors:
        assert isinstance(error, PlanError)
        assert isinstance(error.path, str) and error.path.strip() != ""
        assert isinstance(error.message, str) and error.message.strip() != ""
        assert re.fullmatch(r"[a-z][a-z0-9_]*", error.code), error.code
    assert str(exc).splitlines() == [f"{e.path}: {e.message}" for e in exc.errors]


def rejected(source: Any) -> list[PlanError]:
    """Parse ``source``, which must fail with a well-formed PlanInvalid; return its errors."""
    with pytest.raises(PlanInvalid) as info:
        parse_plan(source)
    assert_well_formed(info.value)
    return info.value.errors


def problems(source: Any) -> set[tuple[str, str]]:
    """The (path, code) pairs of a rejected plan."""
    return {(error.path, error.code) for error in rejected(source)}


def dotted(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(root)"


# --- the example ------------------------------------------------------------------------


def test_example_plan_validates():
    doc = parse_plan(EXAMPLE_TEXT)

    assert isinstance(doc, RolloutPlanDoc)
    assert doc.release == "atlas-2"
    assert doc.upstream.base_url == "http://127.0.0.1:8001/v1"
    assert doc.upstream.model == "atlas-2-2026-11"
    assert doc.stage_names == ["research_preview", "commercial", "academic", "general"]


def test_example_plan_opens_one_more_tier_per_stage():
    doc = parse_plan(EXAMPLE_TEXT)

    admitted = [[tier for tier in TIERS if stage.admits(tier)] for stage in doc.stages]

    assert admitted == [list(TIERS[:1]), list(TIERS[:2]), list(TIERS[:3]), list(TIERS)]


def test_example_plan_admits_demo_orgs_from_their_stage_on():
    doc = parse_plan(EXAMPLE_TEXT)

    for org, (tier, first_stage) in DEMO_ORGS.items():
        for stage in doc.stages[doc.stage_names.index(first_stage) :]:
            assert stage.admits(tier)
            assert org not in stage.deny_orgs
            assert stage.allow_orgs is None or org in stage.allow_orgs
            assert stage.in_cohort(doc.release, org) is True


def test_example_plan_first_stage_excludes_later_tiers():
    doc = parse_plan(EXAMPLE_TEXT)

    assert doc.stages[0].admits("public") is False
    assert doc.stages[0].admits("verified_commercial") is False


def test_example_plan_is_json_too():
    from_json = parse_plan(json.dumps(EXAMPLE))

    assert plan_digest(from_json) == plan_digest(parse_plan(EXAMPLE_TEXT))


def test_example_plan_bytes_with_bom_parse_like_text():
    doc = parse_plan(b"\xef\xbb\xbf" + EXAMPLE_TEXT.encode())

    assert doc == parse_plan(EXAMPLE_TEXT)


# --- canonical form ------------------------------------------------------------------------


def test_canonical_round_trip_is_stable():
    doc = parse_plan(EXAMPLE_TEXT)

    again = parse_plan(canonical_yaml(doc))

    assert again == doc
    assert canonical_dict(again) == canonical_dict(doc)
    assert canonical_yaml(again) == canonical_yaml(doc)
    assert plan_digest(again) == plan_digest(doc)


def test_canonical_dict_includes_defaults():
    data = canonical_dict(parse_plan(EXAMPLE_TEXT))

    public = data["stages"][3]["tiers"]["public"]
    assert public["verifications"] == []
    assert data["stages"][0]["deny_orgs"] == []
    assert data["stages"][1]["allow_orgs"] is None
    assert data["stages"][3]["exit_criteria"] is None
    assert data["stages"][0]["tripwires"][3]["threshold"] is None
    assert data["stages"][0]["tripwires"][3]["window_minutes"] == 60
    assert list(data) == ["release", "description", "upstream", "stages", "assessment"]


def test_plan_digest_ignores_order_of_sets():
    plan = example()
    stage = plan["stages"][3]
    stage["tiers"] = dict(reversed(list(stage["tiers"].items())))
    stage["deny_orgs"] = ["zeta-labs", "globex-trading"]
    plan["stages"][2]["deny_orgs"] = ["zeta-labs", "globex-trading"]
    reordered = parse_plan(plan)
    plan["stages"][3]["deny_orgs"].reverse()
    plan["stages"][2]["deny_orgs"].reverse()
    plan["stages"][3]["tiers"] = dict(reversed(list(stage["tiers"].items())))

    assert plan_digest(reordered) == plan_digest(parse_plan(plan))
    assert list(canonical_dict(reordered)["stages"][3]["tiers"]) == list(TIERS)


def test_plan_digest_ints_and_floats_agree():
    plan = example()
    plan["stages"][0]["exit_criteria"]["min_days_in_stage"] = 14.0

    assert plan_digest(parse_plan(plan)) == plan_digest(parse_plan(EXAMPLE_TEXT))


def test_plan_digest_changes_with_a_limit():
    plan = example()
    plan["stages"][3]["tiers"]["public"]["limits"]["max_tokens"] = 2047

    assert plan_digest(parse_plan(plan)) != plan_digest(parse_plan(EXAMPLE_TEXT))


def test_plan_digest_is_sha256_hex():
    assert re.fullmatch(r"[0-9a-f]{64}", plan_digest(parse_plan(EXAMPLE_TEXT)))


@settings(max_examples=150, deadline=None)
@given(
    # Any text a plan may hold: control characters but tab and line breaks are refused.
    description=st.text(
        st.characters(blacklist_categories=("Cc",)) | st.sampled_from("\t\n\r"), max_size=200
    ),
    cohort=st.floats(min_value=0, max_value=100, exclude_min=True),
    flag_rate=st.floats(min_value=0, max_value=1),
    threshold=st.floats(min_value=0, max_value=1, exclude_min=True),
    days=st.one_of(st.integers(0, 3650), st.floats(0, 3650)),
    orgs=st.lists(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True), unique=True),
)
def test_canonical_round_trip_is_stable_for_valid_variations(
    description, cohort, flag_rate, threshold, days, orgs
):
    plan = example()
    plan["description"] = description
    plan["stages"][1]["cohort_percent"] = cohort
    plan["stages"][1]["exit_criteria"]["max_flag_rate"] = flag_rate
    plan["stages"][1]["exit_criteria"]["min_days_in_stage"] = days
    plan["stages"][1]["tripwires"][0]["threshold"] = threshold
    plan["stages"][3]["deny_orgs"] = [org for org in orgs if org not in DEMO_ORGS]
    doc = parse_plan(plan)

    again = parse_plan(canonical_yaml(doc))

    assert again == doc
    assert plan_digest(again) == plan_digest(doc)
    assert parse_plan(yaml.safe_dump(plan)) == doc


# --- navigation and helpers -------------------------------------------------------------------


def test_stage_lookup_by_name():
    doc = parse_plan(EXAMPLE_TEXT)

    assert doc.stage("academic") is doc.stages[2]
    assert doc.stage("nonexistent") is None


def test_next_and_previous_stage_at_the_ends():
    doc = parse_plan(EXAMPLE_TEXT)

    assert doc.next_stage("research_preview") == "commercial"
    assert doc.next_stage("general") is None
    assert doc.previous_stage("commercial") == "research_preview"
    assert doc.previous_stage("research_preview") is None


def test_next_stage_unknown_name_raises_key_error():
    doc = parse_plan(EXAMPLE_TEXT)

    with pytest.raises(KeyError):
        doc.next_stage("nonexistent")
    with pytest.raises(KeyError):
        doc.previous_stage("nonexistent")


def test_parsed_plan_is_frozen():
    doc = parse_plan(EXAMPLE_TEXT)

    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen_instance ValidationError
        doc.release = "other"  # type: ignore[misc]
    assert isinstance(doc.stages, tuple)
    assert isinstance(doc.stages[0].deny_orgs, tuple)


def test_severity_at_least_follows_severities_order():
    assert SEVERITIES == ("low", "medium", "high", "critical")
    assert severity_at_least("critical", "high") is True
    assert severity_at_least("high", "high") is True
    assert severity_at_least("medium", "high") is False


def test_exit_criteria_blocks_exit_at_or_above_level():
    criteria = parse_plan(EXAMPLE_TEXT).stages[0].exit_criteria
    assert criteria is not None

    blocked = [severity for severity in SEVERITIES if criteria.blocks_exit(severity)]

    assert blocked == ["high", "critical"]


def test_cohort_bucket_stable_and_in_range():
    assert cohort_bucket("atlas-2", "acme-commercial") == cohort_bucket(
        "atlas-2", "acme-commercial"
    )
    assert cohort_bucket("atlas-2", "acme-commercial") == 3557
    assert all(0 <= cohort_bucket("atlas-2", f"org-{n}") < 10_000 for n in range(500))


@given(
    org=st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True),
    low=st.floats(min_value=0.01, max_value=100),
    high=st.floats(min_value=0.01, max_value=100),
)
def test_cohort_membership_grows_with_percent(org, low, high):
    low, high = sorted((low, high))
    plan = example()
    plan["stages"][1]["cohort_percent"] = low
    narrow = parse_plan(plan).stages[1]
    plan["stages"][1]["cohort_percent"] = high
    wide = parse_plan(plan).stages[1]

    assert not narrow.in_cohort("atlas-2", org) or wide.in_cohort("atlas-2", org)


def test_cohort_full_percent_admits_everyone():
    stage = parse_plan(EXAMPLE_TEXT).stages[2]

    assert all(stage.in_cohort("atlas-2", f"org-{n}") for n in range(200))


# --- cross-field rules -----------------------------------------------------------------------


def test_limits_max_tokens_above_tokens_per_minute():
    plan = example()
    plan["stages"][3]["tiers"]["public"]["limits"]["max_tokens"] = 40001

    assert problems(plan) == {
        ("stages[3].tiers.public.limits.max_tokens", "max_tokens_above_tokens_per_minute")
    }


def test_limits_tokens_per_day_below_tokens_per_minute():
    plan = example()
    plan["stages"][3]["tiers"]["public"]["limits"]["tokens_per_day"] = 39999

    assert problems(plan) == {
        ("stages[3].tiers.public.limits.tokens_per_day", "tokens_per_day_below_tokens_per_minute")
    }


def test_limits_equal_bounds_valid():
    plan = example()
    plan["stages"][3]["tiers"]["public"]["limits"].update(
        tokens_per_minute=2048, tokens_per_day=2048, max_tokens=2048
    )

    assert parse_plan(plan).stages[3].tiers["public"].limits.tokens_per_day == 2048


def test_stages_duplicate_name():
    plan = example()
    plan["stages"][2]["name"] = "commercial"

    assert problems(plan) == {("stages[2].name", "duplicate_stage")}


def test_tripwires_duplicate_name_within_stage():
    plan = example()
    plan["stages"][1]["tripwires"][2]["name"] = "flag-spike"

    assert problems(plan) == {("stages[1].tripwires[2].name", "duplicate_tripwire")}


def test_tripwires_same_name_in_different_stages_valid():
    doc = parse_plan(EXAMPLE_TEXT)

    assert doc.stages[0].tripwires[0].name == doc.stages[1].tripwires[0].name == "flag-spike"


def test_allow_orgs_empty_list():
    plan = example()
    plan["stages"][0]["allow_orgs"] = []

    errors = rejected(plan)

    assert [(e.path, e.code) for e in errors] == [("stages[0].allow_orgs", "empty_allow_list")]
    assert errors[0].message == (
        "an empty allow list would admit no one; omit the field to admit every org of the"
        " admitted tiers"
    )


@pytest.mark.parametrize("absent", ["missing", "null"])
def test_allow_orgs_absent_means_no_restriction(absent):
    plan = example()
    if absent == "missing":
        del plan["stages"][0]["allow_orgs"]
    else:
        plan["stages"][0]["allow_orgs"] = None

    assert parse_plan(plan).stages[0].allow_orgs is None


def test_orgs_allowed_and_denied():
    plan = example()
    plan["stages"][0]["deny_orgs"] = ["globex-trading", "meridian-safety-lab"]

    assert problems(plan) == {("stages[0].deny_orgs[1]", "org_allowed_and_denied")}


def test_orgs_duplicate_in_deny_list():
    plan = example()
    plan["stages"][1]["deny_orgs"] = ["globex-trading", "globex-trading"]

    assert problems(plan) == {("stages[1].deny_orgs[1]", "duplicate_org")}


def test_orgs_duplicate_in_allow_list():
    plan = example()
    plan["stages"][0]["allow_orgs"].append("northwind-research")

    assert problems(plan) == {("stages[0].allow_orgs[3]", "duplicate_org")}


def test_verifications_duplicate():
    plan = example()
    plan["stages"][1]["tiers"]["verified_commercial"]["verifications"] = [
        "business_kyc",
        "business_kyc",
    ]

    assert problems(plan) == {
        ("stages[1].tiers.verified_commercial.verifications[1]", "duplicate_verification")
    }


def test_verifications_unknown_kind():
    plan = example()
    plan["stages"][1]["tiers"]["verified_commercial"]["verifications"] = ["passport"]

    assert problems(plan) == {
        ("stages[1].tiers.verified_commercial.verifications[0]", "literal_error")
    }


def test_verifications_kinds_are_the_documented_ones():
    assert VERIFICATION_KINDS == ("business_kyc", "academic_credential", "monitoring_agreement")
    assert TIERS == ("research_partner", "verified_commercial", "credentialed_academic", "public")


def test_min_distinct_orgs_per_tier_tier_not_admitted():
    plan = example()
    plan["stages"][1]["exit_criteria"]["min_distinct_orgs_per_tier"]["public"] = 5

    assert problems(plan) == {
        ("stages[1].exit_criteria.min_distinct_orgs_per_tier.public", "tier_not_admitted")
    }


def test_min_distinct_orgs_per_tier_unknown_tier():
    plan = example()
    plan["stages"][1]["exit_criteria"]["min_distinct_orgs_per_tier"]["gold"] = 5

    assert problems(plan) == {
        ("stages[1].exit_criteria.min_distinct_orgs_per_tier.gold", "literal_error")
    }


def test_exit_criteria_missing_on_non_final_stage():
    plan = example()
    del plan["stages"][1]["exit_criteria"]

    assert problems(plan) == {("stages[1].exit_criteria", "exit_criteria_required")}


def test_exit_criteria_present_on_final_stage():
    plan = example()
    plan["stages"][3]["exit_criteria"] = copy.deepcopy(plan["stages"][2]["exit_criteria"])
    plan["stages"][3]["exit_criteria"]["min_distinct_orgs_per_tier"] = {}

    assert problems(plan) == {("stages[3].exit_criteria", "exit_criteria_on_final_stage")}


def test_exit_criteria_null_on_final_stage_valid():
    plan = example()
    plan["stages"][3]["exit_criteria"] = None

    assert parse_plan(plan).stages[3].exit_criteria is None


def test_exit_criteria_defaults_applied():
    plan = example()
    criteria = plan["stages"][0]["exit_criteria"]
    for key in ("min_distinct_orgs_per_tier", "block_on_incident_severity", "approvals_needed"):
        del criteria[key]

    parsed = parse_plan(plan).stages[0].exit_criteria

    assert parsed is not None
    assert (parsed.min_distinct_orgs_per_tier, parsed.block_on_incident_severity) == ({}, "high")
    assert parsed.approvals_needed == 2


def test_exit_criteria_approvals_needed_above_ten():
    plan = example()
    plan["stages"][0]["exit_criteria"]["approvals_needed"] = 11

    assert problems(plan) == {("stages[0].exit_criteria.approvals_needed", "less_than_equal")}


def test_single_stage_plan_needs_no_exit_criteria():
    plan = example()
    plan["stages"] = [plan["stages"][3]]
    for tripwire in plan["stages"][0]["tripwires"]:
        tripwire["action"] = "pause"  # a lone stage has nothing to roll back to

    assert parse_plan(plan).stage_names == ["general"]


@pytest.mark.parametrize("metric", ["flag_rate", "error_rate"])
def test_tripwire_threshold_missing_for_rate_metric(metric):
    plan = example()
    tripwire = plan["stages"][0]["tripwires"][0]
    tripwire["metric"] = metric
    del tripwire["threshold"]

    assert problems(plan) == {("stages[0].tripwires[0].threshold", "threshold_required")}


def test_tripwire_threshold_on_incident():
    plan = example()
    plan["stages"][0]["tripwires"][3]["threshold"] = 0.5

    assert problems(plan) == {("stages[0].tripwires[3].threshold", "threshold_forbidden")}


def test_tripwire_severity_missing_for_incident():
    plan = example()
    del plan["stages"][0]["tripwires"][3]["severity"]

    assert problems(plan) == {("stages[0].tripwires[3].severity", "severity_required")}


def test_tripwire_severity_on_rate_metric():
    plan = example()
    plan["stages"][0]["tripwires"][1]["severity"] = "high"

    assert problems(plan) == {("stages[0].tripwires[1].severity", "severity_forbidden")}


@pytest.mark.parametrize("threshold", [0, 1.01, -0.1])
def test_tripwire_threshold_out_of_range(threshold):
    plan = example()
    plan["stages"][0]["tripwires"][0]["threshold"] = threshold

    assert {path for path, _ in problems(plan)} == {"stages[0].tripwires[0].threshold"}


@pytest.mark.parametrize("minutes", [0, 10081])
def test_tripwire_window_minutes_out_of_range(minutes):
    plan = example()
    plan["stages"][0]["tripwires"][0]["window_minutes"] = minutes

    assert {path for path, _ in problems(plan)} == {"stages[0].tripwires[0].window_minutes"}


def test_tripwire_rollback_on_first_stage():
    plan = example()
    plan["stages"][0]["tripwires"][2]["action"] = "rollback"

    assert problems(plan) == {("stages[0].tripwires[2].action", "rollback_on_first_stage")}


def test_tripwire_rollback_on_later_stage_valid():
    doc = parse_plan(EXAMPLE_TEXT)

    assert doc.stages[1].tripwires[0].action == "rollback"


def test_tripwire_unknown_action():
    plan = example()
    plan["stages"][1]["tripwires"][0]["action"] = "shutdown"

    assert problems(plan) == {("stages[1].tripwires[0].action", "literal_error")}


def test_tiers_empty_mapping_admits_nobody():
    plan = example()
    plan["stages"][0]["tiers"] = {}
    plan["stages"][0]["exit_criteria"]["min_distinct_orgs_per_tier"] = {}
    del plan["stages"][0]["fine_tuning"]  # names a tier, which must be admitted

    stage = parse_plan(plan).stages[0]

    assert [tier for tier in TIERS if stage.admits(tier)] == []


def test_tiers_unknown_tier():
    plan = example()
    plan["stages"][0]["tiers"]["premium"] = copy.deepcopy(
        plan["stages"][0]["tiers"]["research_partner"]
    )

    assert problems(plan) == {("stages[0].tiers.premium", "literal_error")}


def test_stages_empty_list():
    plan = example()
    plan["stages"] = []

    assert problems(plan) == {("stages", "too_short")}


def test_stages_more_than_maximum():
    plan = example()
    last = plan["stages"].pop()
    for n in range(MAX_STAGES):
        stage = copy.deepcopy(plan["stages"][1])
        stage["name"] = f"extra_{n}"
        plan["stages"].append(stage)
    plan["stages"].append(last)

    assert problems(plan) == {("stages", "too_long")}


def test_cohort_percent_zero():
    plan = example()
    plan["stages"][1]["cohort_percent"] = 0

    assert problems(plan) == {("stages[1].cohort_percent", "greater_than")}


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("ftp://127.0.0.1/v1", "invalid_url"),
        ("127.0.0.1:8001/v1", "invalid_url"),
        ("http:///v1", "invalid_url"),
        ("http://127.0.0.1:port/v1", "invalid_url"),
        ("http://127.0.0.1:8001/v1?key=x", "invalid_url"),
        ("http://127.0.0.1 :8001/v1", "invalid_url"),
        ("", "invalid_url"),
        ("https://user:hunter2@upstream.example/v1", "url_credentials"),
    ],
)
def test_upstream_base_url_rejected(url, code):
    plan = example()
    plan["upstream"]["base_url"] = url

    errors = rejected(plan)

    assert [(e.path, e.code) for e in errors] == [("upstream.base_url", code)]
    assert "hunter2" not in str(errors)


def test_upstream_base_url_trailing_slash_removed():
    plan = example()
    plan["upstream"]["base_url"] = "https://inference.example/v1/"

    assert parse_plan(plan).upstream.base_url == "https://inference.example/v1"


def test_release_slug_rejects_uppercase_and_spaces():
    plan = example()
    plan["release"] = "Atlas 2"

    assert problems(plan) == {("release", "string_pattern_mismatch")}


@pytest.mark.parametrize(
    ("path", "value", "code"),
    [
        (("stages", 0, "tiers", "research_partner", "limits", "max_tokens"), True, "int_type"),
        (("stages", 0, "tiers", "research_partner", "limits", "max_tokens"), 4096.0, "int_type"),
        (("stages", 0, "tiers", "research_partner", "limits", "max_tokens"), "4096", "int_type"),
        (("stages", 0, "tiers", "research_partner", "limits", "streaming"), 1, "bool_type"),
        (("stages", 0, "tiers", "research_partner", "limits", "streaming"), "yes", "bool_type"),
        (("stages", 0, "exit_criteria", "max_flag_rate"), "0.01", "float_type"),
        (("stages", 0, "exit_criteria", "max_flag_rate"), True, "float_type"),
        (("stages", 0, "exit_criteria", "max_flag_rate"), math.nan, "finite_number"),
        (("stages", 0, "exit_criteria", "min_days_in_stage"), math.inf, "finite_number"),
        (("stages", 0, "exit_criteria", "min_days_in_stage"), 10**400, "float_type"),
        (("stages", 0, "exit_criteria", "min_requests"), 10**40, "less_than_equal"),
        (("stages", 0, "description"), 7, "string_type"),
    ],
)
def test_scalars_strict_types(path, value, code):
    plan = example()
    set_at(plan, path, value)

    assert problems(plan) == {(dotted(path), code)}


def test_floats_accept_ints():
    plan = example()
    plan["stages"][0]["exit_criteria"]["max_flag_rate"] = 0

    assert parse_plan(plan).stages[0].exit_criteria.max_flag_rate == 0.0  # type: ignore[union-attr]


def test_errors_reports_all_problems_at_once():
    plan = example()
    plan["release"] = "Atlas"
    plan["upstream"]["base_url"] = "ftp://x"
    plan["stages"][1]["deny_orgs"] = []
    plan["stages"][1]["tiers"]["verified_commercial"]["limits"]["max_tokens"] = 10**6
    plan["stages"][2]["cohort_percent"] = 101
    plan["stages"][3]["tripwires"][0]["windw"] = 3

    assert problems(plan) == {
        ("release", "string_pattern_mismatch"),
        ("upstream.base_url", "invalid_url"),
        (
            "stages[1].tiers.verified_commercial.limits.max_tokens",
            "max_tokens_above_tokens_per_minute",
        ),
        ("stages[2].cohort_percent", "less_than_equal"),
        ("stages[3].tripwires[0].windw", "extra_forbidden"),
    }


def test_errors_for_odd_keys_have_readable_paths():
    plan = example()
    plan[""] = 1
    plan["two words"] = 2

    paths = {path for path, _ in problems(plan)}

    assert paths == {'[""]', '["two words"]'}


def test_non_string_key_is_reported_at_its_parent_not_as_an_index():
    plan = example()
    plan["upstream"][3] = "x"

    assert problems(plan) == {("upstream", "key_not_string")}


def test_plan_invalid_str_lists_path_message_lines():
    plan = example()
    del plan["release"]
    plan["stages"][0]["name"] = "Research Preview"

    with pytest.raises(PlanInvalid) as info:
        parse_plan(plan)

    assert str(info.value).splitlines() == [
        "release: field required",
        "stages[0].name: string should match pattern '^[a-z][a-z0-9_]{0,39}$'",
    ]


def test_plan_invalid_needs_errors():
    with pytest.raises(ValueError):
        PlanInvalid([])


# --- the document as a whole -------------------------------------------------------------------


@pytest.mark.parametrize("root", [[], [1, 2], "atlas-2", 42, 4.2, True])
def test_root_not_a_mapping(root):
    assert problems(root) == {("(root)", "not_a_mapping")}
    assert problems(yaml.safe_dump(root)) == {("(root)", "not_a_mapping")}


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n", "---\n", "null", b""])
def test_root_empty_document(text):
    assert problems(text) == {("(root)", "empty_document")}


def test_yaml_syntax_error_names_line_and_column():
    errors = rejected("release: atlas-2\nstages: [\n  {name: x\n")

    assert [(e.path, e.code) for e in errors] == [("(root)", "yaml_syntax")]
    assert re.search(r"line \d+, column \d+", errors[0].message)


def test_yaml_duplicate_key_rejected():
    text = EXAMPLE_TEXT.replace("max_tokens: 2048\n", "max_tokens: 2048\n          max_tokens: 9\n")

    errors = rejected(text)

    assert [(e.path, e.code) for e in errors] == [("(root)", "duplicate_key")]
    assert "'max_tokens'" in errors[0].message and "line " in errors[0].message


def test_yaml_merge_keys_may_be_overridden():
    text = """
release: r
upstream: {base_url: "http://upstream.example/v1", model: m}
stages:
  - name: only
    tiers:
      research_partner:
        limits: &base {requests_per_minute: 1, tokens_per_minute: 10, tokens_per_day: 10,
                       max_tokens: 10}
      public:
        limits:
          <<: *base
          max_tokens: 5
"""
    tiers = parse_plan(text).stages[0].tiers

    assert (tiers["research_partner"].limits.max_tokens, tiers["public"].limits.max_tokens) == (
        10,
        5,
    )


def test_yaml_python_tags_rejected():
    errors = rejected("release: !!python/object/apply:os.system ['true']\n")

    assert [(e.path, e.code) for e in errors] == [("(root)", "yaml_syntax")]


@pytest.mark.parametrize(
    "text",
    ["a: !!bool maybe", "a: !!timestamp nope", "a: !!int ''", "a: !!float ''", "a: 2026-13-45"],
)
def test_yaml_unreadable_values_rejected(text):
    assert problems(text) == {("(root)", "yaml_value")}


def test_yaml_huge_integer_literal_rejected():
    text = EXAMPLE_TEXT.replace("max_tokens: 2048", "max_tokens: " + "9" * 5000)

    assert problems(text) == {("(root)", "yaml_value")}


def test_yaml_too_deep_rejected():
    assert problems("release: " + "[" * 5000 + "]" * 5000) == {("(root)", "too_deep")}


def test_document_too_large_rejected():
    assert problems("#" * (MAX_PLAN_BYTES + 1)) == {("(root)", "too_large")}
    assert problems(b"#" * (MAX_PLAN_BYTES + 1)) == {("(root)", "too_large")}


def test_bytes_not_utf8_rejected():
    assert problems(b"release: \xff\xfe\n") == {("(root)", "encoding")}


def test_yaml_control_characters_rejected():
    assert problems("release: a\x00b\n") == {("(root)", "yaml_syntax")}


# --- screening ---------------------------------------------------------------------------------

# The example, as an operator writes it in YAML.
SCREENING_YAML = r"""
rules:
  - category: weapons
    action: block
    keywords: ["nerve agent synthesis"]
    patterns: ['\bsarin\b']
  - category: cyber
    action: route
    route_to: atlas-2-mini
    keywords: [ransomware]
classifier:
  url: http://127.0.0.1:8001/v1/moderations
  timeout_ms: 300
  on_failure: refuse
  block: [violence/graphic, sexual/minors]
  flag: [harassment, self-harm]
responses: buffer
retain_flagged: {days: 30}
"""


def screened(screening: dict[str, Any] | str, stage: int = 1) -> dict[str, Any]:
    """The example plan with ``screening`` (a mapping, or YAML text) on one stage."""
    plan = example()
    plan["stages"][stage]["screening"] = (
        yaml.safe_load(screening) if isinstance(screening, str) else screening
    )
    return plan


def rule(**fields: Any) -> dict[str, Any]:
    return {"category": "weapons", "action": "block", "keywords": ["sarin"], **fields}


def test_screening_from_yaml_validates_with_defaults_filled():
    text = yaml.safe_dump(screened(SCREENING_YAML))

    screening = parse_plan(text).stages[1].screening

    assert screening is not None
    assert [(r.category, r.action, r.route_to) for r in screening.rules] == [
        ("weapons", "block", None),
        ("cyber", "route", "atlas-2-mini"),
    ]
    assert screening.rules[0].patterns == (r"\bsarin\b",)
    assert screening.rules[0].case_sensitive is False
    assert screening.classifier is not None
    assert (screening.classifier.model, screening.classifier.block) == (
        "",
        ("sexual/minors", "violence/graphic"),
    )
    assert (screening.responses, screening.retain_flagged.days) == ("buffer", 30)
    assert screening.categories == (
        "cyber",
        "harassment",
        "self-harm",
        "sexual/minors",
        "violence/graphic",
        "weapons",
    )


def test_screening_round_trips_through_canonical_form():
    doc = parse_plan(screened(SCREENING_YAML))

    again = parse_plan(canonical_yaml(doc))

    assert again == doc
    assert plan_digest(again) == plan_digest(doc)
    assert plan_digest(doc) != plan_digest(parse_plan(example()))


def test_plans_without_screening_keep_their_canonical_form():
    # The fields added for screening are left out while they hold their default, so
    # a plan stored before them keeps its canonical text and digest.
    plan = example()
    for stage in plan["stages"]:
        stage.pop("screening", None)
        for tripwire in stage["tripwires"]:
            tripwire.pop("category", None)
        for field in ("max_flag_rate_by_category", "max_confirmed_flag_rate"):
            (stage.get("exit_criteria") or {}).pop(field, None)
    data = canonical_dict(parse_plan(plan))

    assert [sorted(stage) for stage in data["stages"]] == [
        sorted(
            set(plan_stage)
            | {
                "tiers",
                "description",
                "allow_orgs",
                "deny_orgs",
                "cohort_percent",
                "exit_criteria",
                "tripwires",
            }
        )
        for plan_stage in plan["stages"]
    ]
    assert all(
        "category" not in tripwire for stage in data["stages"] for tripwire in stage["tripwires"]
    )
    assert all(
        "max_flag_rate_by_category" not in stage["exit_criteria"] for stage in data["stages"][:-1]
    )


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"sarin(?=\s)", "invalid perl operator: (?="),
        (r"(?<!no )sarin", "invalid perl operator: (?<!"),
        (r"(s)arin\1", "invalid escape sequence: \\1"),
        (r"(sarin", "missing ): (sarin"),
        (r"x{2000}", "invalid repetition size: {2000}"),
    ],
    ids=["lookahead", "lookbehind", "backreference", "unbalanced", "repetition"],
)
def test_screening_pattern_re2_refuses_is_an_error_at_its_field(pattern, reason, capfd):
    plan = screened({"rules": [rule(), rule(patterns=[r"\bsoman\b", pattern])]})

    errors = rejected(plan)

    assert [(e.path, e.code) for e in errors] == [
        ("stages[1].screening.rules[1].patterns[1]", "invalid_pattern")
    ]
    assert errors[0].message == f"RE2 cannot compile this pattern: {reason}"
    # RE2 logs parse errors to stderr through absl unless told not to.
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("pattern", ["", "x*", "^", "(?:)", "a|$"])
def test_screening_pattern_matching_empty_text(pattern):
    plan = screened({"rules": [rule(patterns=[pattern])]})

    assert problems(plan) == {("stages[1].screening.rules[0].patterns[0]", "pattern_matches_empty")}


def test_screening_pattern_repeated():
    plan = screened({"rules": [rule(patterns=["a+b", "c", "a+b"])]})

    assert problems(plan) == {("stages[1].screening.rules[0].patterns[2]", "duplicate_pattern")}


@pytest.mark.parametrize("keyword", ["", "   ", "\u200b\u200d", "\n\t"])
def test_screening_keyword_without_visible_text(keyword):
    plan = screened({"rules": [rule(keywords=["sarin", keyword])]})

    assert problems(plan) == {("stages[1].screening.rules[0].keywords[1]", "empty_keyword")}


def test_screening_keyword_repeated():
    plan = screened({"rules": [rule(keywords=["sarin", "soman", "sarin"])]})

    assert problems(plan) == {("stages[1].screening.rules[0].keywords[2]", "duplicate_keyword")}


def test_screening_rule_needs_a_keyword_or_pattern():
    plan = screened({"rules": [{"category": "weapons", "action": "flag"}]})

    assert problems(plan) == {("stages[1].screening.rules[0]", "empty_rule")}


def test_screening_route_needs_route_to():
    plan = screened({"rules": [rule(action="route")]})

    assert problems(plan) == {("stages[1].screening.rules[0].route_to", "route_to_required")}


@pytest.mark.parametrize("action", ["block", "flag"])
def test_screening_route_to_only_on_route_rules(action):
    plan = screened({"rules": [rule(action=action, route_to="atlas-2-mini")]})

    assert problems(plan) == {("stages[1].screening.rules[0].route_to", "route_to_forbidden")}


def test_screening_route_to_the_plans_own_release():
    plan = screened({"rules": [rule(), rule(action="route", route_to="atlas-2")]})

    errors = rejected(plan)

    assert [(e.path, e.code) for e in errors] == [
        ("stages[1].screening.rules[1].route_to", "route_to_self")
    ]
    assert "'atlas-2'" in errors[0].message


@pytest.mark.parametrize("category", ["violence/graphic", "self-harm", "cyber_2", "x"])
def test_screening_category_names_like_openai_moderation(category):
    plan = screened({"rules": [rule(category=category)]})

    assert parse_plan(plan).stages[1].screening.rules[0].category == category


@pytest.mark.parametrize("category", ["Violence", "2cyber", "", "a b", "x" * 65])
def test_screening_category_malformed(category):
    plan = screened({"rules": [rule(category=category)]})

    assert problems(plan) == {("stages[1].screening.rules[0].category", "string_pattern_mismatch")}


@pytest.mark.parametrize("which", ["block", "flag"])
def test_screening_classifier_category_repeated(which):
    classifier = {
        "url": "http://127.0.0.1:8001/v1/moderations",
        which: ["hate", "violence", "hate"],
    }
    plan = screened({"classifier": classifier})

    assert problems(plan) == {(f"stages[1].screening.classifier.{which}[2]", "duplicate_category")}


def test_screening_classifier_category_blocked_and_flagged():
    classifier = {
        "url": "http://127.0.0.1:8001/v1/moderations",
        "block": ["violence"],
        "flag": ["hate", "violence"],
    }
    plan = screened({"classifier": classifier})

    assert problems(plan) == {
        ("stages[1].screening.classifier.flag[1]", "category_blocked_and_flagged")
    }


def test_screening_classifier_lists_are_sets():
    one = {"url": "http://m.example/v1/moderations", "block": ["b", "a"], "flag": ["d", "c"]}
    two = {"url": "http://m.example/v1/moderations", "block": ["a", "b"], "flag": ["c", "d"]}

    assert plan_digest(parse_plan(screened({"classifier": one}))) == plan_digest(
        parse_plan(screened({"classifier": two}))
    )


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("ftp://127.0.0.1/v1/moderations", "invalid_url"),
        ("127.0.0.1:8001/v1/moderations", "invalid_url"),
        ("http://127.0.0.1:8001/v1/moderations?key=x", "invalid_url"),
        ("https://user:hunter2@moderation.example/v1/moderations", "url_credentials"),
    ],
)
def test_screening_classifier_url_rejected(url, code):
    errors = rejected(screened({"classifier": {"url": url}}))

    assert [(e.path, e.code) for e in errors] == [("stages[1].screening.classifier.url", code)]
    assert "hunter2" not in str(errors)


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        (("classifier", "timeout_ms"), 0, "greater_than_equal"),
        (("classifier", "timeout_ms"), 10_001, "less_than_equal"),
        (("classifier", "timeout_ms"), 300.0, "int_type"),
        (("classifier", "on_failure"), "admit", "literal_error"),
        (("classifier", "model"), "omni moderation", "string_pattern_mismatch"),
        (("retain_flagged", "days"), 0, "greater_than_equal"),
        (("retain_flagged", "days"), 366, "less_than_equal"),
        (("responses",), "stream", "literal_error"),
    ],
)
def test_screening_scalars_in_range(field, value, code):
    screening = {
        "rules": [rule()],
        "classifier": {"url": "http://m.example/v1/moderations"},
        "retain_flagged": {"days": 30},
    }
    *parents, name = field
    target = screening
    for parent in parents:
        target = target[parent]
    target[name] = value

    assert problems(screened(screening)) == {(dotted(("stages", 1, "screening", *field)), code)}


@pytest.mark.parametrize("responses", ["buffer", "audit"])
def test_screening_responses_need_rules_or_a_classifier(responses):
    plan = screened({"responses": responses})

    assert problems(plan) == {("stages[1].screening", "nothing_to_screen")}


def test_screening_unknown_key():
    plan = screened({"rules": [rule(keyword=["sarin"])]})

    assert problems(plan) == {("stages[1].screening.rules[0].keyword", "extra_forbidden")}


def test_exit_criteria_category_rates():
    plan = example()
    plan["stages"][0]["exit_criteria"]["max_flag_rate_by_category"] = {
        "weapons": 0.001,
        "cyber": 0,
    }
    plan["stages"][0]["exit_criteria"]["max_confirmed_flag_rate"] = 0.002

    criteria = parse_plan(plan).stages[0].exit_criteria

    assert criteria.max_flag_rate_by_category == {"cyber": 0.0, "weapons": 0.001}
    assert list(criteria.max_flag_rate_by_category) == ["cyber", "weapons"]
    assert criteria.max_confirmed_flag_rate == 0.002


def test_exit_criteria_category_rates_out_of_range():
    plan = example()
    plan["stages"][0]["exit_criteria"]["max_flag_rate_by_category"] = {"weapons": 1.5, "Bad": 0}
    plan["stages"][0]["exit_criteria"]["max_confirmed_flag_rate"] = -0.1

    assert problems(plan) == {
        ("stages[0].exit_criteria.max_flag_rate_by_category.weapons", "less_than_equal"),
        ("stages[0].exit_criteria.max_flag_rate_by_category.Bad", "string_pattern_mismatch"),
        ("stages[0].exit_criteria.max_confirmed_flag_rate", "greater_than_equal"),
    }


def test_tripwire_category_on_flag_rate():
    plan = example()
    plan["stages"][0]["tripwires"][0]["category"] = "weapons"

    assert parse_plan(plan).stages[0].tripwires[0].category == "weapons"
    assert canonical_dict(parse_plan(plan))["stages"][0]["tripwires"][0]["category"] == "weapons"


@pytest.mark.parametrize("index", [2, 3], ids=["error_rate", "incident"])
def test_tripwire_category_only_on_flag_rate(index):
    plan = example()
    plan["stages"][0]["tripwires"][index]["category"] = "weapons"

    assert problems(plan) == {(f"stages[0].tripwires[{index}].category", "category_forbidden")}


# --- the policy reference --------------------------------------------------------------------


def test_policy_reference_embeds_example_verbatim():
    reference = (REPO / "docs" / "policies.md").read_text(encoding="utf-8")

    assert "docs/examples/atlas-2.yaml" in reference
    assert f"```yaml\n{EXAMPLE_TEXT}```" in reference


def test_policy_reference_lists_every_custom_code():
    reference = (REPO / "docs" / "policies.md").read_text(encoding="utf-8")

    assert {code for code in CUSTOM_CODES if f"`{code}`" not in reference} == set()


# --- properties: bad documents are always PlanInvalid ------------------------------------------


def nodes(value: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """Every (path, value) in a parsed document, the root included."""
    found = [(path, value)]
    if isinstance(value, dict):
        for key, child in value.items():
            found += nodes(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += nodes(child, (*path, index))
    return found


def set_at(document: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    parent = document
    for part in path[:-1]:
        parent = parent[part]
    parent[path[-1]] = value
    return document


def delete_at(document: Any, path: tuple) -> Any:
    parent = document
    for part in path[:-1]:
        parent = parent[part]
    del parent[path[-1]]
    return document


def kind(path: tuple) -> str:
    """Which schema object the mapping at ``path`` of the example is."""
    names = [part for part in path if isinstance(part, str)]
    if not path:
        return "plan"
    if path == ("upstream",):
        return "upstream"
    if path[-1] == "tiers":
        return "tier_map"
    if len(path) >= 2 and path[-2] == "tiers":
        return "tier_policy"
    if path[-1] == "min_distinct_orgs_per_tier":
        return "tier_counts"
    if isinstance(path[-1], int):
        return "tripwire" if names[-1] == "tripwires" else "stage"
    return path[-1]  # limits, exit_criteria


REQUIRED = {
    "plan": {"release", "upstream", "stages"},
    "upstream": {"base_url", "model"},
    # exit_criteria appears in the example only where it is required.
    "stage": {"name", "tiers", "exit_criteria"},
    "tier_policy": {"limits"},
    "limits": {"requests_per_minute", "tokens_per_minute", "tokens_per_day", "max_tokens"},
    "exit_criteria": {
        "min_days_in_stage",
        "min_requests",
        "min_distinct_orgs",
        "max_flag_rate",
        "max_error_rate",
    },
    # threshold and severity appear in the example only where the metric requires them.
    "tripwire": {"name", "metric", "action", "threshold", "severity"},
}

EXAMPLE_NODES = nodes(EXAMPLE)
REQUIRED_PATHS = [
    path
    for path, _ in EXAMPLE_NODES
    if path and isinstance(path[-1], str) and path[-1] in REQUIRED.get(kind(path[:-1]), ())
]
NUMBER_PATHS = [
    path
    for path, value in EXAMPLE_NODES
    if isinstance(value, (int, float)) and not isinstance(value, bool)
]
# Mappings where an unknown key is an error (any category is a key of the by-category one).
MAPPING_PATHS = [
    path
    for path, value in EXAMPLE_NODES
    if isinstance(value, dict) and path[-1:] != ("max_flag_rate_by_category",)
]
ALL_PATHS = [path for path, _ in EXAMPLE_NODES]
# Fields that may be null (their default): null there is valid, not a wrong type. Read
# from the schema, so a field added later is known here. By name only: a tripwire's
# `category` may be null, a rule's may not (a rule's gets the other wrong types).
NULLABLE = {
    name
    for model in vars(plan_schema).values()
    if isinstance(model, type) and issubclass(model, BaseModel)
    for name, field in model.model_fields.items()
    if not field.is_required() and field.default is None
}
STAGE_COUNT = len(EXAMPLE["stages"])

# Upper case: no schema object has such a key, and no category (a mapping's keys where
# any category may be one) can be one.
unknown_keys = st.from_regex(r"X_[a-z0-9_]{0,12}", fullmatch=True)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
# A mapping with a key no schema object has: invalid wherever it is put.
poison = st.dictionaries(unknown_keys, json_values, min_size=1, max_size=3)
junk = st.one_of(
    poison,
    st.tuples(st.lists(json_values, max_size=3), poison, st.lists(json_values, max_size=3)).map(
        lambda parts: [*parts[0], parts[1], *parts[2]]
    ),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)


def wrong_type_for(value: Any) -> st.SearchStrategy[Any]:
    """Values of a type the node holding ``value`` never accepts."""
    if isinstance(value, bool):
        return st.one_of(st.integers(), st.text(), st.lists(st.integers(), max_size=2), poison)
    if isinstance(value, (int, float)):
        return st.one_of(st.none(), st.booleans(), st.text(), st.lists(scalars, max_size=2))
    if isinstance(value, str):
        return st.one_of(
            st.none(), st.booleans(), st.integers(), st.floats(), st.lists(st.text(), max_size=2)
        )
    if isinstance(value, list):
        return st.one_of(st.booleans(), st.integers(), st.text(), poison)
    return st.one_of(st.none(), st.booleans(), st.integers(), st.text(), st.lists(scalars))


@st.composite
def bad_plans(draw: st.DrawFn) -> tuple[Any, set[str]]:
    """A mutated example that must be rejected, and paths the rejection must mention."""
    plan = example()
    mutation = draw(
        st.sampled_from(
            [
                "drop_required",
                "wrong_type",
                "negative",
                "huge",
                "unknown_key",
                "unknown_tier",
                "duplicate_stage",
                "junk",
                "non_mapping_root",
            ]
        )
    )
    if mutation == "drop_required":
        path = draw(st.sampled_from(REQUIRED_PATHS))
        return delete_at(plan, path), {dotted(path)}
    if mutation == "wrong_type":
        path = draw(st.sampled_from(ALL_PATHS[1:]))
        original = dict(nodes(plan))[path]
        wrong = wrong_type_for(original)
        if path[-1] in NULLABLE:
            wrong = wrong.filter(lambda value: value is not None)
        return set_at(plan, path, draw(wrong)), set()
    if mutation == "negative":
        path = draw(st.sampled_from(NUMBER_PATHS))
        number = draw(
            st.integers(max_value=-1)
            | st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False)
        )
        return set_at(plan, path, number), {dotted(path)}
    if mutation == "huge":
        path = draw(st.sampled_from(NUMBER_PATHS))
        number = draw(
            st.integers(min_value=10**13, max_value=10**300)
            | st.floats(min_value=1e13, allow_nan=False)
        )
        return set_at(plan, path, number), {dotted(path)}
    if mutation == "unknown_key":
        path = draw(st.sampled_from(MAPPING_PATHS))
        key = draw(unknown_keys)
        set_at(plan, (*path, key), draw(json_values))
        return plan, {dotted((*path, key))}
    if mutation == "unknown_tier":
        stage = draw(st.integers(0, STAGE_COUNT - 1))
        tier = draw(
            st.from_regex(r"[a-z][a-z_-]{0,15}", fullmatch=True).filter(lambda t: t not in TIERS)
        )
        plan["stages"][stage]["tiers"][tier] = copy.deepcopy(
            EXAMPLE["stages"][0]["tiers"]["research_partner"]
        )
        return plan, {dotted(("stages", stage, "tiers", tier))}
    if mutation == "duplicate_stage":
        first, second = sorted(
            draw(st.lists(st.integers(0, STAGE_COUNT - 1), min_size=2, max_size=2, unique=True))
        )
        plan["stages"][second]["name"] = plan["stages"][first]["name"]
        return plan, {dotted(("stages", second, "name"))}
    if mutation == "junk":
        path = draw(st.sampled_from(ALL_PATHS))
        return set_at(plan, path, draw(junk)), set()
    # Not a mapping: a scalar or list. (A string is parsed as YAML, and text such as
    # "a:" is a mapping, so strings are sent as quoted YAML scalars.)
    root = draw(st.one_of(scalars, st.lists(json_values, max_size=3)))
    if isinstance(root, str):
        root = yaml.safe_dump(root)
    return root, {"(root)"}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=bad_plans())
def test_bad_mapping_always_plan_invalid(case):
    plan, must_mention = case

    paths = {error.path for error in rejected(plan)}

    assert must_mention <= paths


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=bad_plans())
def test_bad_yaml_text_always_plan_invalid_with_same_errors(case):
    plan, _ = case

    from_text = rejected(yaml.safe_dump(plan, sort_keys=False))

    # A str given to parse_plan is YAML text, so only mappings can be compared as such.
    if isinstance(plan, dict):
        assert from_text == rejected(plan)


@settings(max_examples=200, deadline=None)
@given(
    cut=st.integers(0, len(EXAMPLE_TEXT)),
    breakage=st.sampled_from(["\n  - [unclosed", '\n"unterminated', "\n{a: 1", "\n\tkey: tab"]),
)
def test_broken_yaml_text_always_plan_invalid(cut, breakage):
    rejected(EXAMPLE_TEXT[:cut] + breakage)


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_random_text_always_plan_invalid(text):
    rejected(text)


@settings(max_examples=300, deadline=None)
@given(data=st.binary())
def test_random_bytes_always_plan_invalid(data):
    rejected(data)


@settings(max_examples=200, deadline=None)
@given(
    cut=st.integers(0, len(EXAMPLE_TEXT) - 1),
    insert=st.text(alphabet=st.sampled_from(list("[]{}:,-!&*'\"#|>%@`\t\n ?")), min_size=1),
)
def test_example_with_inserted_punctuation_never_crashes(cut, insert):
    # The result may even be valid (inside a comment); what matters is no other exception.
    try:
        parse_plan(EXAMPLE_TEXT[:cut] + insert + EXAMPLE_TEXT[cut:])
    except PlanInvalid as exc:
        assert_well_formed(exc)


def test_non_string_keys_named_at_their_parent_path():
    assert problems("0: x\n") == {("(root)", "key_not_string")}
    text = EXAMPLE_TEXT.replace("  model: atlas-2-2026-11", "  model: atlas-2-2026-11\n  7: seven")
    assert problems(text) == {("upstream", "key_not_string")}


# --- fine-tuning ----------------------------------------------------------------------------


def test_fine_tuning_tiers_share_limits_or_set_their_own():
    plan = example()
    plan["stages"][1]["fine_tuning"] = {
        "tiers": {"research_partner": {}, "verified_commercial": {"max_rows": 5}},
        "max_rows": 100,
        "max_bytes": 1000,
        "jobs_per_day": 2,
    }

    fine_tuning = parse_plan(plan).stages[1].fine_tuning

    assert fine_tuning.limits_for("research_partner").max_rows == 100
    assert fine_tuning.limits_for("verified_commercial").max_rows == 5
    assert fine_tuning.limits_for("verified_commercial").jobs_per_day == 2
    assert fine_tuning.limits_for("public") is None
    assert fine_tuning.dataset.on_flagged == "hold"
    assert fine_tuning.dataset.on_blocked == "reject"


def test_fine_tuning_list_and_mapping_forms_have_one_digest():
    listed, mapped = example(), example()
    listed["stages"][1]["fine_tuning"] = {
        "tiers": ["verified_commercial", "research_partner"],
        "max_rows": 100,
        "max_bytes": 1000,
        "jobs_per_day": 2,
    }
    limits = {"max_rows": 100, "max_bytes": 1000, "jobs_per_day": 2}
    mapped["stages"][1]["fine_tuning"] = {
        "tiers": {"research_partner": limits, "verified_commercial": dict(limits)}
    }

    assert plan_digest(parse_plan(listed)) == plan_digest(parse_plan(mapped))


@pytest.mark.parametrize(
    "fine_tuning, path, code",
    [
        ({"tiers": ["public"], "max_rows": 1, "max_bytes": 1, "jobs_per_day": 1},
         "stages[0].fine_tuning.tiers.public", "tier_not_admitted"),
        ({"tiers": ["research_partner", "research_partner"], "max_rows": 1, "max_bytes": 1,
          "jobs_per_day": 1}, "stages[0].fine_tuning.tiers[1]", "duplicate_tier"),
        ({"tiers": ["research_partner"], "max_bytes": 1, "jobs_per_day": 1},
         "stages[0].fine_tuning.max_rows", "missing"),
        ({"tiers": ["research_partner"], "max_rows": 0, "max_bytes": 1, "jobs_per_day": 1},
         "stages[0].fine_tuning.max_rows", "greater_than_equal"),
        ({"tiers": [], "max_rows": 1, "max_bytes": 1, "jobs_per_day": 1},
         "stages[0].fine_tuning.tiers", "too_short"),
        ({"tiers": ["research_partner"], "max_rows": 1, "max_bytes": 1, "jobs_per_day": 1,
          "dataset": {"on_blocked": "accept"}},
         "stages[0].fine_tuning.dataset.on_blocked", "literal_error"),
    ],
)  # fmt: skip
def test_fine_tuning_errors(fine_tuning, path, code):
    plan = example()
    plan["stages"][0]["fine_tuning"] = fine_tuning

    assert (path, code) in {(error.path, error.code) for error in rejected(plan)}


def test_fine_tuning_needs_the_plans_assessment():
    plan = example()
    del plan["assessment"]

    errors = {(error.path, error.code) for error in rejected(plan)}

    assert ("stages[0].fine_tuning", "assessment_required") in errors


def test_an_assessment_too_small_to_pass_is_refused():
    plan = example()
    plan["assessment"]["must_refuse"] = plan["assessment"]["must_refuse"][:34]

    errors = {(error.path, error.code) for error in rejected(plan)}

    assert errors == {("assessment.must_refuse", "assessment_cannot_pass")}
    plan["assessment"]["max_refusal_drop"] = 0.2
    assert parse_plan(plan).assessment.must_refuse[:1] == tuple(
        plan["assessment"]["must_refuse"][:1]
    )


def test_a_plan_without_fine_tuning_keeps_its_digest():
    plan = example()
    for stage in plan["stages"]:
        stage.pop("fine_tuning", None)
    plan.pop("assessment")

    data = canonical_dict(parse_plan(plan))

    assert "assessment" not in data
    assert all("fine_tuning" not in stage for stage in data["stages"])
