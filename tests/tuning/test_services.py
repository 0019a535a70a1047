"""Fine-tuning's services (tuning/services.py) and the runner's sweep (tuning/runner.py)
on the database: limits counted per day, names that fit, cancelling, retention."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from access.keys import issue_key
from monitoring.models import AuditEvent
from rollout.plans import apply_plan
from stagegate.errors import Refused
from tests.factories import EXAMPLE_PLAN, make_org
from tuning import services
from tuning.models import DatasetFinding, FineTuningJob, JobStatus
from tuning.runner import pending_jobs

pytestmark = pytest.mark.django_db

ROW = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'  # noqa: E501


@pytest.fixture
def caller():
    org = make_org("northwind-research", "research_partner")
    apply_plan(EXAMPLE_PLAN.read_text(), actor=None)
    return services.authenticate(issue_key(organization=org, name="t", actor=None).raw_key)


def upload(caller) -> str:
    return services.upload_file(
        caller=caller, filename="t.jsonl", purpose="fine-tune", data=ROW * 3
    ).public_id


def test_jobs_per_day_are_counted_per_organization_and_release(caller):
    training_file = upload(caller)
    for _ in range(10):  # research_preview: 10 a day for research partners
        services.create_job(caller=caller, model="atlas-2", training_file=training_file)

    with pytest.raises(Refused) as refused:
        services.create_job(caller=caller, model="atlas-2", training_file=training_file)

    assert (refused.value.code, refused.value.status) == ("fine_tuning_jobs_exceeded", 429)
    FineTuningJob.objects.update(created_at=timezone.now() - timedelta(hours=25))
    assert services.create_job(caller=caller, model="atlas-2", training_file=training_file)


def test_a_suffix_that_makes_the_name_too_long_is_refused(caller):
    with pytest.raises(Refused) as refused:
        services.create_job(
            caller=caller, model="atlas-2", training_file=upload(caller), suffix="s" * 40
        )

    assert refused.value.code == "suffix_too_long"
    assert "at most 63" in refused.value.message


def test_a_new_job_is_pending_for_the_sweep_and_audited(caller):
    job = services.create_job(caller=caller, model="atlas-2", training_file=upload(caller))

    assert pending_jobs() == [job.pk]
    assert job.status == JobStatus.VALIDATING_FILES
    assert AuditEvent.objects.filter(action="fine_tuning_job.created").count() == 1
    # claimed by a runner: the sweep leaves it alone until the claim runs out
    FineTuningJob.objects.update(claimed_until=timezone.now() + timedelta(minutes=5))
    assert pending_jobs() == []


def test_cancelling_a_finished_job_is_refused(caller):
    job = services.create_job(caller=caller, model="atlas-2", training_file=upload(caller))
    services.cancel_job(caller=caller, job_id=job.public_id)

    with pytest.raises(Refused) as refused:
        services.cancel_job(caller=caller, job_id=job.public_id)

    assert (refused.value.code, refused.value.status) == ("job_finished", 409)
    assert pending_jobs() == []  # nothing was sent upstream, so nothing to tell it


def test_expired_findings_are_deleted_with_one_audit_row(caller):
    job = services.create_job(caller=caller, model="atlas-2", training_file=upload(caller))
    now = timezone.now()
    for line, days in ((1, -1), (2, -1), (3, 5)):
        DatasetFinding.objects.create(
            job=job, line=line, action="flag", source="prompt", categories="bio",
            excerpt="gain of function", expires_at=now + timedelta(days=days),
        )  # fmt: skip

    assert services.delete_expired_findings(now=now) == 2

    assert list(DatasetFinding.objects.values_list("line", flat=True)) == [3]
    row = AuditEvent.objects.get(action="dataset_findings_expired")
    assert row.data == {"deleted": 2, "per_job": {job.public_id: 2}}
    assert services.delete_expired_findings(now=now) == 0


def test_a_queued_job_waits_while_its_release_is_paused(caller):
    from rollout.models import Release, ReleaseState
    from tuning.runner import advance_job

    job = services.create_job(caller=caller, model="atlas-2", training_file=upload(caller))
    FineTuningJob.objects.filter(pk=job.pk).update(status=JobStatus.QUEUED, verdict="accept")
    Release.objects.filter(name="atlas-2").update(state=ReleaseState.PAUSED)

    assert advance_job(job.pk) == JobStatus.QUEUED  # nothing sent upstream
    assert FineTuningJob.objects.get(pk=job.pk).upstream_job_id == ""

    Release.objects.filter(name="atlas-2").update(state=ReleaseState.RETIRED)
    assert advance_job(job.pk) == JobStatus.FAILED
    assert FineTuningJob.objects.get(pk=job.pk).error_code == "model_retired"


def test_what_a_key_does_is_audited_under_its_public_id(caller):
    services.create_job(caller=caller, model="atlas-2", training_file=upload(caller))

    actors = set(
        AuditEvent.objects.filter(
            action__in=["training_file.uploaded", "fine_tuning_job.created"]
        ).values_list("actor", flat=True)
    )

    assert actors == {f"api_key:{caller.api_key.public_id}"}
