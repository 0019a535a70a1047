"""Celery tasks of the rollout app: thin, named, keyword-only, idempotent.

The top of the rollout app's imports: nothing in ``rollout`` imports this module.
A service that starts one of these tasks names it (``stagegate.celery.enqueue``).
"""

from __future__ import annotations

from django.db import DatabaseError

from rollout import notifications, reviews, tripwires
from stagegate.celery import RETRIED, app


@app.task(name="stagegate.check_tripwires", **RETRIED)
def check_tripwires(*, release: str | None = None) -> list[dict]:
    return [
        {
            "release": fired.release,
            "action": fired.action,
            "tripwires": [result.name for result in fired.tripwires],
            "transition": fired.transition.public_id if fired.transition else None,
        }
        for fired in tripwires.check_tripwires(release=release)
    ]


@app.task(name="stagegate.review_releases", **RETRIED)
def review_releases() -> list[dict]:
    return [
        {"release": r.release.name, "review": r.public_id, "recommendation": r.recommendation}
        for r in reviews.review_releases()
    ]


@app.task(
    name="stagegate.notify_transition",
    autoretry_for=(notifications.NotificationFailed, OSError, DatabaseError),
    max_retries=3,
    retry_backoff=5,
    retry_jitter=True,
)
def notify_transition(*, transition_id: str) -> dict:
    return notifications.notify_transition(transition_id)
