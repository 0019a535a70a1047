"""A fine-tuning job's life after it is created, one step at a time.

``validating_files``: the training file is screened under the release's current stage
(its rules and classifier, and the checks aimed at training data:
``tuning.dataset_screening``) and the plan's ``fine_tuning.dataset`` gives the verdict:
``accept`` and ``accept_filtered`` queue the job, ``hold`` waits for reviewers
(``tuning.services.decide_dataset``), ``reject`` fails it. ``queued``: the rows to train
on are sent to the release's upstream, which trains through OpenAI's files and
fine-tuning API. ``running``: the upstream job is polled; once it has trained, a
``TunedModel`` exists, held while the plan's assessment (``tuning.assessment``)
compares it with its parent. ``succeeded``: assessed; the model is callable if it
passed, held for reviewers if not.

``advance_job`` is idempotent and safe to call from several places at once (the task
enqueued at creation, the periodic sweep): it claims the job with a conditional UPDATE
and leaves it alone when another runner holds it.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from access.snapshot import stage_policy
from monitoring import audit
from monitoring.audit import ObjectType
from rollout.models import ReleaseState
from rollout.plan_schema import FineTuningPolicy
from rollout.plans import plan_doc
from tuning.assessment import assess
from tuning.dataset_screening import DatasetResult
from tuning.datasets import parse_dataset
from tuning.models import (
    Assessment,
    DatasetFinding,
    DatasetVerdict,
    FineTuningJob,
    JobEvent,
    JobStatus,
    ReviewStatus,
    TunedModel,
    TunedModelStatus,
)
from tuning.screen_worker import ScreeningFailed, screen_in_child, screen_training_data
from tuning.services import event, tuned_model_name
from tuning.upstream import FineTuningUpstream, UpstreamFailed

log = logging.getLogger(__name__)

ACTOR = "system:fine-tuning"
CLAIM_SECONDS = 300
POLL_SECONDS = 1.0


def advance_job(job_id: int, *, budget_seconds: float = 60.0) -> str | None:
    """Take job ``job_id`` as far as it can go within ``budget_seconds`` (training is
    polled until then; the periodic sweep picks it up again). Its status after, or None
    when another runner holds it."""
    if not _claim(job_id):
        return None
    deadline = time.monotonic() + budget_seconds
    try:
        while True:
            job = FineTuningJob.objects.select_related(
                "release__active_plan", "training_file", "organization"
            ).get(pk=job_id)
            if not _step(job) or time.monotonic() >= deadline:
                return FineTuningJob.objects.values_list("status", flat=True).get(pk=job_id)
    finally:
        FineTuningJob.objects.filter(pk=job_id).update(claimed_until=None)


def pending_jobs() -> list[int]:
    """Jobs a runner has something to do for, oldest first."""
    return list(
        FineTuningJob.objects.filter(
            Q(status=JobStatus.VALIDATING_FILES, verdict="")
            | Q(status__in=[JobStatus.QUEUED, JobStatus.RUNNING])
            | (Q(status=JobStatus.CANCELLED, error_code="") & ~Q(upstream_job_id=""))
        )
        .filter(Q(claimed_until__isnull=True) | Q(claimed_until__lt=timezone.now()))
        .order_by("created_at")
        .values_list("pk", flat=True)
    )


def _claim(job_id: int) -> bool:
    now = timezone.now()
    return bool(
        FineTuningJob.objects.filter(pk=job_id)
        .filter(Q(claimed_until__isnull=True) | Q(claimed_until__lt=now))
        .update(claimed_until=now + timedelta(seconds=CLAIM_SECONDS))
    )


def _step(job: FineTuningJob) -> bool:
    """Do the job's next step; False when there is nothing to do now."""
    if job.status == JobStatus.VALIDATING_FILES and not job.verdict:
        return _screen(job)
    if job.status == JobStatus.QUEUED:
        if job.release.state == ReleaseState.RETIRED:
            _fail(job, "model_retired", f"'{job.release.name}' was retired before training.")
            return False
        if job.release.state != ReleaseState.ACTIVE:
            return False  # a paused release trains nothing; the sweep tries again
        _submit(job)
        return True
    if job.status == JobStatus.RUNNING:
        tuned = TunedModel.objects.filter(job=job, status=TunedModelStatus.ASSESSING).first()
        if tuned is not None:  # trained: assessed before the job succeeds
            _assess(job, tuned)
            return True
        finished = _poll(job)
        if not finished:
            time.sleep(POLL_SECONDS)
        return True
    if job.status == JobStatus.CANCELLED and job.upstream_job_id and not job.error_code:
        _cancel_upstream(job)
        return False
    return False


