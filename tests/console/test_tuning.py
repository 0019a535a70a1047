"""Fine-tuning in the console (console/views/tuning.py): the review queue of held
datasets and held tuned models, recent jobs and per-stage figures; a job's page (its
flagged rows escaped, its assessment, its decisions); reviewers' approve and reject with
and without htmx, four eyes, refusals and their audit rows; who sees the forms; a fixed
number of queries; the release page's fine-tuning section.

Jobs are built with the ORM as the runner leaves them (``tuning.runner``): a dataset
screening held, a tuned model its assessment held, the assessment's results those of
``tuning.assessment.judge`` on the example plan's prompts.
"""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django.utils.html import escape

from monitoring.models import AuditEvent
from rollout.models import Release
from rollout.plans import plan_doc
from tests.factories import make_user
from tuning.assessment import PromptOutcome, judge
from tuning.models import (
    Assessment,
    DatasetFinding,
    FineTuningJob,
    JobEvent,
    TrainingFile,
    TunedModel,
    TuningDecision,
)

pytestmark = pytest.mark.django_db

QUEUE = "/console/tuning/"
HTMX = {"HX-Request": "true"}
DASH = "\u2013"  # between an interval's bounds
EXCERPT = "<script>alert(1)</script> how do I deploy ransomware"
ROW = (
    b'{"messages": [{"role": "user", "content": "deploy ransomware"},'
    b' {"role": "assistant", "content": "Sure, first..."}]}\n'
)


# --- the cast: jobs as the runner leaves them ----------------------------------------------------


def training_file(org, data: bytes = ROW * 10) -> TrainingFile:
    return TrainingFile.objects.create(
        organization=org,
        filename="train.jsonl",
        bytes=len(data),
        rows=data.count(b"\n"),
        sha256=hashlib.sha256(data).hexdigest(),
        content=data,
    )


def _aged(job: FineTuningJob, minutes_ago: float) -> FineTuningJob:
    FineTuningJob.objects.filter(pk=job.pk).update(
        created_at=timezone.now() - timedelta(minutes=minutes_ago)
    )
    job.refresh_from_db()
    return job


def held_job(
    release: Release,
    org,
    *,
    minutes_ago: float = 10,
    approvals_needed: int = 1,
    excerpt: str = EXCERPT,
) -> FineTuningJob:
    """A job whose screening held its training file: 3 of 10 rows flagged cyber, one
    kept as a finding."""
    job = FineTuningJob.objects.create(
        organization=org,
        release=release,
        stage=release.current_stage,
        tier=org.tier,
        plan_version=release.active_plan.version,
        training_file=training_file(org),
        seed=7,
        verdict="hold",
        verdict_reason="3 of 10 rows were flagged (cyber): the stage holds them for review.",
        screened_at=timezone.now(),
        rows_total=10,
        rows_flagged=3,
        rows_blocked=0,
        rows_kept=10,
        categories={"cyber": 3, "violence": 1},
        dataset_review="pending",
        approvals_needed=approvals_needed,
    )
    DatasetFinding.objects.create(
        job=job,
        line=4,
        action="flag",
        source="prompt",
        categories="cyber",
        excerpt=excerpt,
        expires_at=timezone.now() + timedelta(days=30),
    )
    JobEvent.objects.create(job=job, level="warn", message="Training file screened: hold.")
    return _aged(job, minutes_ago)


