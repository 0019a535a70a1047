"""Celery tasks of the monitoring app: thin, named, keyword-only, idempotent."""

from __future__ import annotations

from stagegate.celery import RETRIED, app
from stagegate.webhooks import WebhookFailed


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


@app.task(name="stagegate.delete_expired_samples", **RETRIED)
def delete_expired_samples() -> dict:
    """Delete the flagged samples past their expiry (monitoring.flags), audited as a count."""
    from monitoring.flags import delete_expired_samples as delete

    return {"deleted": delete()}


@app.task(
    name="stagegate.publish_audit_checkpoint",
    **{**RETRIED, "autoretry_for": (*RETRIED["autoretry_for"], WebhookFailed)},
)
def publish_audit_checkpoint() -> dict:
    """Publish the audit chain's latest seq and hash outside the database
    (monitoring.checkpoints); a second run with no new row appends nothing."""
    from monitoring.checkpoints import publish_checkpoint

    published = publish_checkpoint()
    return {
        "seq": published.checkpoint.seq,
        "hash": published.checkpoint.hash,
        "appended": published.appended,
        "posted": published.posted,
    }
