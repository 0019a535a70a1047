"""Where each release stands: stage, state and latest review, in two queries (for
the metrics and the console)."""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import OuterRef, QuerySet, Subquery

from rollout.models import Release, ReleaseState, Review
from rollout.plans import plan_doc


@dataclass(frozen=True)
class ReleaseStatus:
    release: str
    stage: str
    stage_index: int
    state: str
    review: Review | None


def with_latest_review(releases: QuerySet) -> list[tuple[Release, Review | None]]:
    """Each release of ``releases`` with its latest review (or None), in two queries."""
    latest = Review.objects.filter(release=OuterRef("pk")).order_by("-created_at", "-id")
    found = list(releases.annotate(latest_review=Subquery(latest.values("pk")[:1])))
    reviews = Review.objects.in_bulk([r.latest_review for r in found if r.latest_review])
    return [(release, reviews.get(release.latest_review)) for release in found]


def stage_index(release: Release, names: list[str]) -> int:
    """Where the release's current stage stands in its plan's ladder (-1: not in it)."""
    return names.index(release.current_stage) if release.current_stage in names else -1


def release_status() -> list[ReleaseStatus]:
    statuses = []
    for release, review in with_latest_review(
        Release.objects.exclude(state=ReleaseState.RETIRED)
        .filter(active_plan__isnull=False)
        .select_related("active_plan")
    ):
        statuses.append(
            ReleaseStatus(
                release=release.name,
                stage=release.current_stage,
                stage_index=stage_index(release, plan_doc(release.active_plan).stage_names),
                state=release.state,
                review=review,
            )
        )
    return statuses