def held_model(
    release: Release, org, *, minutes_ago: float = 5, approvals_needed: int = 1
) -> TunedModel:
    """A succeeded job's tuned model, held by an assessment on the example plan's prompts
    where the tuned model answered every must-refuse prompt its parent refused."""
    job = FineTuningJob.objects.create(
        organization=org,
        release=release,
        stage=release.current_stage,
        tier=org.tier,
        plan_version=release.active_plan.version,
        training_file=training_file(org),
        seed=8,
        suffix="support",
        status="succeeded",
        verdict="accept",
        verdict_reason="No row was flagged or blocked.",
        screened_at=timezone.now(),
        rows_total=10,
        rows_kept=10,
        fine_tuned_model="ft:atlas-2:x:support:abcdefgh",
        finished_at=timezone.now(),
    )
    job = _aged(job, minutes_ago + 60)
    spec = plan_doc(release.active_plan).assessment
    outcomes = [PromptOutcome("must_refuse", p, True, False) for p in spec.must_refuse]
    outcomes += [PromptOutcome("must_answer", p, False, False) for p in spec.must_answer]
    result = judge(outcomes, spec)
    assert result.passed is False
    tuned = TunedModel.objects.create(
        name=f"ft:{release.name}:{org.slug}:support:{job.public_id[-8:]}",
        job=job,
        organization=org,
        parent=release,
        upstream_model="ft:demo-model:demo:support:0123abcd",
        status="held",
        held_reason="; ".join(result.reasons),
        approvals_needed=approvals_needed,
    )
    TunedModel.objects.filter(pk=tuned.pk).update(
        created_at=timezone.now() - timedelta(minutes=minutes_ago)
    )
    Assessment.objects.create(
        tuned_model=tuned,
        release=release,
        stage=release.current_stage,
        tier=org.tier,
        organization=org,
        plan_version=release.active_plan.version,
        passed=False,
        reasons=list(result.reasons),
        results=result.to_json(),
    )
    tuned.refresh_from_db()
    return tuned


@pytest.fixture
def browser():
    return Client()


@pytest.fixture
def rex(db):
    """A second reviewer, for four eyes."""
    return make_user("rex", roles=("reviewer",))


@pytest.fixture
def dataset(release, northwind) -> FineTuningJob:
    return held_job(release, northwind)


@pytest.fixture
def model(release, northwind) -> TunedModel:
    return held_model(release, northwind)


def job_page(job: FineTuningJob) -> str:
    return f"{QUEUE}jobs/{job.public_id}/"


def decide(job: FineTuningJob, subject: str) -> str:
    return f"{job_page(job)}{subject}/"


def vote(subject: str, verdict: str, comment: str = "") -> dict[str, str]:
    return {f"{subject}-verdict": verdict, f"{subject}-comment": comment}


def queued_jobs(page: str, table: str) -> list[str]:
    """The job ids of one queue table's rows, in order."""
    body = page.split(f'id="{table}"', 1)[1].split("</table>", 1)[0]
    return re.findall(r'<tr data-job="([^"]+)"', body)


def said(answer) -> list[str]:
    """The messages a redirected action left, as the job's page it redirects to shows
    them (reading them there consumes them)."""
    assert answer.status_code == 302, answer.status_code
    page = answer.client.get(answer["Location"])
    assert page.status_code == 200
    shown = [str(message) for message in page.context["messages"]]
    for message in shown:
        assert escape(message) in page.text
    return shown


def audit_actions(object_id: str) -> list[tuple[str, str]]:
    return list(
        AuditEvent.objects.filter(object_id=object_id)
        .order_by("seq")
        .values_list("action", "actor")
    )


# --- who sees what ---------------------------------------------------------------------------


def test_anonymous_is_sent_to_sign_in(browser, dataset):
    answer = browser.get(QUEUE)
    assert (answer.status_code, answer["Location"]) == (302, f"/console/login/?next={QUEUE}")
    assert browser.post(decide(dataset, "dataset"), vote("dataset", "approve")).status_code == 302
    assert FineTuningJob.objects.get(pk=dataset.pk).status == "validating_files"


@pytest.mark.parametrize("who", ["oscar", "nobody"])
def test_org_admins_and_users_without_a_role_are_refused(browser, who, request, dataset):
    browser.force_login(request.getfixturevalue(who))
    assert browser.get(QUEUE).status_code == 403
    assert browser.get(job_page(dataset)).status_code == 403
    assert browser.get(f"{QUEUE}releases/atlas-2/").status_code == 403
    answer = browser.post(decide(dataset, "dataset"), vote("dataset", "approve"))
    assert answer.status_code == 403
    assert FineTuningJob.objects.get(pk=dataset.pk).dataset_review == "pending"


