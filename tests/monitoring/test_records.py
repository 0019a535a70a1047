"""The usage record's code tables (monitoring/records.py): codes never change, and
every word the proxy, the decision engine and the plans can produce has one (the
tables are copies: ``monitoring`` imports nothing from ``access``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.db import connection

from access.decisions import Reason
from access.models import Tier, VerificationKind
from access.proxy.app import CALLS
from monitoring.models import UsageEvent
from monitoring.records import (
    ENDPOINTS,
    ERRORS,
    REASONS,
    TIERS,
    VERDICTS,
    VERIFICATION_KINDS,
    CodeTable,
    excerpt,
    valid_kinds,
)
from rollout.plan_schema import TIERS as PLAN_TIERS
from rollout.plan_schema import VERIFICATION_KINDS as PLAN_KINDS

ROOT = Path(__file__).resolve().parents[2]

# Rows written years ago are read with today's tables: a code, once given, is never
# renumbered or reused. Add words at the end of a table, and here.
STABLE = {
    "endpoint": {
        1: "chat.completions",
        2: "completions",
        3: "embeddings",
        4: "models",
        5: "access",
        6: "authz",
    },
    "decision": {1: "allow", 2: "deny"},
    "reason": {
        0: "other",
        1: "ok",
        2: "invalid_key",
        3: "key_revoked",
        4: "key_expired",
        5: "unknown_model",
        6: "model_not_available",
        7: "verification_required",
        8: "release_paused",
        9: "rate_limited",
        10: "quota_exceeded",
        11: "capability_not_allowed",
        12: "request_too_large",
        13: "invalid_json",
        14: "invalid_request",
        15: "client_disconnected",
        16: "method_not_allowed",
        17: "policy_store_unavailable",
        18: "limits_unavailable",
        19: "request_timeout",
        20: "content_blocked",
        21: "screening_unavailable",
        22: "screening_requires_proxy",
    },
    "error": {
        0: "",
        1: "upstream_error",
        2: "upstream_timeout",
        3: "upstream_unreachable",
        4: "upstream_incomplete",
        5: "internal_error",
        6: "other",
    },
    "tier": {
        0: "",
        1: "research_partner",
        2: "verified_commercial",
        3: "credentialed_academic",
        4: "public",
    },
}


@pytest.mark.parametrize(
    "table", [ENDPOINTS, VERDICTS, REASONS, ERRORS, TIERS], ids=lambda table: table.name
)
def test_codes_are_the_ones_rows_were_written_with(table: CodeTable):
    stable = STABLE[table.name]
    assert {code: table.words[code] for code in stable} == stable, "a code was renumbered"
    assert all(code > max(stable) for code in set(table.words) - set(stable)), (
        "a new word took a code below the last one given: add it at the end"
    )


def test_verification_bits_are_the_ones_rows_were_written_with():
    assert VERIFICATION_KINDS.bits == {
        "business_kyc": 1,
        "academic_credential": 2,
        "monitoring_agreement": 4,
    }


def test_every_decision_reason_has_a_code():
    assert {reason.value for reason in Reason} <= set(REASONS.codes)


def test_every_refusal_the_proxy_answers_itself_has_a_code():
    # HTTPError(status, "code", ...) in the proxy and the ASGI entry point (the 408).
    sources = [*(ROOT / "access" / "proxy").glob("*.py"), ROOT / "stagegate" / "asgi.py"]
    codes = {
        code
        for path in sources
        for code in re.findall(r'HTTPError\(\s*\d+,\s*"([a-z_]+)"', path.read_text())
    }
    assert {"invalid_json", "method_not_allowed", "request_timeout"} <= codes
    assert codes <= set(REASONS.codes)


def test_every_upstream_error_has_a_code():
    source = (ROOT / "access" / "upstream.py").read_text()
    errors = set(re.findall(r'"(upstream_[a-z_]+)"', source))
    assert {"upstream_error", "upstream_timeout", "upstream_unreachable"} <= errors
    assert errors <= set(ERRORS.codes)


def test_every_endpoint_has_a_code():
    endpoints = {endpoint for endpoint, _suffix in CALLS.values()} | {"models", "access", "authz"}
    assert endpoints == set(ENDPOINTS.codes)


def test_tiers_and_verification_kinds_are_the_plans_and_the_models():
    assert set(TIERS.codes) - {""} == set(PLAN_TIERS) == set(Tier.values)
    assert set(VERIFICATION_KINDS.bits) == set(PLAN_KINDS) == set(VerificationKind.values)


def test_a_code_unknown_to_this_build_reads_as_its_table_and_number():
    assert (REASONS.decode(9), REASONS.decode(999)) == ("rate_limited", "reason:999")
    assert REASONS.decode(REASONS.write("ok")) == "ok"


def test_a_word_without_a_code_is_refused_where_there_is_no_fallback():
    with pytest.raises(ValueError, match="no tier code for 'platinum'"):
        TIERS.write("platinum")
    assert ERRORS.write("upstream_exploded") == ERRORS.codes["other"]


def test_valid_kinds_counts_what_has_not_expired_at_the_time():
    held = (("monitoring_agreement", None), ("business_kyc", 100.0), ("academic_credential", 99.0))
    assert VERIFICATION_KINDS.decode(valid_kinds(held, 99.0)) == {
        "monitoring_agreement",
        "business_kyc",
    }
    assert valid_kinds((), 99.0) == 0


@pytest.mark.django_db
def test_a_code_unknown_to_this_build_reads_the_same_in_sql_and_in_python():
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {UsageEvent._meta.db_table} (created_at, request_id, org, key, tier,"
            " release, stage, endpoint, decision, reason, status, error, streamed,"
            " client_disconnected, flagged, prompt_tokens, completion_tokens, latency_ms)"
            " VALUES ('2026-11-02 09:00:00+00', 'req_1', '', '', 0, 'atlas-2', '', 1, 2, 999,"
            " 400, 0, false, false, false, 0, 0, 1.0)"
        )
    row = UsageEvent.objects.annotate(word=REASONS.words_of("reason")).get()
    assert (row.reason, row.word) == ("reason:999", "reason:999")


def test_excerpt_redacts_keys_replaces_control_characters_and_bounds_length():
    key = "sgk_0123456789abcdef_" + "S" * 43 + "abcdef"
    assert excerpt(f"use {key}\nplease\x00") == "use sgk_0123456789abcdef_[redacted] please\ufffd"
    assert excerpt("é" * 600) == "é" * 500
    assert excerpt("how do I\tmake it", limit=8) == "how do I"


def test_excerpt_redacts_a_key_across_the_cut_before_cutting():
    key = "sgk_0123456789abcdef_" + "S" * 43 + "abcdef"
    text = "x" * 480 + key
    assert excerpt(text) == "x" * 480 + "sgk_0123456789abcdef"
    assert excerpt(text, limit=520) == "x" * 480 + "sgk_0123456789abcdef_[redacted]"
