"""A release's history as one timeline, newest first: stages entered, plan versions
applied, reviews, approvals and rejections, pauses, resumptions, rollbacks and
advances (tripwire firings among them), incidents filed and resolved.

``release_timeline`` reads a bounded number of rows from each source (one query
each, whatever the history's length) and merges them, so the console's release page
costs the same after a week or after years.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from rollout.models import (
    Approval,
    Incident,
    Release,
    Review,
    RolloutPlan,
    StageTransition,
    TransitionKind,
)

TRIPWIRE_REASON_PREFIX = "tripwire "  # rollout.tripwires writes reasons "tripwire <names>: ..."


@dataclass(frozen=True)
class TimelineItem:
    """One thing that happened to a release.

    ``kind`` is a stable code (``transition.pause``, ``tripwire.rollback``,
    ``review``, ``approval.approve``, ``incident.opened``, ``plan.applied`` ...);
    ``actor`` a username or ``system:<component>``; ``object_id`` the public id of the
    row it comes from (a review, incident, transition or plan).
    """

    at: datetime
    kind: str
    title: str
    detail: str
    actor: str
    object_id: str
    stage: str = ""


def _name(user, fallback: str) -> str:
    return user.get_username() if user is not None else fallback


def _transitions(release: Release, limit: int) -> list[TimelineItem]:
    items = []
    rows = StageTransition.objects.filter(release=release).select_related("actor", "plan")
    for row in rows.order_by("-created_at", "-id")[:limit]:
        by_tripwire = row.actor_id is None and row.reason.startswith(TRIPWIRE_REASON_PREFIX)
        actor = _name(row.actor, "system:tripwire" if by_tripwire else "system")
        if row.kind == TransitionKind.CREATE:
            title = f"created in {row.to_stage}"
        elif row.kind == TransitionKind.ADVANCE:
            title = f"advanced {row.from_stage} → {row.to_stage}"
        elif row.kind == TransitionKind.ROLLBACK:
            title = f"rolled back {row.from_stage} → {row.to_stage}"
        elif row.kind == TransitionKind.PAUSE:
            title = f"paused in {row.to_stage}"
        else:
            title = f"resumed in {row.to_stage}"
        if by_tripwire:
            title = f"tripwire fired: {title}"
        items.append(
            TimelineItem(
                at=row.created_at,
                kind=f"{'tripwire' if by_tripwire else 'transition'}.{row.kind}",
                title=title,
                detail=f"{row.reason} (plan v{row.plan.version})",
                actor=actor,
                object_id=row.public_id,
                stage=row.to_stage,
            )
        )
    return items


def _reviews(release: Release, limit: int) -> list[TimelineItem]:
    rows = Review.objects.filter(release=release).select_related("requested_by")
    return [
        TimelineItem(
            at=row.created_at,
            kind="review",
            title=f"review recommends {row.recommendation}",
            detail=row.summary,
            actor=_name(row.requested_by, "system:reviews"),
            object_id=row.public_id,
            stage=row.stage,
        )
        for row in rows.order_by("-created_at", "-id")[:limit]
    ]


def _approvals(release: Release, limit: int) -> list[TimelineItem]:
    rows = Approval.objects.filter(review__release=release).select_related("reviewer", "review")
    return [
        TimelineItem(
            at=row.created_at,
            kind=f"approval.{row.verdict}",
            title=f"{'approved' if row.verdict == 'approve' else 'rejected'}"
            f" review {row.review.public_id}",
            detail=row.comment,
            actor=_name(row.reviewer, "?"),
            object_id=row.review.public_id,
            stage=row.stage,
        )
        for row in rows.order_by("-created_at", "-id")[:limit]
    ]


def _incidents(release: Release, limit: int) -> list[TimelineItem]:
    items = []
    opened = Incident.objects.filter(release=release).select_related("opened_by")
    for row in opened.order_by("-created_at", "-id")[:limit]:
        items.append(
            TimelineItem(
                at=row.created_at,
                kind="incident.opened",
                title=f"incident filed ({row.severity}): {row.title}",
                detail=row.description,
                actor=_name(row.opened_by, "system"),
                object_id=row.public_id,
                stage=row.stage,
            )
        )
    resolved = Incident.objects.filter(release=release, resolved_at__isnull=False)
    for row in resolved.select_related("resolved_by").order_by("-resolved_at", "-id")[:limit]:
        items.append(
            TimelineItem(
                at=row.resolved_at,
                kind="incident.resolved",
                title=f"incident resolved ({row.severity}): {row.title}",
                detail=row.resolution,
                actor=_name(row.resolved_by, "system"),
                object_id=row.public_id,
                stage=row.stage,
            )
        )
    return items


def _plans(release: Release, limit: int) -> list[TimelineItem]:
    rows = RolloutPlan.objects.filter(release=release).select_related("created_by")
    return [
        TimelineItem(
            at=row.created_at,
            kind="plan.applied",
            title=f"plan version {row.version} applied",
            detail=row.comment,
            actor=_name(row.created_by, "system"),
            object_id=row.public_id,
        )
        for row in rows.order_by("-version").defer("document", "source")[:limit]
    ]


def release_timeline(release: Release, *, limit: int = 50) -> list[TimelineItem]:
    """The ``limit`` most recent things that happened to ``release``, newest first.
    Six queries, each reading at most ``limit`` rows."""
    items = [
        *_transitions(release, limit),
        *_reviews(release, limit),
        *_approvals(release, limit),
        *_incidents(release, limit),
        *_plans(release, limit),
    ]
    items.sort(key=lambda item: item.at, reverse=True)
    return items[:limit]