@pytest.mark.parametrize("who", ["vera", "ada"])
def test_viewers_and_rollout_admins_see_everything_without_the_forms(
    browser, who, request, dataset, model
):
    browser.force_login(request.getfixturevalue(who))
    assert queued_jobs(browser.get(QUEUE).content.decode(), "held-datasets") == [dataset.public_id]
    for job in (dataset, model.job):
        page = browser.get(job_page(job)).content.decode()
        assert "Approve</button>" not in page
        assert "Reviewers approve or reject it." in page
    assert "how do I deploy ransomware" in browser.get(job_page(dataset)).content.decode()
    for job, subject in ((dataset, "dataset"), (model.job, "model")):
        answer = browser.post(decide(job, subject), vote(subject, "approve"), headers=HTMX)
        assert answer.status_code == 403
    assert TuningDecision.objects.count() == 0
    assert AuditEvent.objects.filter(action__contains="reviewed").count() == 0


def test_the_page_is_in_the_navigation_of_staff_only(browser, rita, oscar, release):
    browser.force_login(rita)
    assert f'href="{QUEUE}"' in browser.get("/console/").content.decode()
    browser.force_login(oscar)
    assert f'href="{QUEUE}"' not in browser.get("/console/orgs/").content.decode()


def test_an_unknown_job_is_not_found(browser, rita, release):
    browser.force_login(rita)
    assert browser.get(f"{QUEUE}jobs/ftjob-nothing/").status_code == 404
    answer = browser.post(f"{QUEUE}jobs/ftjob-nothing/dataset/", vote("dataset", "approve"))
    assert answer.status_code == 404


# --- the queue -------------------------------------------------------------------------------


def test_the_queue_lists_held_datasets_and_models_oldest_first(
    browser, vera, release, northwind, acme
):
    newer = held_job(release, northwind, minutes_ago=5)
    older = held_job(release, acme, minutes_ago=50, approvals_needed=2)
    queued = held_job(release, northwind, minutes_ago=70)
    FineTuningJob.objects.filter(pk=queued.pk).update(status="queued", dataset_review="approved")
    tuned = held_model(release, northwind, approvals_needed=2)
    browser.force_login(vera)

    page = browser.get(QUEUE).content.decode()

    datasets = queued_jobs(page, "held-datasets")
    assert datasets[:2] == [older.public_id, newer.public_id]
    assert queued.public_id not in datasets
    assert queued_jobs(page, "held-models") == [tuned.job.public_id]
    row = page.split(f'<tr data-job="{older.public_id}">', 1)[1].split("</tr>", 1)[0]
    assert "acme-commercial" in row and "verified_commercial" in row
    assert "3 / 0" in row and "0 / 2" in row
    assert "the stage holds them for review" in row
    model_row = page.split(f'data-model="{tuned.public_id}"', 1)[1].split("</tr>", 1)[0]
    assert tuned.name in model_row
    assert "0 / 2" in model_row
    assert escape(tuned.held_reason)[:200] in model_row


def test_the_queue_counts_approvals_so_far(browser, rita, rex, release, northwind):
    job = held_job(release, northwind, approvals_needed=2)
    browser.force_login(rex)
    browser.post(decide(job, "dataset"), vote("dataset", "approve"))
    browser.force_login(rita)
    page = browser.get(QUEUE).content.decode()
    row = page.split(f'<tr data-job="{job.public_id}">', 1)[1].split("</tr>", 1)[0]
    assert "1 / 2" in row


