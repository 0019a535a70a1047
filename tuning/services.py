"""Fine-tuning's actions: upload a training file, create and cancel jobs, and the
reviewers' decisions on held datasets and held tuned models.

Each writes one transaction with its audit row (the house rule) and raises
``stagegate.errors.Refused`` with a stable code when the caller or the state of things
does not allow the action. The job's own progress (screening, training, assessment) is
``tuning.runner``'s.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from access.decisions import KeyEntry, OrgEntry
from access.keys import authenticate_key
from access.models import ApiKey
from access.snapshot import load_key, load_org, load_releases
from monitoring import audit
from monitoring.audit import ObjectType
from monitoring.redaction import redact_secrets
from rollout.models import Release
from stagegate.celery import enqueue
from stagegate.errors import Refused
from stagegate.roles import REVIEWER, staff_roles
from tuning.datasets import DatasetInvalid, parse_dataset
from tuning.gate import FINE_TUNING_NOT_ALLOWED, decide_fine_tuning, may_fine_tune_any
from tuning.models import (
    DatasetFinding,
    DecisionSubject,
    DecisionVerdict,
    FineTuningJob,
    JobEvent,
    JobStatus,
    ReviewStatus,
    TrainingFile,
    TunedModel,
    TunedModelStatus,
    TuningDecision,
)

MAX_NAME_CHARS = 63  # a release name's length (usage events store the model called)
SUFFIX_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
ADVANCE_TASK = "stagegate.advance_fine_tuning_job"


# --- who is calling -----------------------------------------------------------------------


class Caller:
    """An API key that authenticated, with the plain entries the gate decides from."""

    def __init__(self, api_key: ApiKey, key: KeyEntry, org: OrgEntry) -> None:
        self.api_key = api_key
        self.key = key
        self.org = org

    @property
    def organization(self):
        return self.api_key.organization

    @property
    def label(self) -> str:
        """Who acted, for the audit log: the key's public id (never its secret)."""
        return f"api_key:{self.api_key.public_id}"


def authenticate(raw_key: str) -> Caller:
    """The caller of ``raw_key`` (``access.keys.KeyRefused``, a 401, when it is no
    usable key)."""
    api_key = authenticate_key(raw_key)
    key = load_key(api_key.key_id)
    org = load_org(api_key.organization_id)
    if key is None or org is None:  # deleted between the two reads
        raise Refused("invalid_key", "Invalid API key: not recognised.", status=401)
    return Caller(api_key, key, org)


def event(job: FineTuningJob, message: str, *, level: str = "info", **data: Any) -> JobEvent:
    return JobEvent.objects.create(job=job, level=level, message=message, data=data)


# --- files --------------------------------------------------------------------------------


def upload_file(*, caller: Caller, filename: str, purpose: str, data: bytes) -> TrainingFile:
    """Store a training file after checking it row by row (``invalid_training_file``
    with line-numbered errors when it is not valid chat JSONL)."""
    if purpose != "fine-tune":
        raise Refused(
            "invalid_purpose",
            f"purpose must be 'fine-tune'; Stagegate keeps only training files, not {purpose!r}.",
            status=400,
            field="purpose",
        )
    if not may_fine_tune_any(
        org=caller.org, releases=load_releases(), key=caller.key, now=time.time()
    ):
        raise Refused(
            FINE_TUNING_NOT_ALLOWED,
            f"Your organization's tier ({caller.org.tier}) may not fine-tune any model at"
            " its current stage, so it cannot upload training files.",
            status=403,
        )
    try:
        dataset = parse_dataset(data)
    except DatasetInvalid as exc:
        raise Refused(
            "invalid_training_file", f"The training file is invalid: {exc.summary()}", status=400,
            field="file",
        ) from None  # fmt: skip
    with transaction.atomic():
        training_file = TrainingFile.objects.create(
            organization=caller.organization,
            api_key=caller.api_key,
            filename=_clean_filename(filename),
            purpose=purpose,
            bytes=len(data),
            rows=len(dataset.rows),
            sha256=hashlib.sha256(data).hexdigest(),
            content=data,
        )
        audit.record(
            "training_file.uploaded",
            actor=caller.label,
            object_type=ObjectType.TRAINING_FILE,
            object_id=training_file.public_id,
            data={"bytes": len(data), "rows": len(dataset.rows), "sha256": training_file.sha256},
        )
    return training_file


