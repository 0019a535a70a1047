"""Celery tasks of the rollout app: thin, named, keyword-only, idempotent."""

from __future__ import annotations

from django.db import DatabaseError

from rollout.notifications import NotificationFailed
from stagegate.celery import RETRIED, app


@app.task(name="stagegate.check_tripwires", **RETRIED)
def check_tripwires(*, release: str | None = None) -> list[dict]:
    from rollout.tripwires import check_tripwires as check

    return [
        {
            "release": fired.release,
            "action": fired.action,
            "tripwires": [result.name for result in fired.tripwires],
            "transition": fired.transition.public_id if fired.transition else None,
        }
        for fired in check(release=release)
    ]


@app.task(name="stagegate.review_releases", **RETRIED)
def review_releases() -> list[dict]:
    from rollout.reviews import review_releases as review

    return [
        {"release": r.release.name, "review": r.public_id, "recommendation": r.recommendation}
        for r in review()
    ]


@app.task(
    name="stagegate.notify_transition",
    autoretry_for=(NotificationFailed, OSError, DatabaseError),
    max_retries=3,
    retry_backoff=5,
    retry_jitter=True,
)
def notify_transition(*, transition_id: str) -> dict:
    from rollout.notifications import notify_transition as notify

    return notify(transition_id)