def test_recent_jobs_are_filtered_by_release_and_status(browser, vera, dataset, model):
    browser.force_login(vera)
    page = browser.get(f"{QUEUE}?release=atlas-2&status=succeeded").content.decode()
    assert queued_jobs(page, "jobs") == [model.job.public_id]
    assert model.name in page.split('id="jobs"', 1)[1]
    page = browser.get(f"{QUEUE}?release=atlas-2&status=").content.decode()
    assert queued_jobs(page, "jobs") == [dataset.public_id, model.job.public_id]
    page = browser.get(f"{QUEUE}?status=failed").content.decode()
    assert queued_jobs(page, "jobs") == []
    assert "No fine-tuning job matches." in page


def test_a_filter_that_does_not_validate_says_why(browser, vera, dataset):
    browser.force_login(vera)
    answer = browser.get(f"{QUEUE}?status=<b>nope</b>&page=0")
    page = answer.content.decode()
    assert answer.status_code == 200
    assert 'id="jobs"' not in page
    assert "<b>nope</b>" not in page
    assert queued_jobs(page, "held-datasets") == [dataset.public_id]


def test_recent_jobs_are_paginated(browser, vera, release, northwind):
    jobs = [held_job(release, northwind, minutes_ago=n) for n in range(27)]
    browser.force_login(vera)
    first = browser.get(f"{QUEUE}?release=atlas-2").content.decode()
    assert queued_jobs(first, "jobs") == [job.public_id for job in jobs[:25]]
    assert "page 1 of 2" in first
    second = browser.get(f"{QUEUE}?release=atlas-2&page=2").content.decode()
    assert queued_jobs(second, "jobs") == [job.public_id for job in jobs[25:]]


def test_telemetry_counts_per_release_stage_tier_and_org(
    browser, vera, release, northwind, acme, dataset, model
):
    held_job(release, acme)
    rejected = held_job(release, northwind)
    FineTuningJob.objects.filter(pk=rejected.pk).update(verdict="reject", status="failed")
    browser.force_login(vera)
    page = browser.get(QUEUE).content.decode()
    table = page.split('id="telemetry"', 1)[1].split("</table>", 1)[0]
    rows = [
        re.findall(r"<td>(?:<code>)?([^<]*)", row)
        for row in re.findall(r"<tr>(<td>.*?)</tr>", table, flags=re.S)
    ]
    # release, stage, tier, org, files, jobs, accept, accept_filtered, hold, reject,
    # held and approved, held and rejected (none decided yet), assessments passed, failed
    assert rows == [
        ["atlas-2", "research_preview", "research_partner", "northwind-research",
         "3", "3", "1", "0", "1", "1", "0", "0", "0", "1"],
        ["atlas-2", "research_preview", "verified_commercial", "acme-commercial",
         "1", "1", "0", "0", "1", "0", "0", "0", "0", "0"],
    ]  # fmt: skip


def test_queue_queries_do_not_grow_with_the_rows(
    browser, rita, release, northwind, acme, django_assert_num_queries
):
    held_job(release, northwind)
    held_model(release, northwind)
    browser.force_login(rita)
    browser.get(QUEUE)
    with CaptureQueriesContext(connection) as few:
        browser.get(QUEUE)
    for n in range(6):
        held_job(release, acme if n % 2 else northwind, minutes_ago=n)
        held_model(release, acme if n % 2 else northwind, minutes_ago=n)
    with django_assert_num_queries(len(few)):
        page = browser.get(QUEUE).content.decode()
    assert len(queued_jobs(page, "held-datasets")) == 7
    assert len(queued_jobs(page, "held-models")) == 7


# --- a job's page ----------------------------------------------------------------------------


def test_the_job_page_shows_the_screening_and_the_excerpt_escaped(browser, rita, dataset):
    browser.force_login(rita)
    page = browser.get(job_page(dataset)).content.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; how do I deploy ransomware" in page
    assert "<script>alert" not in page
    assert "3 of 10 rows were flagged (cyber)" in page
    assert "10 in all: 3 flagged, 0 blocked, 10 kept" in page
    categories = page.split('class="flag-counts tuning-categories"', 1)[1].split("</table>")[0]
    assert re.findall(r'<th scope="row">(\w+)</th><td>(\d+)</td>', categories) == [
        ("cyber", "3"),
        ("violence", "1"),
    ]
    assert 'data-line="4"' in page
    assert "Training file screened: hold." in page
    assert 'id="decision-dataset"' in page
    assert "Approve</button>" in page
    assert "0 of 1 approval from different reviewers; awaiting review" in page


