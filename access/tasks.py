"""Celery tasks of the access app: thin, named, keyword-only, idempotent."""

from __future__ import annotations

from stagegate.celery import RETRIED, app


@app.task(name="stagegate.expire_verifications", **RETRIED)
def expire_verifications() -> dict:
    """Mark verifications past their expiry as expired, audited (access.tier_changes)."""
    from access.tier_changes import expire_verifications as expire

    return {"expired": expire()}
