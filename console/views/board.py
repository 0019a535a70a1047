"""The board: every release, where it stands and what blocks its next gate."""

from __future__ import annotations

from dataclasses import dataclass

from django.shortcuts import render
from django.utils import timezone

from console.guards import staff_page
from rollout.models import Recommendation, Release, ReleaseState, Review
from rollout.plans import plan_doc
from rollout.reviews import Evaluation, evaluate
from rollout.status import stage_index, with_latest_review
from rollout.transitions import counted_approvals


@dataclass(frozen=True)
class BoardRow:
    release: Release
    stages: list[str]
    stage_index: int
    evaluation: Evaluation | None
    blockers: list  # failing exit criteria (name, explanation)
    latest_review: Review | None
    approvals_waiting: int  # approvals still needed on the latest advance recommendation


def board_rows() -> list[BoardRow]:
    """One row per release with a plan; retired ones last."""
    rows = []
    now = timezone.now()
    for release, review in with_latest_review(
        Release.objects.filter(active_plan__isnull=False)
        .select_related("active_plan")
        .order_by("state", "name")
    ):
        doc = plan_doc(release.active_plan)
        names = doc.stage_names
        evaluation = None
        if release.state != ReleaseState.RETIRED:
            evaluation = evaluate(release, now=now)
        waiting = 0
        if review is not None and review.recommendation == Recommendation.ADVANCE:
            waiting = max(0, review.approvals_needed - len(counted_approvals(review)))
        rows.append(
            BoardRow(
                release=release,
                stages=names,
                stage_index=stage_index(release, names),
                evaluation=evaluation,
                blockers=[c for c in evaluation.criteria if not c.passed] if evaluation else [],
                latest_review=review,
                approvals_waiting=waiting,
            )
        )
    return rows


@staff_page
def board(request):
    template = "console/partials/board_rows.html" if request.htmx else "console/board.html"
    return render(request, template, {"rows": board_rows(), "now": timezone.now()})