def _upstream(job: FineTuningJob) -> FineTuningUpstream:
    return FineTuningUpstream(
        job.release.upstream_base_url, api_key=settings.STAGEGATE_UPSTREAM_API_KEY or ""
    )


def _fail(job: FineTuningJob, code: str, message: str, param: str = "") -> None:
    with transaction.atomic():
        updated = FineTuningJob.objects.filter(
            pk=job.pk, status__in=[JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING]
        ).update(
            status=JobStatus.FAILED,
            error_code=code,
            error_message=message,
            error_param=param,
            finished_at=timezone.now(),
            updated_at=timezone.now(),
        )
        if updated:
            event(job, f"Job failed: {message}", level="error", code=code)
            audit.record(
                "fine_tuning_job.failed",
                actor=ACTOR,
                object_type=ObjectType.FINE_TUNING_JOB,
                object_id=job.public_id,
                data={"code": code},
            )


def _set_status(job: FineTuningJob, expected: str, **fields) -> bool:
    """Move the job on unless someone (a cancel) changed its status meanwhile."""
    return bool(
        FineTuningJob.objects.filter(pk=job.pk, status=expected).update(
            updated_at=timezone.now(), **fields
        )
    )


# --- validating_files: screening ----------------------------------------------------------


def _screen(job: FineTuningJob) -> bool:
    """Screen the job's training file; False when no result came (tried again later)."""
    release = job.release
    plan = release.active_plan
    policy, _screen_rules = stage_policy(plan, release.current_stage)
    fine_tuning = policy.fine_tuning if policy is not None else None
    if fine_tuning is None or fine_tuning.limits_for(job.tier) is None:
        _fail(
            job,
            "fine_tuning_not_allowed",
            f"'{release.name}' moved to stage '{release.current_stage}', where tier {job.tier}"
            " may not fine-tune it.",
            "model",
        )
        return True
    request = {
        "plan": plan.document,
        "stage": release.current_stage,
        "data": bytes(job.training_file.content),
        "api_key": settings.STAGEGATE_UPSTREAM_API_KEY or "",
    }
    try:
        if settings.STAGEGATE_SCHEDULER == "celery":  # a worker: a process of its own
            result = screen_training_data(**request)
        else:  # the web server's process: not beside the proxy's requests
            result = screen_in_child(**request)
    except ScreeningFailed as exc:
        log.warning("fine-tuning job %s: %s", job.public_id, exc)
        return False  # left unscreened: the sweep tries again
    store_screening(
        job, result, fine_tuning, stage=release.current_stage, plan_version=plan.version
    )
    return True


