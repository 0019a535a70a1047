"""What runs periodically, and how often: one list for Celery beat and for the
in-process scheduler of the embedded mode, so both run the same tasks on the same
schedule."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings


@dataclass(frozen=True)
class Periodic:
    task: str  # the registered task name
    every: float  # seconds between runs


def schedule() -> tuple[Periodic, ...]:
    return (
        Periodic("stagegate.rollup_usage", settings.STAGEGATE_ROLLUP_INTERVAL),
        Periodic("stagegate.check_tripwires", settings.STAGEGATE_TRIPWIRE_INTERVAL),
        Periodic("stagegate.review_releases", settings.STAGEGATE_REVIEW_INTERVAL),
        Periodic("stagegate.expire_verifications", 3600),
        Periodic("stagegate.delete_expired_samples", 3600),
        Periodic("stagegate.advance_fine_tuning_jobs", settings.STAGEGATE_FINE_TUNING_SWEEP),
        Periodic("stagegate.delete_expired_findings", 3600),
        Periodic(
            "stagegate.publish_audit_checkpoint", settings.STAGEGATE_AUDIT_CHECKPOINT_INTERVAL
        ),
    )


def beat_schedule() -> dict[str, dict]:
    """``schedule()`` as Celery's ``beat_schedule``. A periodic message expires after
    one interval: if workers fall behind, stale runs are dropped, not piled up."""
    return {
        job.task: {"task": job.task, "schedule": job.every, "options": {"expires": job.every}}
        for job in schedule()
    }
