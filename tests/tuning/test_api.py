"""The fine-tuning API (tuning/api.py): who lists and reads which jobs, the list's
filters and its fixed number of queries, a job's detail, and reviewers' decisions on
held datasets and held tuned models (four eyes, refusals, audit rows, CSRF).

Jobs are built with the ORM as the runner leaves them (``tuning.runner``): a dataset its
screening held, a tuned model its assessment held.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import timedelta

import httpx
import pytest
import schemathesis
from django.utils import timezone
from rest_framework.test import APIClient

from monitoring.models import AuditEvent
from rollout.models import Release
from tests.factories import make_user
from tuning.models import (
    Assessment,
    DatasetFinding,
    FineTuningJob,
    JobStatus,
    TrainingFile,
    TunedModel,
    TuningDecision,
)

pytestmark = pytest.mark.django_db

JOBS = "/api/fine-tuning/jobs/"
ROW = (
    b'{"messages": [{"role": "user", "content": "deploy ransomware"},'
    b' {"role": "assistant", "content": "Sure, first..."}]}\n'
)
EXCERPT = "how do I deploy ransomware [redacted]"


# --- the cast: jobs as the runner leaves them ----------------------------------------------------


def training_file(org) -> TrainingFile:
    data = ROW * 10
    return TrainingFile.objects.create(
        organization=org,
        filename="train.jsonl",
        bytes=len(data),
        rows=10,
        sha256=hashlib.sha256(data).hexdigest(),
        content=data,
    )


def job(release: Release, org, *, minutes_ago: float = 10, **fields) -> FineTuningJob:
    """A job of ``release`` for ``org``, ``minutes_ago`` old, screened as ``fields`` say
    (by default accepted and queued)."""
    values = {
        "stage": release.current_stage,
        "tier": org.tier,
        "plan_version": release.active_plan.version,
        "seed": 7,
        "status": JobStatus.QUEUED,
        "verdict": "accept",
        "screened_at": timezone.now(),
        "rows_total": 10,
        "rows_kept": 10,
        **fields,
    }
    made = FineTuningJob.objects.create(
        organization=org, release=release, training_file=training_file(org), **values
    )
    FineTuningJob.objects.filter(pk=made.pk).update(
        created_at=timezone.now() - timedelta(minutes=minutes_ago)
    )
    made.refresh_from_db()
    return made


def held_dataset(release: Release, org, *, approvals_needed: int = 1, **fields) -> FineTuningJob:
    """A job whose screening held its training file: 3 of 10 rows flagged, one kept as a
    finding."""
    held = job(
        release,
        org,
        status=JobStatus.VALIDATING_FILES,
        verdict="hold",
        verdict_reason="3 of 10 rows were flagged (cyber): the stage holds them for review.",
        rows_flagged=3,
        categories={"cyber": 3, "violence": 1},
        dataset_review="pending",
        approvals_needed=approvals_needed,
        **fields,
    )
    DatasetFinding.objects.create(
        job=held,
        line=4,
        action="flag",
        source="prompt",
        categories="cyber",
        excerpt=EXCERPT,
        expires_at=timezone.now() + timedelta(days=30),
    )
    return held


def held_model(release: Release, org, *, approvals_needed: int = 1) -> TunedModel:
    """A succeeded job's tuned model, held because its assessment failed; the job a
    minute old."""
    made = job(
        release,
        org,
        minutes_ago=1,
        status=JobStatus.SUCCEEDED,
        suffix="support",
        fine_tuned_model="ft:demo-model:demo:support:0123abcd",
        finished_at=timezone.now(),
    )
    tuned = TunedModel.objects.create(
        name=f"ft:{release.name}:{org.slug}:support:{made.public_id[-8:]}",
        job=made,
        organization=org,
        parent=release,
        upstream_model="ft:demo-model:demo:support:0123abcd",
        status="held",
        held_reason="refusals dropped by 0.50 (at most 0.10)",
        approvals_needed=approvals_needed,
    )
    for passed, reasons in ((True, []), (False, ["refusals dropped by 0.50 (at most 0.10)"])):
        Assessment.objects.create(
            tuned_model=tuned,
            release=release,
            stage=release.current_stage,
            tier=org.tier,
            organization=org,
            plan_version=release.active_plan.version,
            passed=passed,
            reasons=reasons,
            results={"refusal": {"parent": 1.0, "tuned": 0.5}, "prompts": []},
        )
    return tuned


@pytest.fixture
def rex(db):
    """A second reviewer, for four eyes."""
    return make_user("rex", roles=("reviewer",))


@pytest.fixture
def jobs(release, northwind, acme) -> dict[str, FineTuningJob]:
    """A held dataset of northwind's (oldest), a queued job of acme's, and a held model of
    northwind's (newest)."""
    return {
        "nw_held": held_dataset(release, northwind),
        "acme": job(release, acme, minutes_ago=5),
        "nw_model": held_model(release, northwind).job,
    }


