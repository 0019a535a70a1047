"""/api/plans/validate/, /api/plans/apply/, /api/releases/ and /api/transitions/."""

from __future__ import annotations

import copy

import pytest
import yaml

from monitoring.models import AuditEvent
from rollout.models import RolloutPlan
from rollout.plan_schema import canonical_dict, parse_plan
from tests.factories import EXAMPLE_PLAN

BROKEN_PATHS = [
    "upstream.base_url",
    "stages[0].tiers.research_partner.limits.requests_per_minute",
    "stages[1].exit_criteria.max_flag_rate",
    "colour",
]


@pytest.fixture
def example() -> dict:
    return yaml.safe_load(EXAMPLE_PLAN.read_text())


@pytest.fixture
def edited(example) -> dict:
    """The example plan with one exit criterion raised."""
    doc = copy.deepcopy(example)
    doc["stages"][0]["exit_criteria"]["min_requests"] = 20000
    return doc


@pytest.fixture
def broken(example) -> dict:
    doc = copy.deepcopy(example)
    doc["upstream"]["base_url"] = "ftp://models.internal"
    doc["stages"][0]["tiers"]["research_partner"]["limits"]["requests_per_minute"] = -1
    doc["stages"][1]["exit_criteria"]["max_flag_rate"] = 2
    doc["colour"] = "blue"
    return doc


def _counts() -> tuple[int, int]:
    return RolloutPlan.objects.count(), AuditEvent.objects.count()


# --- validate ----------------------------------------------------------------------------------


@pytest.mark.parametrize("as_text", [False, True], ids=["object", "yaml-string"])
def test_validate_reports_every_error_and_stores_nothing(login_as, ada, release, broken, as_text):
    before = _counts()
    document = yaml.safe_dump(broken) if as_text else broken

    response = login_as(ada).post("/api/plans/validate/", {"document": document}, format="json")

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "plan_invalid"
    assert error["message"].startswith("the rollout plan has 4 errors: ")
    assert [e["path"] for e in error["details"]] == BROKEN_PATHS
    assert [sorted(e) for e in error["details"]] == [["code", "message", "path"]] * 4
    assert _counts() == before


def test_validate_shows_the_diff_and_stores_nothing(login_as, rita, release, edited):
    before = _counts()

    response = login_as(rita).post("/api/plans/validate/", {"document": edited}, format="json")

    assert response.status_code == 200
    body = response.json()
    assert {k: v for k, v in body.items() if k != "diff"} == {
        "valid": True,
        "release": "atlas-2",
        "changed": True,
        "version": 2,
        "previous_version": 1,
        "created_release": False,
    }
    changed = [
        line for line in body["diff"].splitlines() if line[:1] in "+-" and line[:3] not in "+++---"
    ]
    assert changed == ["-    min_requests: 10000", "+    min_requests: 20000"]
    assert _counts() == before


@pytest.mark.parametrize("content_type", ["application/yaml", "text/yaml"])
def test_validate_accepts_a_raw_yaml_body(login_as, ada, release, content_type):
    response = login_as(ada).post(
        "/api/plans/validate/", data=EXAMPLE_PLAN.read_text(), content_type=content_type
    )

    assert response.status_code == 200
    assert (response.json()["changed"], response.json()["diff"]) == (False, "")


def test_validate_reports_yaml_syntax_errors(login_as, ada):
    response = login_as(ada).post(
        "/api/plans/validate/", data="release: [unclosed", content_type="application/yaml"
    )

    assert response.status_code == 400
    assert response.json()["error"]["details"] == [
        {
            "path": "(root)",
            "message": "invalid YAML at line 1, column 19: expected ',' or ']', "
            "but got '<stream end>'",
            "code": "yaml_syntax",
        }
    ]


@pytest.mark.parametrize("body", [{}, {"document": 42}, {"document": ["a"]}])
def test_validate_without_a_document_object_is_invalid(login_as, ada, body):
    response = login_as(ada).post("/api/plans/validate/", body, format="json")

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid"
    assert list(response.json()["error"]["details"]) == ["document"]


def test_validate_refuses_a_plan_without_the_current_stage(login_as, ada, release, example):
    doc = copy.deepcopy(example)
    doc["stages"][0]["name"] = "early_preview"

    response = login_as(ada).post("/api/plans/validate/", {"document": doc}, format="json")

    assert response.status_code == 400
    assert [e["code"] for e in response.json()["error"]["details"]] == ["current_stage_removed"]


@pytest.mark.parametrize("rule", ["allow_orgs", "deny_orgs"])
def test_validate_refuses_an_upper_case_org_slug(login_as, ada, example, rule):
    # Organization slugs are lower case (access.models.validate_org_slug), so a plan
    # naming one in upper case could never match an organization.
    doc = copy.deepcopy(example)
    doc["stages"][0][rule] = ["Northwind-Research"]

    response = login_as(ada).post("/api/plans/validate/", {"document": doc}, format="json")

    assert response.status_code == 400
    assert response.json()["error"]["details"] == [
        {
            "path": f"stages[0].{rule}[0]",
            "message": "string should match pattern '^[a-z0-9][a-z0-9._-]{0,62}$'",
            "code": "string_pattern_mismatch",
        }
    ]


# --- apply -------------------------------------------------------------------------------------