def store_screening(
    job: FineTuningJob,
    result: DatasetResult,
    fine_tuning: FineTuningPolicy,
    *,
    stage: str,
    plan_version: int,
    actor: str = ACTOR,
    at: datetime | None = None,
) -> bool:
    """The screening's ``result`` stored with the job: the verdict and counts, the job
    queued, held for reviewers or failed, the findings kept for ``retain_days``, the
    events and the audit row, in one transaction. ``at``: when it was screened (now
    unless the demo's history says otherwise). False when the job was no longer
    validating (cancelled meanwhile) and nothing was stored."""
    screened = at or timezone.now()
    verdict = result.verdict
    fields: dict[str, Any] = {
        "verdict": verdict,
        "verdict_reason": result.reason,
        "screened_at": screened,
        "rows_total": result.rows_total,
        "rows_flagged": result.rows_flagged,
        "rows_blocked": result.rows_blocked,
        "rows_kept": len(result.kept_lines),
        "categories": result.categories,
        "stage": stage,
        "plan_version": plan_version,
    }
    if verdict == DatasetVerdict.ACCEPT_FILTERED:
        fields["kept_lines"] = list(result.kept_lines)
    if verdict in (DatasetVerdict.ACCEPT, DatasetVerdict.ACCEPT_FILTERED):
        fields["status"] = JobStatus.QUEUED
    elif verdict == DatasetVerdict.HOLD:
        fields["dataset_review"] = ReviewStatus.PENDING
        fields["approvals_needed"] = fine_tuning.dataset.approvals_needed
    else:
        fields.update(
            status=JobStatus.FAILED,
            finished_at=screened,
            error_code="dataset_rejected",
            error_message=result.reason,
            error_param="training_file",
        )
    with transaction.atomic():
        if not _set_status(job, JobStatus.VALIDATING_FILES, **fields):
            return False
        expires = screened + timedelta(days=fine_tuning.dataset.retain_days)
        DatasetFinding.objects.bulk_create(
            [
                DatasetFinding(
                    job=job,
                    line=finding.line,
                    action=finding.action,
                    source=finding.source,
                    categories=",".join(finding.categories),
                    excerpt=finding.excerpt,
                    expires_at=expires,
                )
                for finding in result.findings
            ],
            batch_size=500,
        )
        level = "info" if verdict in ("accept", "accept_filtered") else "warn"
        events = [event(job, f"Training file screened: {verdict}. {result.reason}", level=level)]
        if verdict == DatasetVerdict.HOLD:
            needed = fine_tuning.dataset.approvals_needed
            events.append(
                event(
                    job,
                    f"The dataset is held for human review ({needed} approval"
                    f"{'s' if needed > 1 else ''} needed)",
                    level="warn",
                )
            )
        if at is not None:
            JobEvent.objects.filter(pk__in=[row.pk for row in events]).update(created_at=at)
        audit.record(
            "fine_tuning_job.dataset_screened",
            actor=actor,
            object_type=ObjectType.FINE_TUNING_JOB,
            object_id=job.public_id,
            data={
                "verdict": verdict,
                "rows": result.rows_total,
                "flagged": result.rows_flagged,
                "blocked": result.rows_blocked,
                "stage": stage,
            },
        )
    return True


# --- queued and running: training upstream ------------------------------------------------


def _submit(job: FineTuningJob) -> None:
    content = bytes(job.training_file.content)
    if job.verdict == DatasetVerdict.ACCEPT_FILTERED:
        content = parse_dataset(content).jsonl(job.kept_lines)
    try:
        with _upstream(job) as upstream:
            file_id = upstream.upload(content, job.training_file.filename or "training.jsonl")
            upstream_job = upstream.create_job(
                model=job.release.upstream_model,
                training_file=file_id,
                suffix=job.suffix or None,
                hyperparameters=job.hyperparameters or None,
                seed=job.seed,
            )
    except UpstreamFailed as exc:
        _fail(job, "upstream_error", f"The model's upstream refused the training job: {exc}")
        return
    with transaction.atomic():
        if _set_status(
            job,
            JobStatus.QUEUED,
            status=JobStatus.RUNNING,
            upstream_file_id=file_id,
            upstream_job_id=upstream_job,
        ):
            event(job, "Fine-tuning job started")
    job.refresh_from_db()
    if job.status == JobStatus.CANCELLED:
        _cancel_upstream(job)


def _poll(job: FineTuningJob) -> bool:
    """Ask the upstream how training goes; True once training ended."""
    try:
        with _upstream(job) as upstream:
            remote = upstream.job(job.upstream_job_id)
    except UpstreamFailed as exc:
        log.warning("fine-tuning job %s: polling failed: %s", job.public_id, exc)
        return False
    if remote.status in ("validating_files", "queued", "running"):
        return False
    if remote.status == "succeeded" and remote.fine_tuned_model:
        _trained(job, remote.fine_tuned_model, remote.trained_tokens)
    elif remote.status == "cancelled":
        _set_status(job, JobStatus.RUNNING, status=JobStatus.CANCELLED, finished_at=timezone.now())
    else:
        message = remote.error_message or f"training ended as {remote.status}"
        _fail(job, remote.error_code or "training_failed", message)
    return True