def _clean_filename(name: str) -> str:
    cleaned = redact_secrets("".join(ch for ch in name if ch.isprintable()))[:255]
    return cleaned or "training.jsonl"


def get_file(*, caller: Caller, file_id: str) -> TrainingFile:
    training_file = TrainingFile.objects.filter(
        public_id=file_id, organization_id=caller.api_key.organization_id
    ).first()
    if training_file is None:
        raise Refused("file_not_found", f"No file with id '{file_id}'.", status=404)
    return training_file


# --- jobs ---------------------------------------------------------------------------------


def tuned_model_name(release: str, org_slug: str, suffix: str, job_id: str) -> str:
    """``ft:<release>:<org>:<suffix>:<8 characters of the job id>``."""
    return f"ft:{release}:{org_slug}:{suffix or 'tuned'}:{job_id[-8:]}"


def create_job(
    *,
    caller: Caller,
    model: str,
    training_file: str,
    suffix: str | None = None,
    seed: int | None = None,
    hyperparameters: dict[str, Any] | None = None,
) -> FineTuningJob:
    """Create a job of ``model`` on ``training_file`` if the gate allows it; its
    screening starts once the transaction commits."""
    suffix = suffix or ""
    if suffix and not SUFFIX_PATTERN.fullmatch(suffix):
        raise Refused(
            "invalid_suffix",
            "suffix must be 1 to 40 lower-case letters, digits, '-' or '_', starting with a"
            " letter or digit.",
            status=400,
            field="suffix",
        )
    hyperparameters = _hyperparameters(hyperparameters)
    file_row = get_file(caller=caller, file_id=training_file)
    releases = load_releases()
    release_entry = releases.get(model)
    since = timezone.now() - timedelta(days=1)
    jobs_today = FineTuningJob.objects.filter(
        organization_id=caller.api_key.organization_id, release__name=model, created_at__gte=since
    ).count()
    decision = decide_fine_tuning(
        key=caller.key,
        org=caller.org,
        release=release_entry,
        model=model,
        now=time.time(),
        rows=file_row.rows,
        size=file_row.bytes,
        jobs_today=jobs_today,
    )
    if not decision.allowed:
        raise Refused(decision.code, decision.message, status=decision.status, field="model")
    assert release_entry is not None
    probe = tuned_model_name(model, caller.org.slug, suffix, "x" * 8)
    if len(probe) > MAX_NAME_CHARS:
        raise Refused(
            "suffix_too_long",
            f"The tuned model's name would be {len(probe)} characters ({probe}); at most"
            f" {MAX_NAME_CHARS}. Use a shorter suffix.",
            status=400,
            field="suffix",
        )
    release = Release.objects.get(name=model)
    with transaction.atomic():
        job = FineTuningJob.objects.create(
            organization=caller.organization,
            api_key=caller.api_key,
            release=release,
            stage=decision.stage or "",
            tier=decision.tier or "",
            plan_version=release_entry.plan_version,
            training_file=file_row,
            suffix=suffix,
            seed=seed if seed is not None else secrets.randbelow(2**31),
            hyperparameters=hyperparameters,
        )
        event(job, f"Created fine-tuning job: {job.public_id}")
        event(job, f"Validating training file: {file_row.public_id}")
        audit.record(
            "fine_tuning_job.created",
            actor=caller.label,
            object_type=ObjectType.FINE_TUNING_JOB,
            object_id=job.public_id,
            data={
                "release": model,
                "stage": job.stage,
                "tier": job.tier,
                "training_file": file_row.public_id,
                "rows": file_row.rows,
            },
        )
        enqueue(ADVANCE_TASK, background=True, job_id=job.pk)
    return job