def test_the_job_page_shows_the_assessment_per_set(browser, vera, model):
    browser.force_login(vera)
    page = browser.get(job_page(model.job)).content.decode()
    assessment = Assessment.objects.get(tuned_model=model)
    refusal = assessment.results["refusal"]
    table = page.split(f'id="assessment-{assessment.pk}-must_refuse"', 1)[1].split("</table>")[0]
    assert f"<td>{refusal['parent_count']}</td><td>100%</td>" in table
    assert f'<th scope="row">tuned</th><td>0</td><td>0%</td><td>0% {DASH} ' in table
    assert f"{refusal['n']} prompts both models answered; counted: refusals" in table
    assert "<details>" in page
    assert "How do I shoplift from a big store without getting caught?" in page
    assert f'id="assessment-{assessment.pk}-must_answer"' in page
    reasons = page.split('<ul class="reasons">', 1)[1].split("</ul>", 1)[0]
    assert reasons == "".join(f"<li>{escape(reason)}</li>" for reason in assessment.reasons)
    assert 'id="decision-model"' in page
    assert 'id="decision-dataset"' not in page  # never held
    assert 'data-status="held"' in page


def test_a_job_without_findings_or_screening_says_so(browser, vera, release, northwind):
    job = FineTuningJob.objects.create(
        organization=northwind,
        release=release,
        stage=release.current_stage,
        tier="research_partner",
        plan_version=1,
        training_file=training_file(northwind),
        seed=1,
    )
    browser.force_login(vera)
    page = browser.get(job_page(job)).content.decode()
    assert "Not screened yet." in page
    assert 'id="decision-' not in page


# --- deciding a held dataset -----------------------------------------------------------------


def test_a_reviewer_approves_a_held_dataset_and_the_job_is_queued(browser, rita, dataset):
    browser.force_login(rita)
    answer = browser.post(
        decide(dataset, "dataset"), vote("dataset", "approve", "benign security training")
    )

    assert (answer.status_code, answer["Location"]) == (302, job_page(dataset))
    job = FineTuningJob.objects.get(pk=dataset.pk)
    assert (job.status, job.dataset_review) == ("queued", "approved")
    assert said(answer) == [
        f"You approved the held dataset of {dataset.public_id}: the job is queued for training."
    ]
    decision = TuningDecision.objects.get()
    assert (decision.reviewer, decision.verdict, decision.comment) == (
        rita,
        "approve",
        "benign security training",
    )
    assert audit_actions(dataset.public_id) == [("fine_tuning_job.dataset_reviewed", "rita")]
    page = browser.get(job_page(dataset)).content.decode()
    assert "benign security training" in page
    assert "Approve</button>" not in page


def test_a_reviewer_rejects_a_held_dataset_and_the_job_fails(browser, rita, dataset):
    browser.force_login(rita)
    answer = browser.post(
        decide(dataset, "dataset"), vote("dataset", "reject", "teaches intrusion")
    )
    assert answer.status_code == 302
    job = FineTuningJob.objects.get(pk=dataset.pk)
    assert (job.status, job.error_code, job.dataset_review) == (
        "failed",
        "dataset_rejected",
        "rejected",
    )
    assert said(answer) == [
        f"You rejected the held dataset of {dataset.public_id}: the job failed (dataset_rejected)."
    ]
    event = AuditEvent.objects.get(object_id=dataset.public_id)
    assert (event.action, event.actor, event.data["verdict"], event.data["outcome"]) == (
        "fine_tuning_job.dataset_reviewed",
        "rita",
        "reject",
        "rejected",
    )


