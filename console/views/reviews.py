"""The review queue (reviews awaiting approval, oldest first) and one review's page."""

from __future__ import annotations

from django.shortcuts import get_object_or_404, render
from django.utils import timezone

from console.guards import staff_page
from console.reviewing import awaiting_reviews, review_status
from console.views.actions import VerdictForm
from rollout.models import Review


@staff_page
def reviews(request):
    rows = awaiting_reviews()
    return render(
        request,
        "console/reviews.html",
        {
            "waiting": [row for row in rows if row.stale is None],
            "stale": [row for row in rows if row.stale is not None],
            "now": timezone.now(),
        },
    )


def screening_seen(review: Review) -> dict | None:
    """What a stored review saw of screening: (category, flagged, refused) rows and the
    flagged samples by status; None when it saw nothing (or predates screening)."""
    telemetry = review.telemetry or {}
    flagged = telemetry.get("flagged_by_category") or {}
    denied = telemetry.get("denied_by_category") or {}
    samples = telemetry.get("samples") or {}
    if not (
        flagged or denied or any(samples.get(k) for k in ("pending", "confirmed", "dismissed"))
    ):
        return None
    rows = [
        (name, flagged.get(name, 0), denied.get(name, 0)) for name in sorted({*flagged, *denied})
    ]
    return {"categories": rows, "samples": samples}


@staff_page
def review(request, public_id: str):
    found = get_object_or_404(
        Review.objects.select_related("release__active_plan", "plan", "requested_by", "transition"),
        public_id=public_id,
    )
    status = review_status(found)
    return render(
        request,
        "console/review.html",
        {
            "review": found,
            "release": found.release,
            "status": status,
            "screening": screening_seen(found),
            "may_vote": status.may_vote(request.user),
            "requested_by_you": status.requested_by(request.user),
            "approve_form": VerdictForm(prefix="approve"),
            "reject_form": VerdictForm(prefix="reject"),
        },
    )