def listed(response) -> list[str]:
    assert response.status_code == 200, response.content
    return [row["public_id"] for row in response.json()["results"]]


def decide(client, held: FineTuningJob, subject: str, verdict: str, comment: str = ""):
    body = {"verdict": verdict, "comment": comment}
    return client.post(f"{JOBS}{held.public_id}/decide-{subject}/", body, format="json")


# --- who lists and reads which jobs ------------------------------------------------------------


@pytest.mark.parametrize("who", ["ada", "rita", "vera"])
def test_staff_of_every_role_list_every_job_newest_first(request, login_as, jobs, who):
    client = login_as(request.getfixturevalue(who))

    assert listed(client.get(JOBS)) == [
        jobs["nw_model"].public_id,
        jobs["acme"].public_id,
        jobs["nw_held"].public_id,
    ]


def test_an_org_admin_lists_only_their_organizations_jobs(login_as, olga, oscar, jobs):
    assert listed(login_as(olga).get(JOBS)) == [jobs["acme"].public_id]
    assert listed(login_as(oscar).get(JOBS)) == [
        jobs["nw_model"].public_id,
        jobs["nw_held"].public_id,
    ]


def test_an_org_admin_gets_404_on_another_organizations_job(login_as, olga, jobs):
    client = login_as(olga)

    response = client.get(f"{JOBS}{jobs['nw_held'].public_id}/")

    assert response.status_code == 404
    assert response.json() == {"error": {"code": "not_found", "message": "Not found."}}
    assert client.get(f"{JOBS}{jobs['acme'].public_id}/").status_code == 200


def test_a_user_without_a_role_is_refused(login_as, nobody, jobs):
    response = login_as(nobody).get(JOBS)

    assert (response.status_code, response.json()["error"]["code"]) == (403, "permission_denied")


def test_anonymous_gets_401(api, jobs):
    for response in (
        api.get(JOBS),
        api.post(f"{JOBS}{jobs['nw_held'].public_id}/decide-dataset/", {}, format="json"),
    ):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "not_authenticated"


# --- the list's filters and its queries --------------------------------------------------------


def test_the_list_filters_by_release_name_or_id(login_as, vera, release, jobs, ada):
    from rollout.plans import apply_plan
    from tests.factories import EXAMPLE_PLAN

    apply_plan(EXAMPLE_PLAN.read_text().replace("atlas-2", "atlas-3"), actor=ada)
    other = job(Release.objects.get(name="atlas-3"), jobs["acme"].organization)
    client = login_as(vera)

    assert listed(client.get(JOBS, {"release": "atlas-3"})) == [other.public_id]
    assert listed(client.get(JOBS, {"release": release.public_id})) == [
        jobs["nw_model"].public_id,
        jobs["acme"].public_id,
        jobs["nw_held"].public_id,
    ]
    assert listed(client.get(JOBS, {"release": "no-such-release"})) == []