def _trained(job: FineTuningJob, upstream_model: str, trained_tokens: int | None) -> None:
    """Training succeeded: the tuned model exists, held while it is assessed; the job
    stays ``running`` until the assessment is done."""
    name = tuned_model_name(job.release.name, job.organization.slug, job.suffix, job.public_id)
    with transaction.atomic():
        if not _set_status(
            job, JobStatus.RUNNING, upstream_model=upstream_model, trained_tokens=trained_tokens
        ):
            return
        tuned = TunedModel.objects.create(
            name=name,
            job=job,
            organization=job.organization,
            parent=job.release,
            upstream_model=upstream_model,
            status=TunedModelStatus.ASSESSING,
        )
        event(job, f"Training done; assessing {name} against {job.release.name}")
        audit.record(
            "tuned_model.created",
            actor=ACTOR,
            object_type=ObjectType.TUNED_MODEL,
            object_id=tuned.public_id,
            data={"model": name, "parent": job.release.name, "job": job.public_id},
        )


def _cancel_upstream(job: FineTuningJob) -> None:
    try:
        with _upstream(job) as upstream:
            upstream.cancel(job.upstream_job_id)
    except UpstreamFailed as exc:
        log.warning("fine-tuning job %s: upstream cancel failed: %s", job.public_id, exc)
    # error_code marks the upstream as told, so the sweep does not ask again.
    FineTuningJob.objects.filter(pk=job.pk).update(error_code="cancelled")


# --- succeeded: the assessment ------------------------------------------------------------


def _assess(job: FineTuningJob, tuned: TunedModel) -> None:
    plan = job.release.active_plan
    spec = plan_doc(plan).assessment
    if spec is None:  # a plan without fine-tuning now: nothing can release the model
        reasons: tuple[str, ...] = ("the release's plan has no assessment any more",)
        passed, results = False, {}
    else:
        with _upstream(job) as upstream:
            result = assess(
                client=upstream,
                parent_model=job.release.upstream_model,
                tuned_model=tuned.upstream_model,
                spec=spec,
            )
        passed, reasons, results = result.passed, result.reasons, result.to_json()
    with transaction.atomic():
        Assessment.objects.create(
            tuned_model=tuned,
            release=job.release,
            stage=job.release.current_stage,
            tier=job.tier,
            organization=job.organization,
            plan_version=plan.version,
            passed=passed,
            reasons=list(reasons),
            results=results,
        )
        tuned.status = TunedModelStatus.ACTIVE if passed else TunedModelStatus.HELD
        tuned.held_reason = "; ".join(reasons)
        tuned.approvals_needed = spec.approvals_needed if spec is not None else 1
        succeeded = _set_status(
            job,
            JobStatus.RUNNING,
            status=JobStatus.SUCCEEDED,
            fine_tuned_model=tuned.name,
            finished_at=timezone.now(),
        )
        if not succeeded:  # cancelled while it was assessed: never served
            tuned.status = TunedModelStatus.REJECTED
        tuned.save(update_fields=["status", "held_reason", "approvals_needed", "updated_at"])
        if not succeeded:
            event(job, f"{tuned.name} will not be served: the job was cancelled", level="warn")
        elif passed:
            event(job, f"New fine-tuned model created: {tuned.name}; its assessment passed")
        else:
            event(
                job,
                f"New fine-tuned model created: {tuned.name}. Its assessment failed:"
                f" {tuned.held_reason}. It is held for review",
                level="warn",
            )
        audit.record(
            "tuned_model.assessed",
            actor=ACTOR,
            object_type=ObjectType.TUNED_MODEL,
            object_id=tuned.public_id,
            data={"model": tuned.name, "passed": passed, "reasons": list(reasons)},
        )