def test_apply_stores_version_two_with_an_audit_row(login_as, ada, release, edited):
    response = login_as(ada).post(
        "/api/plans/apply/", {"document": edited, "comment": "more traffic first"}, format="json"
    )

    assert response.status_code == 201
    body = response.json()
    assert (body["changed"], body["version"], body["previous_version"]) == (True, 2, 1)
    plan = RolloutPlan.objects.get(release=release, version=2)
    assert (plan.comment, plan.created_by) == ("more traffic first", ada)
    release.refresh_from_db()
    assert release.active_plan == plan
    event = AuditEvent.objects.filter(action="plan.applied").last()
    assert (event.actor, event.object_id, event.data["version"], event.data["plan"]) == (
        "ada",
        release.public_id,
        2,
        plan.public_id,
    )


def test_apply_raw_yaml_takes_the_comment_from_the_query(login_as, ada, release, edited):
    response = login_as(ada).post(
        "/api/plans/apply/?comment=from+ci",
        data=yaml.safe_dump(edited),
        content_type="application/yaml",
    )

    assert response.status_code == 201
    assert RolloutPlan.objects.get(version=2).comment == "from ci"


def test_identical_apply_changes_nothing(login_as, ada, release):
    before = _counts()

    response = login_as(ada).post(
        "/api/plans/apply/", data=EXAMPLE_PLAN.read_text(), content_type="application/yaml"
    )

    assert response.status_code == 200
    assert response.json() == {"changed": False, "release": "atlas-2", "version": 1}
    assert _counts() == before


def test_apply_creates_a_new_release(login_as, ada, example):
    doc = {**example, "release": "atlas-3"}

    response = login_as(ada).post("/api/plans/apply/", {"document": doc}, format="json")

    assert response.status_code == 201
    body = response.json()
    assert (body["release"], body["version"], body["created_release"]) == ("atlas-3", 1, True)


@pytest.mark.parametrize("who", ["rita", "vera", "oscar"])
def test_only_rollout_admins_apply(request, login_as, release, edited, who):
    before = _counts()

    response = login_as(request.getfixturevalue(who)).post(
        "/api/plans/apply/", {"document": edited}, format="json"
    )

    assert response.status_code == 403
    assert _counts() == before


def test_invalid_apply_stores_nothing(login_as, ada, release, broken):
    before = _counts()

    response = login_as(ada).post("/api/plans/apply/", {"document": broken}, format="json")

    assert response.status_code == 400
    assert [e["path"] for e in response.json()["error"]["details"]] == BROKEN_PATHS
    assert _counts() == before


def test_apply_refuses_a_pattern_re2_cannot_run(login_as, ada, release, example):
    # RE2 runs in linear time because it has no lookaround: a plan that needs one is
    # refused at the pattern's own path, and nothing is stored.
    doc = copy.deepcopy(example)
    doc["stages"][0]["screening"] = {
        "rules": [{"category": "weapons", "action": "block", "patterns": [r"sarin(?=\s)"]}]
    }
    before = _counts()

    response = login_as(ada).post("/api/plans/apply/", {"document": doc}, format="json")

    assert response.status_code == 400
    assert response.json()["error"]["details"] == [
        {
            "path": "stages[0].screening.rules[0].patterns[0]",
            "message": "RE2 cannot compile this pattern: invalid perl operator: (?=",
            "code": "invalid_pattern",
        }
    ]
    assert _counts() == before


# --- releases and plan history -----------------------------------------------------------------


def test_release_fields(login_as, vera, release):
    response = login_as(vera).get("/api/releases/")

    assert response.status_code == 200
    [row] = response.json()["results"]
    assert {k: v for k, v in row.items() if k not in ("description", "stage_entered_at")} == {
        "public_id": release.public_id,
        "name": "atlas-2",
        "current_stage": "research_preview",
        "state": "active",
        "upstream_model": "atlas-2-2026-11",
        "active_plan_version": 1,
    }
    assert login_as(vera).get(f"/api/releases/{release.public_id}/").json() == row


def test_plan_history_and_canonical_document(login_as, ada, release, edited):
    client = login_as(ada)
    client.post("/api/plans/apply/", {"document": edited, "comment": "v2"}, format="json")

    history = client.get(f"/api/releases/{release.public_id}/plans/").json()["results"]
    assert [(p["version"], p["comment"], p["created_by"]) for p in history] == [
        (2, "v2", "ada"),
        (1, "", "ada"),
    ]
    assert sorted(history[0]) == [
        "comment",
        "created_at",
        "created_by",
        "digest",
        "public_id",
        "version",
    ]

    version = client.get(f"/api/releases/{release.public_id}/plans/2/").json()
    assert version["document"] == canonical_dict(parse_plan(edited))
    assert version["digest"] == history[0]["digest"]


def test_unknown_plan_version_is_404(login_as, ada, release):
    response = login_as(ada).get(f"/api/releases/{release.public_id}/plans/9/")

    assert response.status_code == 404


# --- transitions -------------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["name", "public_id"])
def test_transitions_filter_by_release(login_as, rita, ada, release, example, by):
    login_as(ada).post(
        "/api/plans/apply/", {"document": {**example, "release": "atlas-3"}}, format="json"
    )

    response = login_as(rita).get("/api/transitions/", {"release": getattr(release, by)})

    assert response.status_code == 200
    rows = response.json()["results"]
    assert [(t["release"], t["kind"], t["to_stage"], t["plan_version"]) for t in rows] == [
        ("atlas-2", "create", "research_preview", 1)
    ]
    detail = login_as(rita).get(f"/api/transitions/{rows[0]['public_id']}/").json()
    assert detail == rows[0]
