"""Celery tasks of the tuning app: thin, named, keyword-only, idempotent."""

from __future__ import annotations

from stagegate.celery import RETRIED, app


@app.task(name="stagegate.advance_fine_tuning_job", **RETRIED)
def advance_fine_tuning_job(*, job_id: int) -> str | None:
    """Take one fine-tuning job as far as it can go now (tuning.runner)."""
    from tuning.runner import advance_job

    return advance_job(job_id)


@app.task(name="stagegate.advance_fine_tuning_jobs", **RETRIED)
def advance_fine_tuning_jobs() -> dict:
    """The sweep: every job with something to do and no runner on it (after a restart,
    a lost message, or training that outlasted its first runner)."""
    from tuning.runner import advance_job, pending_jobs

    jobs = pending_jobs()
    for job_id in jobs:
        advance_job(job_id, budget_seconds=10.0)
    return {"jobs": len(jobs)}


@app.task(name="stagegate.delete_expired_findings", **RETRIED)
def delete_expired_findings() -> dict:
    """Delete training rows' excerpts kept past the plan's retain_days, audited."""
    from tuning.services import delete_expired_findings as delete

    return {"deleted": delete()}