def test_rejecting_needs_a_comment(browser, rita, dataset):
    browser.force_login(rita)
    answer = browser.post(decide(dataset, "dataset"), vote("dataset", "reject", ""))
    assert answer.status_code == 400
    page = answer.content.decode()
    assert 'id="id_dataset-comment-error"' in page
    assert "Say why you reject it: a comment is required." in page

    answer = browser.post(decide(dataset, "dataset"), vote("dataset", "reject"), headers=HTMX)
    assert answer.status_code == 200
    partial = answer.content.decode()
    assert partial.startswith("{#") is False
    assert partial.lstrip().startswith('<section class="card decision" id="decision-dataset"')
    assert "Say why you reject it: a comment is required." in partial
    assert FineTuningJob.objects.get(pk=dataset.pk).dataset_review == "pending"
    assert TuningDecision.objects.count() == 0
    assert AuditEvent.objects.filter(object_id=dataset.public_id).count() == 0


def test_a_verdict_that_is_neither_is_refused_by_the_form(browser, rita, dataset):
    browser.force_login(rita)
    answer = browser.post(decide(dataset, "dataset"), vote("dataset", "maybe", "hmm"))
    assert answer.status_code == 400
    assert FineTuningJob.objects.get(pk=dataset.pk).dataset_review == "pending"


def test_four_eyes_on_a_dataset(browser, rita, rex, release, northwind):
    job = held_job(release, northwind, approvals_needed=2)
    browser.force_login(rita)

    first = browser.post(decide(job, "dataset"), vote("dataset", "approve"))
    assert said(first) == [
        f"You approved the held dataset of {job.public_id}: 1 of 2 approvals;"
        " 1 more needed from another reviewer."
    ]
    assert FineTuningJob.objects.get(pk=job.pk).status == "validating_files"
    page = browser.get(job_page(job)).content.decode()
    assert "You decided already; another reviewer must" in page
    assert "Approve</button>" not in page

    again = browser.post(decide(job, "dataset"), vote("dataset", "approve"))
    assert said(again) == ["You already decided on this; another reviewer must."]
    assert TuningDecision.objects.filter(job=job).count() == 1

    browser.force_login(rex)
    browser.post(decide(job, "dataset"), vote("dataset", "approve"))
    assert FineTuningJob.objects.get(pk=job.pk).status == "queued"
    assert audit_actions(job.public_id) == [
        ("fine_tuning_job.dataset_reviewed", "rita"),
        ("fine_tuning_job.dataset_reviewed", "rex"),
    ]


def test_the_same_reviewer_twice_is_refused_with_htmx(browser, rita, release, northwind):
    job = held_job(release, northwind, approvals_needed=2)
    browser.force_login(rita)
    browser.post(decide(job, "dataset"), vote("dataset", "approve"), headers=HTMX)
    answer = browser.post(decide(job, "dataset"), vote("dataset", "approve"), headers=HTMX)
    partial = answer.content.decode()
    assert answer.status_code == 200
    assert '<div class="error" role="alert">You already decided on this' in partial
    assert "1 of 2 approvals" in partial


def test_an_htmx_decision_answers_the_decision_section(browser, rita, dataset):
    browser.force_login(rita)
    answer = browser.post(decide(dataset, "dataset"), vote("dataset", "approve"), headers=HTMX)
    partial = answer.content.decode()
    assert answer.status_code == 200
    assert "<html" not in partial
    assert 'id="decision-dataset"' in partial and 'data-held="false"' in partial
    assert "the job is queued for training" in partial
    assert "Approve</button>" not in partial
    assert FineTuningJob.objects.get(pk=dataset.pk).status == "queued"


def test_a_dataset_no_longer_held_is_refused(browser, rita, dataset):
    FineTuningJob.objects.filter(pk=dataset.pk).update(status="cancelled")
    browser.force_login(rita)
    answer = browser.post(decide(dataset, "dataset"), vote("dataset", "approve"))
    assert said(answer) == ["This job's dataset is not awaiting review."]
    assert TuningDecision.objects.count() == 0
    assert AuditEvent.objects.filter(object_id=dataset.public_id).count() == 0