def _hyperparameters(given: dict[str, Any] | None) -> dict[str, Any]:
    """OpenAI's hyperparameters, each ``"auto"`` or a positive number."""
    if given is None:
        return {name: "auto" for name in HYPERPARAMETERS}
    if not isinstance(given, dict):
        raise Refused(
            "invalid_hyperparameters", "hyperparameters must be an object.", status=400,
            field="hyperparameters",
        )  # fmt: skip
    unknown = sorted(set(given) - set(HYPERPARAMETERS))
    if unknown:
        raise Refused(
            "invalid_hyperparameters",
            f"Unknown hyperparameter {unknown[0]!r}; known: {', '.join(HYPERPARAMETERS)}.",
            status=400,
            field="hyperparameters",
        )
    result: dict[str, Any] = {}
    for name in HYPERPARAMETERS:
        value = given.get(name, "auto")
        number_ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value != "auto" and not (number_ok and 0 < value <= 1000):
            raise Refused(
                "invalid_hyperparameters",
                f"{name} must be 'auto' or a number above 0 and at most 1000.",
                status=400,
                field="hyperparameters",
            )
        result[name] = value
    return result


def get_job(*, caller: Caller, job_id: str) -> FineTuningJob:
    job = (
        FineTuningJob.objects.select_related(
            "release", "training_file", "organization", "tuned_model"
        )
        .filter(public_id=job_id, organization_id=caller.api_key.organization_id)
        .first()
    )
    if job is None:
        raise Refused("job_not_found", f"No fine-tuning job with id '{job_id}'.", status=404)
    return job


def cancel_job(*, caller: Caller, job_id: str) -> FineTuningJob:
    """Cancel a job that has not finished (``job_finished`` otherwise). A job already
    training upstream is cancelled there too by the runner, at its next step."""
    job = get_job(caller=caller, job_id=job_id)
    with transaction.atomic():
        updated = FineTuningJob.objects.filter(
            pk=job.pk,
            status__in=[JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING],
        ).update(status=JobStatus.CANCELLED, finished_at=timezone.now(), updated_at=timezone.now())
        if not updated:
            job.refresh_from_db()
            raise Refused(
                "job_finished", f"The job has already {job.status}; nothing to cancel.",
                status=409,
            )  # fmt: skip
        job.refresh_from_db()
        event(job, "Job cancelled")
        audit.record(
            "fine_tuning_job.cancelled",
            actor=caller.label,
            object_type=ObjectType.FINE_TUNING_JOB,
            object_id=job.public_id,
        )
        if job.upstream_job_id:
            enqueue(ADVANCE_TASK, background=True, job_id=job.pk)
    return job


# --- reviewers' decisions -----------------------------------------------------------------


def decide_dataset(*, job: FineTuningJob, reviewer, verdict: str, comment: str = "") -> str:
    """A reviewer's approve or reject of a held dataset; the job trains once
    ``approvals_needed`` different reviewers approved and fails at the first reject.
    Returns the dataset's review status after the decision."""
    return _decide(job=job, subject=DecisionSubject.DATASET, reviewer=reviewer, verdict=verdict,
                   comment=comment)  # fmt: skip


def decide_model(*, job: FineTuningJob, reviewer, verdict: str, comment: str = "") -> str:
    """A reviewer's approve or reject of a tuned model held by its assessment: callable
    once ``approvals_needed`` different reviewers approved, never served after a reject.
    Returns the model's status after the decision."""
    return _decide(job=job, subject=DecisionSubject.MODEL, reviewer=reviewer, verdict=verdict,
                   comment=comment)  # fmt: skip