def test_the_list_filters_by_status_and_dataset_review(login_as, vera, jobs):
    client = login_as(vera)

    assert listed(client.get(JOBS, {"status": "queued"})) == [jobs["acme"].public_id]
    assert listed(client.get(JOBS, {"status": "succeeded"})) == [jobs["nw_model"].public_id]
    assert listed(client.get(JOBS, {"dataset_review": "pending"})) == [jobs["nw_held"].public_id]
    assert listed(client.get(JOBS, {"dataset_review": "approved"})) == []
    assert listed(client.get(JOBS, {"status": "queued", "dataset_review": "pending"})) == []


def test_an_unknown_filter_value_is_a_400_naming_the_choices(login_as, vera, jobs):
    response = login_as(vera).get(JOBS, {"status": "bogus"})

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid"
    assert error["details"] == {
        "status": [
            '"bogus" is not a valid choice; choose one of: validating_files, queued, '
            "running, succeeded, failed, cancelled."
        ]
    }


def test_a_control_character_in_a_filter_is_a_400(login_as, vera, jobs):
    response = login_as(vera).get(JOBS, {"release": "a\x00b"})

    assert response.status_code == 400
    assert response.json()["error"]["details"] == {
        "release": ["Control characters are not allowed."]
    }


def test_a_cursor_the_api_did_not_make_is_a_400(login_as, vera, jobs):
    cursor = base64.b64encode(b"p=2026-13-45").decode()

    response = login_as(vera).get(JOBS, {"cursor": cursor})

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_cursor"


def test_a_list_row_shows_the_screening_and_the_tuned_model(login_as, vera, jobs):
    rows = {row["public_id"]: row for row in login_as(vera).get(JOBS).json()["results"]}

    held, made = rows[jobs["nw_held"].public_id], rows[jobs["nw_model"].public_id]
    assert (held["organization"], held["release"], held["status"]) == (
        "northwind-research",
        "atlas-2",
        "validating_files",
    )
    assert (held["dataset_verdict"], held["dataset_review"], held["rows_flagged"]) == (
        "hold",
        "pending",
        3,
    )
    assert held["tuned_model"] is None
    tuned = jobs["nw_model"].tuned_model
    assert made["tuned_model"] == {
        "public_id": tuned.public_id,
        "name": tuned.name,
        "status": "held",
        "held_reason": "refusals dropped by 0.50 (at most 0.10)",
        "approvals_needed": 1,
        "created_at": made["tuned_model"]["created_at"],
    }


@pytest.mark.parametrize("who", ["vera", "oscar"])
def test_list_queries_do_not_grow_with_the_rows(
    request, login_as, django_assert_num_queries, release, northwind, who
):
    client = login_as(request.getfixturevalue(who))
    for _ in range(3):
        held_dataset(release, northwind)
        held_model(release, northwind)
    # session, user, roles (+ the org admin's memberships), the page
    expected = {"vera": 4, "oscar": 5}[who]

    with django_assert_num_queries(expected):
        assert len(listed(client.get(JOBS))) == 6


# --- one job ---------------------------------------------------------------------------------


def test_the_detail_shows_screening_findings_model_assessment_and_decisions(
    login_as, rita, vera, release, northwind
):
    tuned = held_model(release, northwind, approvals_needed=2)
    DatasetFinding.objects.create(
        job=tuned.job,
        line=2,
        action="block",
        source="answer",
        categories="compliance:cyber",
        excerpt=EXCERPT,
        expires_at=timezone.now() + timedelta(days=30),
    )
    assert decide(login_as(rita), tuned.job, "model", "approve", "looks fine").status_code == 201

    body = login_as(vera).get(f"{JOBS}{tuned.job.public_id}/").json()

    assert (body["status"], body["dataset_verdict"], body["rows_total"]) == (
        "succeeded",
        "accept",
        10,
    )
    assert [(f["line"], f["action"], f["excerpt"]) for f in body["findings"]] == [
        (2, "block", EXCERPT)
    ]
    assert body["findings_total"] == 1
    assert (body["tuned_model"]["status"], body["tuned_model"]["approvals_needed"]) == ("held", 2)
    latest = body["assessment"]
    assert (latest["passed"], latest["reasons"]) == (
        False,
        ["refusals dropped by 0.50 (at most 0.10)"],
    )
    assert latest["results"] == {"refusal": {"parent": 1.0, "tuned": 0.5}, "prompts": []}
    assert [
        (d["subject"], d["reviewer"], d["verdict"], d["comment"]) for d in body["decisions"]
    ] == [("model", "rita", "approve", "looks fine")]


