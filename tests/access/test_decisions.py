"""The decision engine: every reason code ``decide`` and ``key_refusal`` return, and the
invariants that must hold for any org, tier, evidence and stage of the example plan."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from access.decisions import (
    STATUS,
    Decision,
    KeyEntry,
    OrgEntry,
    Reason,
    ReleaseEntry,
    RequestInfo,
    decide,
    key_refusal,
    not_found_message,
)
from rollout.plan_schema import (
    TIERS,
    VERIFICATION_KINDS,
    RolloutPlanDoc,
    cohort_bucket,
    parse_plan,
)
from tests.factories import EXAMPLE_PLAN, TIER_EVIDENCE

PLAN = parse_plan(EXAMPLE_PLAN.read_text())
MODEL = "atlas-2"
NOW = 1_790_000_000.0  # 2026-09-21, POSIX seconds
LATER = NOW + 86_400
KEY = KeyEntry(
    key_id="0123456789abcdef",
    public_id="key_0123456789abcdef",
    digest="0" * 64,
    org_id=1,
    expires_at=None,
    revoked=False,
)
NOT_FOUND = Decision(Reason.UNKNOWN_MODEL, not_found_message(MODEL))

# The commercial stage admits half the eligible orgs; pick one on each side of the line.
IN_COHORT, OUT_OF_COHORT = (
    next(
        slug
        for slug in (f"shop-{n}" for n in range(1000))
        if (cohort_bucket(MODEL, slug) < 5000) is inside
    )
    for inside in (True, False)
)


def _plan(tiers: dict, **stage) -> RolloutPlanDoc:
    """A one-stage plan for tiny-1 (stage ``only``)."""
    return parse_plan(
        {
            "release": "tiny-1",
            "upstream": {"base_url": "http://127.0.0.1:8001/v1", "model": "tiny"},
            "stages": [{"name": "only", "tiers": tiers, **stage}],
        }
    )


def _limits(**overrides) -> dict:
    return {
        "requests_per_minute": 10,
        "tokens_per_minute": 1000,
        "tokens_per_day": 10_000,
        "max_tokens": 500,
        **overrides,
    }


def _org(slug: str, tier: str, *kinds: str, expires_at: float | None = LATER) -> OrgEntry:
    return OrgEntry(
        public_id=f"org_{slug}",
        slug=slug,
        tier=tier,
        verifications=tuple((kind, expires_at) for kind in kinds),
    )


def _verified(slug: str, tier: str, *, expires_at: float | None = LATER) -> OrgEntry:
    """An org holding the usual evidence for its tier."""
    kinds = (TIER_EVIDENCE[tier],) if tier in TIER_EVIDENCE else ()
    return _org(slug, tier, *kinds, expires_at=expires_at)


NORTHWIND = _verified("northwind-research", "research_partner")
ACME = _verified("acme-commercial", "verified_commercial")
TARTU = _verified("tartu-university", "credentialed_academic")
PUBLICDEV = _verified("public-dev", "public")


def _release(
    stage: str = "research_preview", *, state: str = "active", plan: RolloutPlanDoc = PLAN
) -> ReleaseEntry:
    return ReleaseEntry(
        name=plan.release,
        public_id="rel_0001",
        state=state,
        stage=plan.stage(stage),
        upstream_base_url=plan.upstream.base_url,
        upstream_model=plan.upstream.model,
        plan_version=1,
        created=1_780_000_000,
    )


def _decide(
    org: OrgEntry | None,
    release: ReleaseEntry | None,
    *,
    key: KeyEntry | None = KEY,
    model: str | None = None,
    stream: bool = False,
    max_tokens: int | None = None,
    now: float = NOW,
) -> Decision:
    if model is None:
        model = release.name if release is not None else MODEL
    return decide(
        key=key,
        org=org,
        release=release,
        model=model,
        request=RequestInfo("chat.completions", stream=stream, max_tokens=max_tokens),
        now=now,
    )


def _allowed(tier: str, stage: str, plan: RolloutPlanDoc = PLAN) -> Decision:
    limits = plan.stage(stage).tiers[tier].limits
    return Decision(Reason.OK, "allowed", tier=tier, stage=stage, limits=limits)


def _hidden(stage: str, model: str = MODEL) -> Decision:
    return Decision(Reason.MODEL_NOT_AVAILABLE, not_found_message(model), stage=stage)


# --- status table ----------------------------------------------------------------------


def test_status_every_reason_has_one():
    assert set(STATUS) == set(Reason)


# --- keys ------------------------------------------------------------------------------


def test_key_refusal_missing_key_is_invalid_key():
    refusal = key_refusal(None, NOW)
    assert refusal == Decision(Reason.INVALID_KEY, "Invalid API key: not recognised.")
    assert refusal.status == 401


def test_key_refusal_revoked_key_is_key_revoked():
    refusal = key_refusal(replace(KEY, revoked=True), NOW)
    assert refusal == Decision(Reason.KEY_REVOKED, "This API key has been revoked.")
    assert refusal.status == 401


def test_key_refusal_key_past_expiry_is_key_expired():
    refusal = key_refusal(replace(KEY, expires_at=NOW - 1), NOW)
    assert refusal == Decision(Reason.KEY_EXPIRED, "This API key has expired.")
    assert refusal.status == 401


def test_key_refusal_key_expires_at_its_expiry_instant():
    key = replace(KEY, expires_at=NOW)
    assert key_refusal(key, NOW - 0.001) is None
    assert key_refusal(key, NOW).reason == Reason.KEY_EXPIRED


def test_key_refusal_usable_key_is_none():
    assert key_refusal(KEY, NOW) is None


def test_key_refusal_revoked_wins_over_expired():
    key = replace(KEY, revoked=True, expires_at=NOW - 1)
    assert key_refusal(key, NOW).reason == Reason.KEY_REVOKED


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (None, Reason.INVALID_KEY),
        (replace(KEY, revoked=True), Reason.KEY_REVOKED),
        (replace(KEY, expires_at=NOW), Reason.KEY_EXPIRED),
    ],
)
def test_decide_bad_key_refused_before_anything_else(key, reason):
    # Even for a model that does not exist: the key is checked first.
    assert _decide(NORTHWIND, _release(), key=key).reason == reason
    assert _decide(NORTHWIND, None, key=key).reason == reason
    assert _decide(NORTHWIND, None, key=key).visible is True


def test_decide_key_without_organization_is_invalid_key():
    assert _decide(None, _release()) == Decision(
        Reason.INVALID_KEY, "Invalid API key: not recognised."
    )


# --- invisibility ----------------------------------------------------------------------


def test_decide_unknown_model_is_not_found():
    decision = _decide(NORTHWIND, None, model="no-such-model")
    assert decision == Decision(Reason.UNKNOWN_MODEL, not_found_message("no-such-model"))
    assert decision.status == 404
    assert decision.public_reason == Reason.UNKNOWN_MODEL
    assert decision.visible is False


def test_decide_retired_release_is_unknown_model():
    decision = _decide(NORTHWIND, _release(state="retired"))
    assert decision == NOT_FOUND
    assert decision.visible is False


def test_decide_tier_not_admitted_is_model_not_available():
    decision = _decide(ACME, _release("research_preview"))
    assert decision == _hidden("research_preview")
    assert decision.status == 404


@pytest.mark.parametrize(
    ("org", "stage"),
    [
        (ACME, "research_preview"),  # tier not admitted
        (PUBLICDEV, "academic"),  # tier not admitted
        (_verified("meadow-labs", "research_partner"), "research_preview"),  # not allowed
        (_verified("globex-trading", "verified_commercial"), "general"),  # denied
        (_verified(OUT_OF_COHORT, "verified_commercial"), "commercial"),  # out of cohort
    ],
)
def test_decide_model_not_available_answers_like_unknown_model(org, stage):
    decision = _decide(org, _release(stage))
    unknown = _decide(org, None)
    assert decision.reason == Reason.MODEL_NOT_AVAILABLE
    assert decision.public_reason == Reason.UNKNOWN_MODEL
    assert (decision.status, decision.message) == (unknown.status, unknown.message)
    assert decision.visible is False


def test_decide_org_outside_allow_orgs_is_model_not_available():
    outsider = _verified("meadow-labs", "research_partner")
    assert _decide(outsider, _release("research_preview")) == _hidden("research_preview")


def test_decide_org_in_allow_orgs_is_allowed():
    assert _decide(NORTHWIND, _release("research_preview")) == _allowed(
        "research_partner", "research_preview"
    )


@pytest.mark.parametrize("stage", ["commercial", "academic", "general"])
def test_decide_denied_org_is_model_not_available(stage):
    globex = _verified("globex-trading", "verified_commercial")
    assert _decide(globex, _release(stage)) == _hidden(stage)


def test_decide_org_outside_cohort_is_model_not_available():
    org = _verified(OUT_OF_COHORT, "verified_commercial")
    assert _decide(org, _release("commercial")) == _hidden("commercial")


def test_decide_org_inside_cohort_is_allowed():
    org = _verified(IN_COHORT, "verified_commercial")
    assert _decide(org, _release("commercial")) == _allowed("verified_commercial", "commercial")


def test_decide_cohort_of_100_percent_admits_every_org():
    org = _verified(OUT_OF_COHORT, "verified_commercial")
    assert _decide(org, _release("academic")) == _allowed("verified_commercial", "academic")


def test_decide_public_org_is_invisible_until_general():
    for stage in ("research_preview", "commercial", "academic"):
        assert _decide(PUBLICDEV, _release(stage)) == _hidden(stage)
    assert _decide(PUBLICDEV, _release("general")) == _allowed("public", "general")


# --- verifications ---------------------------------------------------------------------


def test_decide_missing_verification_without_public_is_verification_required():
    unverified = _org("northwind-research", "research_partner")
    decision = _decide(unverified, _release("research_preview"))
    assert decision == Decision(
        Reason.VERIFICATION_REQUIRED,
        "'atlas-2' at stage 'research_preview' needs a valid monitoring_agreement verification"
        " for tier research_partner; your organization's is missing or expired.",
        tier="public",
        stage="research_preview",
    )
    assert decision.status == 403
    assert decision.visible is True


def test_decide_wrong_kind_of_verification_is_verification_required():
    org = _org("northwind-research", "research_partner", "business_kyc")
    decision = _decide(org, _release("research_preview"))
    assert decision.reason == Reason.VERIFICATION_REQUIRED


@pytest.mark.parametrize("expires_at", [NOW - 3600, NOW])
def test_decide_expired_verification_without_public_is_verification_required(expires_at):
    org = _verified("northwind-research", "research_partner", expires_at=expires_at)
    decision = _decide(org, _release("research_preview"))
    assert decision.reason == Reason.VERIFICATION_REQUIRED
    assert decision.message == (
        "'atlas-2' at stage 'research_preview' needs a valid monitoring_agreement verification"
        " for tier research_partner; your organization's is missing or expired."
    )


def test_decide_verification_valid_until_its_expiry_instant():
    org = _verified("northwind-research", "research_partner", expires_at=NOW)
    release = _release("research_preview")
    assert _decide(org, release, now=NOW - 0.001) == _allowed(
        "research_partner", "research_preview"
    )
    assert _decide(org, release, now=NOW).reason == Reason.VERIFICATION_REQUIRED


def test_decide_verification_without_expiry_is_valid():
    org = _verified("northwind-research", "research_partner", expires_at=None)
    assert _decide(org, _release("research_preview")) == _allowed(
        "research_partner", "research_preview"
    )


@pytest.mark.parametrize("stage", ["commercial", "academic"])
def test_decide_missing_kyc_at_stage_without_public_is_verification_required(stage):
    org = _org(IN_COHORT, "verified_commercial")
    assert _decide(org, _release(stage)).reason == Reason.VERIFICATION_REQUIRED


@pytest.mark.parametrize("expires_at", [None, NOW - 1])
@pytest.mark.parametrize(
    ("slug", "tier"),
    [
        ("northwind-research", "research_partner"),
        ("acme-commercial", "verified_commercial"),
        ("tartu-university", "credentialed_academic"),
    ],
)
def test_decide_missing_or_expired_verification_with_public_downgrades(slug, tier, expires_at):
    kinds = () if expires_at is None else (TIER_EVIDENCE[tier],)
    org = _org(slug, tier, *kinds, expires_at=expires_at)
    decision = _decide(org, _release("general"))
    assert decision == _allowed("public", "general")
    assert decision.limits == PLAN.stage("general").tiers["public"].limits


def test_decide_downgraded_request_checked_against_public_limits():
    # 4096 fits research_partner's max_tokens but not public's 2048.
    unverified = _org("northwind-research", "research_partner")
    decision = _decide(unverified, _release("general"), max_tokens=4096)
    public = PLAN.stage("general").tiers["public"].limits
    assert decision == Decision(
        Reason.REQUEST_TOO_LARGE,
        "max_tokens 4096 is above this tier's limit of 2048 at stage 'general'.",
        tier="public",
        stage="general",
        limits=public,
    )
    assert _decide(NORTHWIND, _release("general"), max_tokens=4096).reason == Reason.OK


def test_decide_public_tier_verifications_are_required():
    plan = _plan(
        {
            "verified_commercial": {"verifications": ["business_kyc"], "limits": _limits()},
            "public": {"verifications": ["business_kyc"], "limits": _limits(max_tokens=100)},
        }
    )
    release = _release("only", plan=plan)
    assert _decide(_org("plain-dev", "public"), release).reason == Reason.VERIFICATION_REQUIRED
    unverified = _org("shop-unverified", "verified_commercial")
    assert _decide(unverified, release).reason == Reason.VERIFICATION_REQUIRED


# --- pause -----------------------------------------------------------------------------


def test_decide_paused_release_refuses_admitted_org():
    decision = _decide(NORTHWIND, _release("research_preview", state="paused"))
    assert decision == Decision(
        Reason.RELEASE_PAUSED,
        "'atlas-2' is paused by its rollout; try again later.",
        tier="research_partner",
        stage="research_preview",
        limits=PLAN.stage("research_preview").tiers["research_partner"].limits,
    )
    assert decision.status == 403
    assert decision.visible is True


def test_decide_paused_release_refuses_downgraded_org():
    unverified = _org("northwind-research", "research_partner")
    decision = _decide(unverified, _release("general", state="paused"))
    assert decision.reason == Reason.RELEASE_PAUSED
    assert decision.tier == "public"


@pytest.mark.parametrize(
    ("org", "stage"),
    [
        (ACME, "research_preview"),
        (_verified("meadow-labs", "research_partner"), "research_preview"),
        (_verified("globex-trading", "verified_commercial"), "general"),
        (_verified(OUT_OF_COHORT, "verified_commercial"), "commercial"),
    ],
)
def test_decide_paused_release_stays_invisible_to_orgs_not_admitted(org, stage):
    decision = _decide(org, _release(stage, state="paused"))
    assert decision == _hidden(stage)
    assert decision.public_reason == Reason.UNKNOWN_MODEL
    assert decision.visible is False


def test_decide_paused_release_refuses_streaming_as_paused():
    decision = _decide(NORTHWIND, _release(state="paused"), stream=True, max_tokens=10**6)
    assert decision.reason == Reason.RELEASE_PAUSED


# --- request shape ---------------------------------------------------------------------


def test_decide_stream_refused_when_streaming_disabled():
    plan = _plan({"public": {"limits": _limits(streaming=False)}})
    release = _release("only", plan=plan)
    decision = _decide(PUBLICDEV, release, stream=True)
    assert decision == Decision(
        Reason.CAPABILITY_NOT_ALLOWED,
        "Streaming is not allowed for tier public at stage 'only'.",
        tier="public",
        stage="only",
        limits=plan.stage("only").tiers["public"].limits,
    )
    assert decision.status == 403
    assert decision.visible is True


def test_decide_without_stream_allowed_when_streaming_disabled():
    plan = _plan({"public": {"limits": _limits(streaming=False)}})
    assert _decide(PUBLICDEV, _release("only", plan=plan)) == _allowed("public", "only", plan)


def test_decide_stream_allowed_when_streaming_enabled():
    decision = _decide(NORTHWIND, _release("research_preview"), stream=True)
    assert decision == _allowed("research_partner", "research_preview")


def test_decide_max_tokens_above_limit_is_request_too_large():
    decision = _decide(NORTHWIND, _release("research_preview"), max_tokens=4097)
    assert decision == Decision(
        Reason.REQUEST_TOO_LARGE,
        "max_tokens 4097 is above this tier's limit of 4096 at stage 'research_preview'.",
        tier="research_partner",
        stage="research_preview",
        limits=PLAN.stage("research_preview").tiers["research_partner"].limits,
    )
    assert decision.status == 400
    assert decision.visible is True


@pytest.mark.parametrize("max_tokens", [None, 1, 4096])
def test_decide_max_tokens_within_limit_is_allowed(max_tokens):
    decision = _decide(NORTHWIND, _release("research_preview"), max_tokens=max_tokens)
    assert decision == _allowed("research_partner", "research_preview")


def test_decide_limits_follow_the_tier_at_general():
    # verified_commercial gets 8192 at general; the public tier only 2048.
    assert _decide(ACME, _release("general"), max_tokens=8192) == _allowed(
        "verified_commercial", "general"
    )
    assert _decide(PUBLICDEV, _release("general"), max_tokens=8192).reason == (
        Reason.REQUEST_TOO_LARGE
    )


# --- allowed ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("org", "stage"),
    [
        (NORTHWIND, "research_preview"),
        (NORTHWIND, "commercial"),
        (_verified(IN_COHORT, "verified_commercial"), "commercial"),
        (ACME, "academic"),
        (TARTU, "academic"),
        (NORTHWIND, "general"),
        (ACME, "general"),
        (TARTU, "general"),
        (PUBLICDEV, "general"),
    ],
)
def test_decide_admitted_org_is_allowed_with_its_tier_limits(org, stage):
    decision = _decide(org, _release(stage))
    assert decision == _allowed(org.tier, stage)
    assert decision.allowed is True
    assert decision.status == 200
    assert decision.public_reason == Reason.OK
    assert decision.visible is True


# --- properties ------------------------------------------------------------------------

SLUGS = st.sampled_from(
    [
        "northwind-research",
        "meridian-safety-lab",
        "oxbridge-alignment",
        "globex-trading",
        "acme-commercial",
        "tartu-university",
        "public-dev",
        IN_COHORT,
        OUT_OF_COHORT,
    ]
) | st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True)
EXPIRIES = st.none() | st.floats(min_value=NOW - 1000, max_value=NOW + 1000)
KEYS = st.sampled_from(
    [
        KEY,
        None,
        replace(KEY, revoked=True),
        replace(KEY, expires_at=NOW - 1),
        replace(KEY, expires_at=NOW + 1),
    ]
)


@settings(max_examples=300, deadline=None, database=None)
@given(
    key=KEYS,
    slug=SLUGS,
    tier=st.sampled_from(TIERS),
    verifications=st.lists(st.tuples(st.sampled_from(VERIFICATION_KINDS), EXPIRIES), max_size=4),
    stage=st.sampled_from(PLAN.stage_names),
    state=st.sampled_from(["active", "paused", "retired"]),
    stream=st.booleans(),
    max_tokens=st.none() | st.integers(min_value=1, max_value=10_000),
)
def test_decide_invariants_hold_for_any_org_and_stage(
    key, slug, tier, verifications, stage, state, stream, max_tokens
):
    org = OrgEntry(f"org_{slug}", slug, tier, tuple(verifications))
    release = _release(stage, state=state)
    policy = PLAN.stage(stage)

    decision = _decide(org, release, key=key, stream=stream, max_tokens=max_tokens)

    assert decision.status == STATUS[decision.reason]
    if decision.allowed:
        assert decision.tier in policy.tiers
        assert decision.limits == policy.tiers[decision.tier].limits
        assert decision.stage == stage
        assert decision.tier in (tier, "public")
        assert state == "active"
        assert slug not in policy.deny_orgs
        assert policy.allow_orgs is None or slug in policy.allow_orgs
        assert policy.in_cohort(MODEL, slug)
        assert max_tokens is None or max_tokens <= decision.limits.max_tokens
    if decision.reason in (Reason.MODEL_NOT_AVAILABLE, Reason.UNKNOWN_MODEL):
        unknown = _decide(org, None, key=key)
        assert decision.public_reason == Reason.UNKNOWN_MODEL
        assert (decision.status, decision.message) == (unknown.status, unknown.message)
        assert decision.visible is False
    else:
        assert decision.visible is True


def test_decision_engine_imports_without_django():
    # The engine is pure so it can be replayed and fuzzed outside the service: importing it
    # in a fresh interpreter, with no settings, must load no Django module at all.
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    code = (
        "import sys, access.decisions, access.tiers; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'django'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
