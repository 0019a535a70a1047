"""Celery tasks of the monitoring app: thin, named, keyword-only, idempotent."""

from __future__ import annotations

from stagegate.celery import RETRIED, app


@app.task(name="stagegate.rollup_usage", **RETRIED)
def rollup_usage() -> dict:
    """Roll up the usage events written since the last run (monitoring.rollups)."""
    from monitoring.rollups import rollup_pending

    report = rollup_pending()
    return {
        "events_seen": report.events_seen,
        "buckets_written": report.buckets_written,
        "chunks": report.chunks,
        "rolled_up_to": report.rolled_up_to.isoformat() if report.rolled_up_to else None,
        "skipped": report.skipped,
    }
