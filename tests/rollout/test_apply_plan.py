from __future__ import annotations

import pytest
import yaml
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import CommandError

from monitoring.models import AuditEvent
from rollout.models import Release, RolloutPlan, StageTransition
from rollout.plan_schema import PlanInvalid
from rollout.plans import apply_plan, export_plan
from tests.factories import EXAMPLE_PLAN


def _example() -> dict:
    return yaml.safe_load(EXAMPLE_PLAN.read_text())


def _counts() -> tuple[int, int, int, int]:
    return (
        Release.objects.count(),
        RolloutPlan.objects.count(),
        StageTransition.objects.count(),
        AuditEvent.objects.count(),
    )


def test_first_apply_creates_release_in_first_stage(db, ada):
    result = apply_plan(EXAMPLE_PLAN.read_text(), actor=ada, comment="initial")
    release = Release.objects.get(name="atlas-2")
    assert (result.version, result.created_release, result.applied) == (1, True, True)
    assert release.current_stage == "research_preview"
    assert release.active_plan.version == 1
    assert release.active_plan.comment == "initial"
    assert release.upstream_model == _example()["upstream"]["model"]
    transition = StageTransition.objects.get()
    assert (transition.kind, transition.to_stage) == ("create", "research_preview")
    actions = list(AuditEvent.objects.values_list("action", flat=True))
    assert actions == ["plan.applied", "release.created"]


def test_changed_plan_becomes_next_version_with_diff(release, ada):
    doc = _example()
    doc["stages"][0]["tiers"]["research_partner"]["limits"]["requests_per_minute"] = 7
    result = apply_plan(yaml.safe_dump(doc), actor=ada)
    release.refresh_from_db()
    assert (result.version, result.previous_version, release.active_plan.version) == (2, 1, 2)
    assert "+        requests_per_minute: 7" in result.diff
    assert release.current_stage == "research_preview"
    assert RolloutPlan.objects.filter(release=release).count() == 2
    event = AuditEvent.objects.filter(action="plan.applied").last()
    assert (event.data["version"], event.data["previous_version"]) == (2, 1)


def test_identical_plan_stores_nothing(release, ada):
    before = _counts()
    result = apply_plan(EXAMPLE_PLAN.read_text(), actor=ada)
    assert (result.changed, result.applied, result.version) == (False, False, 1)
    assert _counts() == before


def test_dry_run_shows_diff_and_stores_nothing(release, ada):
    doc = _example()
    doc["description"] = "changed"
    before = _counts()
    result = apply_plan(yaml.safe_dump(doc), actor=ada, dry_run=True)
    assert (result.changed, result.applied, result.version) == (True, False, 2)
    assert "+description: changed" in result.diff
    assert _counts() == before


def test_invalid_plan_lists_every_error_and_stores_nothing(release, ada):
    doc = _example()
    doc["stages"][0]["tiers"]["research_partner"]["limits"]["requests_per_minute"] = -1
    doc["stages"][1]["tiers"]["galactic_empire"] = {}
    del doc["upstream"]["model"]
    before = _counts()
    with pytest.raises(PlanInvalid) as invalid:
        apply_plan(yaml.safe_dump(doc), actor=ada)
    paths = {error.path for error in invalid.value.errors}
    assert "stages[0].tiers.research_partner.limits.requests_per_minute" in paths
    assert "upstream.model" in paths
    assert any(path.startswith("stages[1].tiers") for path in paths)
    assert _counts() == before


def test_plan_that_drops_the_current_stage_is_refused(release, ada):
    doc = _example()
    doc["stages"] = doc["stages"][1:]
    for tripwire in doc["stages"][0].get("tripwires", []):
        tripwire["action"] = "pause"  # a first stage has nothing to roll back to
    with pytest.raises(PlanInvalid) as invalid:
        apply_plan(yaml.safe_dump(doc), actor=ada)
    assert [(e.path, e.code) for e in invalid.value.errors] == [("stages", "current_stage_removed")]
    assert RolloutPlan.objects.count() == 1


def test_plan_versions_are_immutable(release):
    plan = release.active_plan
    plan.comment = "rewritten history"
    with pytest.raises(ValidationError, match="immutable"):
        plan.save()


def test_export_then_apply_is_a_no_op(release, ada):
    exported = export_plan(release)
    assert apply_plan(exported, actor=ada).changed is False


def test_apply_plan_command_dry_run_and_apply(db, tmp_path, capsys):
    path = tmp_path / "plan.yaml"
    path.write_text(EXAMPLE_PLAN.read_text())
    call_command("apply_plan", str(path), "--dry-run")
    assert "nothing was applied" in capsys.readouterr().out
    assert not Release.objects.exists()
    call_command("apply_plan", str(path), "--comment", "go")
    assert "applied atlas-2 v1 (release created)" in capsys.readouterr().out
    assert AuditEvent.objects.filter(action="plan.applied").get().actor == "cli:cli"


def test_apply_plan_command_lists_errors_by_path(db, tmp_path, capsys):
    doc = _example()
    doc["stages"][0]["tiers"]["research_partner"]["limits"]["max_tokens"] = "lots"
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(CommandError, match="nothing was applied"):
        call_command("apply_plan", str(path))
    assert "stages[0].tiers.research_partner.limits.max_tokens:" in capsys.readouterr().err
    assert not Release.objects.exists()


def test_apply_plan_command_reports_unreadable_file(db):
    with pytest.raises(CommandError, match="cannot read"):
        call_command("apply_plan", "/nonexistent/plan.yaml")


def test_export_plan_command_prints_canonical_yaml(release, capsys):
    call_command("export_plan", "atlas-2")
    exported = yaml.safe_load(capsys.readouterr().out)
    assert exported["release"] == "atlas-2"
    assert [stage["name"] for stage in exported["stages"]] == [
        "research_preview",
        "commercial",
        "academic",
        "general",
    ]
    with pytest.raises(CommandError, match="no release"):
        call_command("export_plan", "nope")


def test_export_plan_command_gives_past_versions(release, ada, capsys):
    doc = _example()
    doc["description"] = "second version"
    apply_plan(yaml.safe_dump(doc), actor=ada)
    call_command("export_plan", "atlas-2", "--plan-version", "1")
    assert yaml.safe_load(capsys.readouterr().out)["description"] == _example()["description"]
    call_command("export_plan", "atlas-2")
    assert yaml.safe_load(capsys.readouterr().out)["description"] == "second version"
    with pytest.raises(CommandError, match="no plan version 9"):
        call_command("export_plan", "atlas-2", "--plan-version", "9")