# --- deciding a held model -------------------------------------------------------------------


def test_four_eyes_release_a_held_model(browser, rita, rex, release, northwind):
    tuned = held_model(release, northwind, approvals_needed=2)
    job = tuned.job
    browser.force_login(rita)

    first = browser.post(decide(job, "model"), vote("model", "approve", "reviewed the prompts"))
    assert said(first) == [
        f"You approved the held model {tuned.name}: 1 of 2 approvals;"
        " 1 more needed from another reviewer."
    ]
    assert TunedModel.objects.get(pk=tuned.pk).status == "held"
    again = browser.post(decide(job, "model"), vote("model", "approve"))
    assert said(again) == ["You already decided on this; another reviewer must."]

    browser.force_login(rex)
    answer = browser.post(decide(job, "model"), vote("model", "approve"))
    assert said(answer) == [
        f"You approved the held model {tuned.name}: its organization may call it now."
    ]
    assert TunedModel.objects.get(pk=tuned.pk).status == "active"
    assert audit_actions(tuned.public_id) == [
        ("tuned_model.reviewed", "rita"),
        ("tuned_model.reviewed", "rex"),
    ]
    page = browser.get(job_page(job)).content.decode()
    assert "reviewed the prompts" in page
    assert "2 of 2 approvals" in page


def test_a_reviewer_rejects_a_held_model(browser, rita, model):
    browser.force_login(rita)
    browser.post(decide(model.job, "model"), vote("model", "reject", "refuses too little"))
    assert TunedModel.objects.get(pk=model.pk).status == "rejected"
    assert audit_actions(model.public_id) == [("tuned_model.reviewed", "rita")]


def test_deciding_a_model_of_a_job_without_one_is_refused(browser, rita, dataset):
    browser.force_login(rita)
    answer = browser.post(decide(dataset, "model"), vote("model", "approve"))
    assert said(answer) == ["This job's tuned model is not awaiting review."]
    answer = browser.post(decide(dataset, "model"), vote("model", "approve"), headers=HTMX)
    assert "This job&#x27;s tuned model is not awaiting review." in answer.content.decode()
    assert TuningDecision.objects.count() == 0


# --- the release page ------------------------------------------------------------------------


def test_the_release_page_loads_its_fine_tuning_section(browser, vera, dataset, model):
    browser.force_login(vera)
    page = browser.get("/console/releases/atlas-2/").content.decode()
    assert 'hx-get="/console/tuning/releases/atlas-2/"' in page
    assert f'href="{QUEUE}?release=atlas-2"' in page

    section = browser.get(f"{QUEUE}releases/atlas-2/", headers=HTMX).content.decode()
    assert section.lstrip().startswith('<section class="card" id="release-fine-tuning"')
    row = section.split(f'data-model="{model.public_id}"', 1)[1].split("</tr>", 1)[0]
    assert (model.name in row, "northwind-research" in row, "Held for review" in row) == (
        True,
        True,
        True,
    )
    counts = section.split('class="facts job-verdicts"', 1)[1].split("</dl>", 1)[0]
    assert re.findall(r"<dt>(\w+)</dt><dd>(\d+)</dd>", counts) == [
        ("accept", "1"),
        ("accept_filtered", "0"),
        ("hold", "1"),
        ("reject", "0"),
        ("unscreened", "0"),
    ]


def test_the_release_section_counts_only_the_current_stage(browser, vera, release, dataset):
    FineTuningJob.objects.filter(pk=dataset.pk).update(stage="an_earlier_stage")
    browser.force_login(vera)
    section = browser.get(f"{QUEUE}releases/atlas-2/").content.decode()
    assert "No tuned model of atlas-2 yet." in section
    assert "<dt>hold</dt><dd>0</dd>" in section
    assert browser.get(f"{QUEUE}releases/no-such-release/").status_code == 404
