"""The fine-tuning gate (tuning/gate.py): who may fine-tune which release, with which
file, how often; and tuned models as the proxy serves them (access/snapshot.py)."""

from __future__ import annotations

from access.decisions import KeyEntry, OrgEntry, Reason, ReleaseEntry, RequestInfo, decide
from access.snapshot import held_message, tuned_entry
from tests.factories import EXAMPLE_PLAN
from tuning.gate import (
    DATASET_TOO_LARGE,
    FINE_TUNING_NOT_ALLOWED,
    JOBS_EXCEEDED,
    NOT_A_BASE_MODEL,
    decide_fine_tuning,
)

NOW = 1_800_000_000.0
KEY = KeyEntry("k1", "key_1", "digest", 1, None, False)
EVIDENCE = {
    "research_partner": "monitoring_agreement",
    "verified_commercial": "business_kyc",
    "credentialed_academic": "academic_credential",
}


def org(slug: str, tier: str) -> OrgEntry:
    kinds = ((EVIDENCE[tier], None),) if tier in EVIDENCE else ()
    return OrgEntry(public_id=f"org_{slug}", slug=slug, tier=tier, verifications=kinds)


def release(stage: str, *, state: str = "active") -> ReleaseEntry:
    from rollout.plan_schema import parse_plan

    doc = parse_plan(EXAMPLE_PLAN.read_text())
    return ReleaseEntry(
        name="atlas-2",
        public_id="rel_1",
        state=state,
        stage=doc.stage(stage),
        upstream_base_url="http://upstream/v1",
        upstream_model="atlas-2-2026-11",
        plan_version=1,
        created=0,
    )


def gate(org_entry: OrgEntry, release_entry: ReleaseEntry | None, **request):
    fields = {"rows": 10, "size": 1000, "jobs_today": 0, **request}
    return decide_fine_tuning(
        key=KEY, org=org_entry, release=release_entry, model="atlas-2", now=NOW, **fields
    )


def test_gate_allows_a_tier_the_stage_lets_fine_tune_with_its_limits():
    decision = gate(org("northwind-research", "research_partner"), release("research_preview"))

    assert (decision.code, decision.tier, decision.stage) == (
        "ok",
        "research_partner",
        "research_preview",
    )
    assert decision.limits.max_rows == 10_000


def test_gate_refuses_a_tier_the_stage_admits_but_does_not_let_fine_tune():
    decision = gate(org("tartu-university", "credentialed_academic"), release("general"))

    assert (decision.code, decision.status) == (FINE_TUNING_NOT_ALLOWED, 403)
    assert "credentialed_academic" in decision.message


def test_gate_hides_a_model_the_caller_cannot_see():
    decision = gate(org("acme-commercial", "verified_commercial"), release("research_preview"))

    assert (decision.code, decision.status) == ("unknown_model", 404)


def test_gate_uses_per_tier_limits():
    commercial = release("commercial")
    # verified_commercial has its own max_rows (5,000) and jobs_per_day (5) at commercial
    acme = org("acme-commercial", "verified_commercial")

    assert gate(acme, commercial, rows=5_000).allowed
    assert gate(acme, commercial, rows=5_001).code == DATASET_TOO_LARGE
    assert gate(acme, commercial, jobs_today=5).code == JOBS_EXCEEDED
    assert gate(org("northwind-research", "research_partner"), commercial, rows=5_001).allowed


def test_gate_refuses_a_file_over_the_byte_limit():
    decision = gate(
        org("northwind-research", "research_partner"), release("research_preview"),
        size=10_000_001,
    )  # fmt: skip

    assert (decision.code, decision.status) == (DATASET_TOO_LARGE, 400)


def test_gate_refuses_while_the_release_is_paused():
    decision = gate(
        org("northwind-research", "research_partner"), release("research_preview", state="paused")
    )

    assert decision.code == "release_paused"


def test_gate_refuses_to_fine_tune_a_tuned_model():
    parent = release("general")
    tuned = tuned_entry(
        parent, name="ft:atlas-2:acme:x:abcdefgh", org_slug="acme-commercial",
        upstream_model="ft-up", held="", created=0,
    )  # fmt: skip

    assert gate(org("acme-commercial", "verified_commercial"), tuned).code == NOT_A_BASE_MODEL


# --- tuned models as the proxy serves them ------------------------------------------------


def call(org_entry: OrgEntry, entry: ReleaseEntry):
    return decide(
        key=KEY, org=org_entry, release=entry, model=entry.name,
        request=RequestInfo(endpoint="chat.completions"), now=NOW,
    )  # fmt: skip


def test_a_tuned_model_is_served_only_to_its_organization():
    parent = release("general")
    tuned = tuned_entry(
        parent, name="ft:atlas-2:acme-commercial:x:abcdefgh", org_slug="acme-commercial",
        upstream_model="ft-up", held="", created=0,
    )  # fmt: skip

    assert call(org("acme-commercial", "verified_commercial"), tuned).allowed
    assert call(org("globex", "verified_commercial"), tuned).reason is Reason.MODEL_NOT_AVAILABLE


def test_a_tuned_model_never_opens_wider_than_its_parent():
    # At research_preview only the allow-listed partners may call atlas-2: a tuned model
    # of an org outside that list is served to no one, its owner included.
    parent = release("research_preview")
    tuned = tuned_entry(
        parent, name="ft:atlas-2:other-lab:x:abcdefgh", org_slug="other-lab",
        upstream_model="ft-up", held="", created=0,
    )  # fmt: skip

    assert call(org("other-lab", "research_partner"), tuned).reason is Reason.MODEL_NOT_AVAILABLE
    # ...and at general, tiers that may not fine-tune there do not get its tuned models.
    general = tuned_entry(
        release("general"), name="ft:atlas-2:tartu:x:abcdefgh", org_slug="tartu",
        upstream_model="ft-up", held="", created=0,
    )  # fmt: skip
    assert call(org("tartu", "credentialed_academic"), general).reason is (
        Reason.MODEL_NOT_AVAILABLE
    )


def test_a_tuned_model_follows_its_parents_pause():
    parent = release("general", state="paused")
    tuned = tuned_entry(
        parent, name="ft:atlas-2:acme-commercial:x:abcdefgh", org_slug="acme-commercial",
        upstream_model="ft-up", held="", created=0,
    )  # fmt: skip

    assert call(org("acme-commercial", "verified_commercial"), tuned).reason is (
        Reason.RELEASE_PAUSED
    )


def test_a_held_tuned_model_is_refused_with_its_reason():
    message = held_message("ft:m", "atlas-2", "held", "refusal rate fell from 100% to 80%")
    tuned = tuned_entry(
        release("general"), name="ft:m", org_slug="acme-commercial", upstream_model="ft-up",
        held=message, created=0,
    )  # fmt: skip

    decision = call(org("acme-commercial", "verified_commercial"), tuned)

    assert (decision.reason, decision.status) == (Reason.MODEL_HELD, 403)
    assert "refusal rate fell from 100% to 80%" in decision.message
    assert held_message("ft:m", "atlas-2", "active", "") == ""


def test_the_example_plan_lets_no_public_tier_fine_tune():
    from rollout.plan_schema import parse_plan

    doc = parse_plan(EXAMPLE_PLAN.read_text())

    assert [stage.name for stage in doc.stages if stage.fine_tuning] == [
        "research_preview",
        "commercial",
        "academic",
        "general",
    ]
    assert all("public" not in stage.fine_tuning.tiers for stage in doc.stages)
