"""Where each release stands: stage, state and latest review, in two queries (for
the metrics and the console)."""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import OuterRef, Subquery

from rollout.models import Release, ReleaseState, Review
from rollout.plans import plan_doc


@dataclass(frozen=True)
class ReleaseStatus:
    release: str
    stage: str
    stage_index: int
    state: str
    review: Review | None


def release_status() -> list[ReleaseStatus]:
    latest = Review.objects.filter(release=OuterRef("pk")).order_by("-created_at", "-id")
    releases = list(
        Release.objects.exclude(state=ReleaseState.RETIRED)
        .filter(active_plan__isnull=False)
        .select_related("active_plan")
        .annotate(latest_review=Subquery(latest.values("pk")[:1]))
    )
    reviews = Review.objects.in_bulk([r.latest_review for r in releases if r.latest_review])
    statuses = []
    for release in releases:
        names = plan_doc(release.active_plan).stage_names
        index = names.index(release.current_stage) if release.current_stage in names else -1
        statuses.append(
            ReleaseStatus(
                release=release.name,
                stage=release.current_stage,
                stage_index=index,
                state=release.state,
                review=reviews.get(release.latest_review),
            )
        )
    return statuses