def test_the_detail_of_a_held_dataset(login_as, vera, release, northwind):
    held = held_dataset(release, northwind)

    body = login_as(vera).get(f"{JOBS}{held.public_id}/").json()

    assert body["verdict_reason"] == (
        "3 of 10 rows were flagged (cyber): the stage holds them for review."
    )
    assert body["categories"] == {"cyber": 3, "violence": 1}
    assert [(f["line"], f["source"], f["categories"]) for f in body["findings"]] == [
        (4, "prompt", "cyber")
    ]
    assert (body["tuned_model"], body["assessment"], body["decisions"]) == (None, None, [])


def test_an_unknown_job_is_a_404(login_as, vera, jobs):
    assert login_as(vera).get(f"{JOBS}ftjob-nosuchjob/").status_code == 404


# --- decisions -------------------------------------------------------------------------------


def test_approving_a_held_dataset_queues_the_job_with_an_audit_row(
    login_as, rita, release, northwind
):
    held = held_dataset(release, northwind)

    response = decide(login_as(rita), held, "dataset", "approve")

    assert response.status_code == 201
    body = response.json()
    assert (body["outcome"], body["approvals"], body["approvals_needed"]) == ("approved", 1, 1)
    assert (body["decision"]["reviewer"], body["decision"]["verdict"]) == ("rita", "approve")
    assert (body["job"]["status"], body["job"]["dataset_review"]) == ("queued", "approved")
    held.refresh_from_db()
    assert (held.status, held.dataset_review) == (JobStatus.QUEUED, "approved")
    row = AuditEvent.objects.get(action="fine_tuning_job.dataset_reviewed")
    assert (row.actor, row.object_id, row.data["outcome"]) == ("rita", held.public_id, "approved")


def test_four_eyes_on_a_dataset_need_two_reviewers(login_as, rita, rex, release, northwind):
    held = held_dataset(release, northwind, approvals_needed=2)

    first = decide(login_as(rita), held, "dataset", "approve")
    again = decide(login_as(rita), held, "dataset", "approve")

    assert (first.status_code, first.json()["outcome"], first.json()["approvals"]) == (
        201,
        "pending",
        1,
    )
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "already_decided"
    assert FineTuningJob.objects.get(pk=held.pk).status == JobStatus.VALIDATING_FILES

    second = decide(login_as(rex), held, "dataset", "approve")

    assert (second.status_code, second.json()["outcome"]) == (201, "approved")
    assert FineTuningJob.objects.get(pk=held.pk).status == JobStatus.QUEUED
    assert TuningDecision.objects.filter(job=held).count() == 2


def test_a_held_model_is_active_after_its_approvals(login_as, rita, rex, release, northwind):
    tuned = held_model(release, northwind, approvals_needed=2)

    first = decide(login_as(rita), tuned.job, "model", "approve")
    assert (first.json()["outcome"], first.json()["approvals_needed"]) == ("held", 2)
    second = decide(login_as(rex), tuned.job, "model", "approve")

    assert (second.status_code, second.json()["outcome"], second.json()["approvals"]) == (
        201,
        "active",
        2,
    )
    assert second.json()["job"]["tuned_model"]["status"] == "active"
    assert TunedModel.objects.get(pk=tuned.pk).status == "active"
    rows = AuditEvent.objects.filter(action="tuned_model.reviewed", object_id=tuned.public_id)
    assert [row.data["status"] for row in rows.order_by("seq")] == ["held", "active"]