def _decide(*, job: FineTuningJob, subject: str, reviewer, verdict: str, comment: str) -> str:
    if REVIEWER not in staff_roles(reviewer):
        raise Refused("not_a_reviewer", "only reviewers decide held fine-tuning", status=403)
    if verdict not in DecisionVerdict.values:
        raise Refused("invalid_verdict", "verdict must be approve or reject.", status=400)
    with transaction.atomic():
        job = FineTuningJob.objects.select_for_update().get(pk=job.pk)
        if subject == DecisionSubject.DATASET:
            held = job.dataset_review == ReviewStatus.PENDING
            if not held or job.status != JobStatus.VALIDATING_FILES:
                raise Refused("not_held", "This job's dataset is not awaiting review.")
            needed = job.approvals_needed
        else:
            tuned = TunedModel.objects.select_for_update().filter(job=job).first()
            if tuned is None or tuned.status != TunedModelStatus.HELD:
                raise Refused("not_held", "This job's tuned model is not awaiting review.")
            needed = tuned.approvals_needed
        if TuningDecision.objects.filter(job=job, subject=subject, reviewer=reviewer).exists():
            raise Refused("already_decided", "You already decided on this; another reviewer must.")
        decision = TuningDecision.objects.create(
            job=job, subject=subject, reviewer=reviewer, verdict=verdict, comment=comment
        )
        approvals = TuningDecision.objects.filter(
            job=job, subject=subject, verdict=DecisionVerdict.APPROVE
        ).count()
        outcome = ReviewStatus.PENDING.value
        if verdict == DecisionVerdict.REJECT:
            outcome = ReviewStatus.REJECTED.value
        elif approvals >= needed:
            outcome = ReviewStatus.APPROVED.value
        audit_data = {
            "subject": subject,
            "verdict": verdict,
            "approvals": approvals,
            "approvals_needed": needed,
            "outcome": outcome,
            "decision": decision.public_id,
        }
        if subject == DecisionSubject.DATASET:
            _apply_dataset_outcome(job, outcome, reviewer)
            audit.record(
                "fine_tuning_job.dataset_reviewed",
                actor=reviewer,
                object_type=ObjectType.FINE_TUNING_JOB,
                object_id=job.public_id,
                data=audit_data,
            )
            return outcome
        status = _apply_model_outcome(tuned, outcome)
        audit.record(
            "tuned_model.reviewed",
            actor=reviewer,
            object_type=ObjectType.TUNED_MODEL,
            object_id=tuned.public_id,
            data={**audit_data, "model": tuned.name, "status": status},
        )
        event(job, f"Reviewer {audit.actor_label(reviewer)}: {verdict} the tuned model ({status})")
        return status


def _apply_dataset_outcome(job: FineTuningJob, outcome: str, reviewer) -> None:
    who = audit.actor_label(reviewer)
    if outcome == ReviewStatus.PENDING:
        event(job, f"Reviewer {who} approved the dataset; more approvals are needed")
        return
    job.dataset_review = outcome
    if outcome == ReviewStatus.APPROVED:
        job.status = JobStatus.QUEUED
        event(job, f"Reviewer {who} approved the held dataset; the job is queued")
        enqueue(ADVANCE_TASK, background=True, job_id=job.pk)
    else:
        job.status = JobStatus.FAILED
        job.finished_at = timezone.now()
        job.error_code = "dataset_rejected"
        job.error_message = "A reviewer rejected the training file after screening held it."
        job.error_param = "training_file"
        event(job, f"Reviewer {who} rejected the held dataset; the job failed", level="error")
    job.save(
        update_fields=[
            "dataset_review", "status", "finished_at", "error_code", "error_message",
            "error_param", "updated_at",
        ]
    )  # fmt: skip


def _apply_model_outcome(tuned: TunedModel, outcome: str) -> str:
    if outcome == ReviewStatus.APPROVED:
        tuned.status = TunedModelStatus.ACTIVE
    elif outcome == ReviewStatus.REJECTED:
        tuned.status = TunedModelStatus.REJECTED
    tuned.save(update_fields=["status", "updated_at"])
    return tuned.status


# --- retention ------------------------------------------------------------------------------


def delete_expired_findings(*, now=None) -> int:
    """Delete the flagged rows' excerpts kept past their ``retain_days``; one audit row
    naming how many, per job. Returns the number deleted."""
    now = now or timezone.now()
    with transaction.atomic():
        expired = DatasetFinding.objects.filter(expires_at__lte=now)
        per_job = dict(
            expired.values("job__public_id")
            .annotate(n=Count("id"))
            .values_list("job__public_id", "n")
        )
        if not per_job:
            return 0
        deleted, _ = expired.delete()
        audit.record(
            "dataset_findings_expired",
            actor="system:retention",
            object_type=ObjectType.FINE_TUNING_JOB,
            object_id="findings",
            data={"deleted": deleted, "per_job": per_job},
        )
    return deleted
