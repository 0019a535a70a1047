"""What the console shows about stage reviews: where a review stands (its approvals,
whether they still count, what it needs) and the queue of reviews awaiting approval.

The rules are ``rollout.transitions``' own: ``stale_reason`` says whether approvals
still count, ``counted_approvals`` which approvals count. The queue counts them in SQL
with ``COUNTED_APPROVAL``, the same rule as ``counted_approvals`` (a test ties the
two), so the queue costs one query whatever its length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.db.models import Count, F, OuterRef, Q, Subquery

from console.refusals import stale_phrase
from rollout.models import Approval, Recommendation, Release, ReleaseState, Review, Verdict
from rollout.transitions import counted_approvals, stale_reason
from stagegate.errors import Refused
from stagegate.roles import REVIEWER, staff_roles

# An approval counts: an approve, on the plan version of its review, by an active user
# who holds the reviewer role and did not request the review (counted_approvals).
COUNTED_APPROVAL = (
    Q(approvals__verdict=Verdict.APPROVE)
    & Q(approvals__plan=F("plan"))
    & Q(approvals__reviewer__is_active=True)
    & Q(approvals__reviewer__groups__name=REVIEWER)
    & (Q(requested_by__isnull=True) | ~Q(approvals__reviewer=F("requested_by")))
)

QUEUE_LIMIT = 200  # one row per active release at most; a bound all the same


@dataclass(frozen=True)
class ReviewStatus:
    """Where one review stands."""

    review: Review
    counted: int  # approvals that count
    rejected: bool  # a reviewer rejected it
    stale: Refused | None  # why its approvals no longer count
    carried_out: bool  # the advance it recommended happened
    approvals: list[Approval] = field(default_factory=list)  # every verdict, oldest first

    @property
    def needed(self) -> int:
        return self.review.approvals_needed

    @property
    def missing(self) -> int:
        return max(0, self.needed - self.counted)

    @property
    def is_advance(self) -> bool:
        return self.review.recommendation == Recommendation.ADVANCE

    @property
    def open_for_votes(self) -> bool:
        """Reviewers may still approve or reject it."""
        return self.is_advance and not self.carried_out and self.stale is None

    @property
    def needs(self) -> str:
        """What it still needs, in a few words ("2 more approvals")."""
        if self.carried_out:
            return "nothing: the advance happened"
        if not self.is_advance:
            return f"nothing to approve: it recommends {self.review.recommendation}"
        if self.stale is not None:
            return stale_phrase(self.stale)
        if self.rejected:
            return "rejected: it cannot advance; request a new review"
        if self.missing:
            return f"{self.missing} more approval{'s' if self.missing != 1 else ''}"
        if self.needed == 0:
            return "no approvals needed: a rollout admin carries out the advance"
        return "approvals complete: the advance was blocked; see the release"

    def may_vote(self, user) -> bool:
        """``user`` may approve or reject it now."""
        return (
            self.open_for_votes
            and REVIEWER in staff_roles(user)
            and self.review.requested_by_id != user.pk
            and not any(a.reviewer_id == user.pk for a in self.approvals)
        )

    def requested_by(self, user) -> bool:
        return self.review.requested_by_id is not None and self.review.requested_by_id == user.pk


def review_status(review: Review, release: Release | None = None) -> ReviewStatus:
    """Where ``review`` stands now, with its approvals (a handful of queries)."""
    release = release or review.release
    approvals = list(review.approvals.select_related("reviewer").order_by("created_at", "id"))
    return ReviewStatus(
        review=review,
        counted=len(counted_approvals(review)),
        rejected=any(a.verdict == Verdict.REJECT for a in approvals),
        stale=stale_reason(review, release),
        carried_out=hasattr(review, "transition"),
        approvals=approvals,
    )


def latest_review_status(release: Release) -> ReviewStatus | None:
    """Where the release's latest review stands, or None before its first review."""
    review = (
        release.reviews.select_related("requested_by", "plan", "transition")
        .order_by("-created_at", "-id")
        .first()
    )
    return review_status(review, release) if review is not None else None


def awaiting_reviews() -> list[ReviewStatus]:
    """The latest review of each active release that recommends an advance not yet
    carried out, oldest first: those still open for votes, and those gone stale (which
    need a new review). One query."""
    newest = Review.objects.filter(release=OuterRef("release")).order_by("-created_at", "-id")
    reviews = (
        Review.objects.filter(
            release__state=ReleaseState.ACTIVE,
            release__active_plan__isnull=False,
            recommendation=Recommendation.ADVANCE,
            transition__isnull=True,
            pk=Subquery(newest.values("pk")[:1]),
        )
        .select_related("release", "requested_by")
        .annotate(
            counted=Count("approvals", filter=COUNTED_APPROVAL, distinct=True),
            rejections=Count(
                "approvals", filter=Q(approvals__verdict=Verdict.REJECT), distinct=True
            ),
        )
        .order_by("created_at", "id")[:QUEUE_LIMIT]
    )
    return [
        ReviewStatus(
            review=review,
            counted=review.counted,
            rejected=review.rejections > 0,
            stale=stale_reason(review, review.release, latest_id=review.pk),
            carried_out=False,
        )
        for review in reviews
    ]