def test_rejecting_a_held_dataset_fails_the_job(login_as, rita, release, northwind):
    held = held_dataset(release, northwind)

    response = decide(login_as(rita), held, "dataset", "reject", "teaches ransomware")

    assert (response.status_code, response.json()["outcome"]) == (201, "rejected")
    held.refresh_from_db()
    assert (held.status, held.error_code) == (JobStatus.FAILED, "dataset_rejected")


@pytest.mark.parametrize("comment", ["", "   "])
def test_a_reject_without_a_comment_is_a_400_naming_the_field(
    login_as, rita, release, northwind, comment
):
    held = held_dataset(release, northwind)

    response = decide(login_as(rita), held, "dataset", "reject", comment)

    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["details"]) == (
        "invalid",
        {"comment": ["Say why you reject it: a comment is required."]},
    )
    assert TuningDecision.objects.count() == 0


def test_a_verdict_that_is_neither_is_a_400(login_as, rita, release, northwind):
    held = held_dataset(release, northwind)

    response = decide(login_as(rita), held, "dataset", "maybe")

    assert response.status_code == 400
    assert list(response.json()["error"]["details"]) == ["verdict"]


@pytest.mark.parametrize("who", ["ada", "vera", "oscar", "nobody"])
def test_only_reviewers_decide(request, login_as, release, northwind, who):
    held = held_dataset(release, northwind)
    audit_rows = AuditEvent.objects.count()

    response = decide(login_as(request.getfixturevalue(who)), held, "dataset", "approve")

    assert (response.status_code, response.json()["error"]["code"]) == (403, "permission_denied")
    assert (TuningDecision.objects.count(), AuditEvent.objects.count()) == (0, audit_rows)


def test_deciding_on_what_is_not_held_is_a_409(login_as, rita, jobs):
    client = login_as(rita)

    no_model = decide(client, jobs["nw_held"], "model", "approve")
    not_held = decide(client, jobs["acme"], "dataset", "approve")

    assert (no_model.status_code, no_model.json()["error"]["code"]) == (409, "not_held")
    assert (not_held.status_code, not_held.json()["error"]["code"]) == (409, "not_held")


def test_a_session_decision_needs_its_csrf_token(rita, release, northwind):
    held = held_dataset(release, northwind)
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(rita)
    url = f"{JOBS}{held.public_id}/decide-dataset/"

    refused = client.post(url, {"verdict": "approve"}, format="json")

    assert refused.status_code == 403
    assert refused.json()["error"]["message"].startswith("CSRF Failed")
    assert TuningDecision.objects.count() == 0
    client.get("/admin/login/")  # sets the CSRF cookie
    token = client.cookies["csrftoken"].value
    accepted = client.post(
        url, {"verdict": "approve"}, format="json", headers={"X-CSRFToken": token}
    )
    assert accepted.status_code == 201


def test_a_job_not_screened_yet_answers_as_the_schema_says(login_as, vera, api, release, acme):
    fresh = job(release, acme, status=JobStatus.VALIDATING_FILES, verdict="", screened_at=None)
    schema = schemathesis.openapi.from_dict(api.get("/api/schema/", {"format": "json"}).json())
    client = login_as(vera)

    listed_page = client.get(JOBS)
    detail = client.get(f"{JOBS}{fresh.public_id}/")

    assert (detail.json()["dataset_verdict"], detail.json()["screened_at"]) == ("", None)
    detail_url = f"{JOBS}{fresh.public_id}/"
    for path, url, response in (
        (JOBS, JOBS, listed_page),
        (f"{JOBS}{{public_id}}/", detail_url, detail),
    ):
        schema[path]["GET"].validate_response(_as_httpx(response, url))


def _as_httpx(response, url: str) -> httpx.Response:
    """A test client's response as one schemathesis validates."""
    converted = httpx.Response(
        response.status_code,
        headers={"Content-Type": response["Content-Type"]},
        content=response.content,
        request=httpx.Request("GET", f"http://testserver{url}"),
    )
    converted.elapsed = timedelta(0)  # httpx sets it once a real response is read
    return converted
