"""Changing a release's stage or state: approvals and advance, roll back, pause, resume.

Every change here is one transaction that holds the release's row lock, writes the
``StageTransition`` and its audit row. The audit row is what tells every proxy
worker to reload the release (``access.snapshot``), so a pause or a new stage is
served within a poll interval. Each action is idempotent: a
repeated call changes nothing and says so (``created=False`` or ``None``).

Four eyes: a review recommending *advance* needs its plan's ``approvals_needed``
approvals from distinct users with the reviewer role, none of them the user who
requested the review, and no rejection. An approval counts only while its review is
the release's latest and the release is still in the same stage stint on the same
plan version; anything newer voids it (Flagsmith #7056, Unleash #4493).
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db import IntegrityError, transaction
from django.utils import timezone

from monitoring import audit
from rollout.models import (
    Approval,
    Recommendation,
    Release,
    ReleaseState,
    Review,
    StageTransition,
    TransitionKind,
    Verdict,
)
from rollout.plan_schema import severity_at_least
from rollout.plans import plan_doc
from rollout.reviews import open_incidents
from stagegate.celery import enqueue
from stagegate.errors import Refused
from stagegate.roles import REVIEWER, is_rollout_admin, staff_roles


def _locked(release: Release) -> Release:
    return (
        Release.objects.select_for_update(of=("self",))
        .select_related("active_plan")
        .get(pk=release.pk)
    )


def _user(actor):
    """The user behind ``actor``, or None for a system actor (``"system:tripwire"``)."""
    return actor if getattr(actor, "pk", None) else None


def _open_incidents_at_or_above(release: Release, floors: list[str]) -> list[str]:
    """Ids of the open incidents of the release's current stage at or above any floor."""
    return [
        incident.public_id
        for incident in open_incidents(release)
        if incident.stage == release.current_stage
        and any(severity_at_least(incident.severity, floor) for floor in floors)
    ]


def _require_rollout_admin(actor) -> None:
    user = _user(actor)
    if user is not None and not is_rollout_admin(user):
        raise Refused("not_rollout_admin", "only a rollout admin may do this", status=403)


def _require_reason(reason: str) -> str:
    reason = " ".join((reason or "").split())
    if not reason:
        raise Refused("reason_required", "say why: a reason is required", status=400)
    return reason[:1000]


def _transition(
    release: Release,
    *,
    kind: str,
    actor,
    reason: str,
    to_stage: str | None = None,
    to_state: str | None = None,
    review: Review | None = None,
    data: dict | None = None,
) -> StageTransition:
    """Apply one change to a locked release, with its transition and audit rows."""
    now = timezone.now()
    from_stage, from_state = release.current_stage, release.state
    if to_stage is not None and to_stage != from_stage:
        release.current_stage = to_stage
        release.stage_entered_at = now
    if to_state is not None:
        release.state = to_state
    release.save(update_fields=["current_stage", "stage_entered_at", "state", "updated_at"])
    transition = StageTransition.objects.create(
        release=release,
        kind=kind,
        from_stage=from_stage,
        to_stage=release.current_stage,
        from_state=from_state,
        to_state=release.state,
        plan=release.active_plan,
        actor=_user(actor),
        reason=reason,
        review=review,
    )
    audit.record(
        f"release.{kind}",
        actor=actor,
        object_type=audit.ObjectType.RELEASE,
        object_id=release.public_id,
        data={
            "release": release.name,
            "transition": transition.public_id,
            "from_stage": from_stage,
            "to_stage": release.current_stage,
            "from_state": from_state,
            "to_state": release.state,
            "plan_version": release.active_plan.version,
            "reason": reason,
            **(data or {}),
        },
    )
    # By name: rollout.tasks imports the tripwires, which import this module.
    enqueue("stagegate.notify_transition", transition_id=transition.public_id)
    return transition


# --- reviews and approvals ------------------------------------------------------------------


def stale_reason(
    review: Review, release: Release, *, latest_id: int | None = None
) -> Refused | None:
    """Why approvals of ``review`` no longer count, or None while they do. A caller that
    already knows the pk of the release's latest review passes it as ``latest_id`` (a
    list of reviews then costs no query per row)."""
    latest = latest_id
    if latest is None:
        latest = release.reviews.order_by("-created_at", "-id").values_list("pk", flat=True).first()
    if latest != review.pk:
        return Refused("review_superseded", "a newer review of this release replaces this one")
    if review.plan_id != release.active_plan_id:
        return Refused("plan_changed", "the rollout plan changed since this review")
    if review.stage != release.current_stage or review.stage_entered_at != release.stage_entered_at:
        return Refused("stage_changed", "the release changed stage since this review")
    if release.state != ReleaseState.ACTIVE:
        return Refused("release_not_active", f"{release.name} is {release.state}")
    return None


def _is_reviewer(user) -> bool:
    return REVIEWER in staff_roles(user)


def counted_approvals(review: Review) -> list[Approval]:
    """The approvals that count: verdict approve, by a reviewer who still holds the
    role, never the user who requested the review."""
    approvals = review.approvals.filter(verdict=Verdict.APPROVE).select_related("reviewer")
    return [
        approval
        for approval in approvals
        if approval.reviewer_id != review.requested_by_id
        and approval.reviewer.is_active
        and approval.plan_id == review.plan_id
        and _is_reviewer(approval.reviewer)
    ]


@dataclass(frozen=True)
class ApproveResult:
    approval: Approval
    created: bool  # False: this reviewer had already given this verdict
    transition: StageTransition | None  # the advance this approval completed, if any
    blocked: str = ""  # why the count was reached but the advance was refused


def approve(review: Review, *, reviewer, verdict: str = Verdict.APPROVE, comment: str = ""):
    """Record ``reviewer``'s verdict on ``review``. The approval that completes the
    count advances the release in the same transaction."""
    if not _is_reviewer(reviewer):
        raise Refused("not_a_reviewer", "only users with the reviewer role approve", status=403)
    if review.requested_by_id is not None and review.requested_by_id == reviewer.pk:
        raise Refused(
            "self_approval",
            "you requested this review; another reviewer must approve it",
            status=403,
        )
    with transaction.atomic():
        release = _locked(review.release)
        existing = review.approvals.filter(reviewer=reviewer).first()
        if existing is not None:
            if existing.verdict != verdict:
                raise Refused(
                    "already_decided", f"you already gave this review '{existing.verdict}'"
                )
            return ApproveResult(existing, False, getattr(review, "transition", None))
        if (refused := stale_reason(review, release)) is not None:
            raise refused
        if review.recommendation != Recommendation.ADVANCE:
            raise Refused(
                "review_not_advance",
                f"this review recommends {review.recommendation}; only an advance is approved",
            )
        try:
            with transaction.atomic():
                approval = Approval.objects.create(
                    review=review,
                    plan=review.plan,
                    stage=review.stage,
                    reviewer=reviewer,
                    verdict=verdict,
                    comment=comment[:2000],
                )
        except IntegrityError:  # a concurrent request of the same reviewer won
            raise Refused("already_decided", "you already decided on this review") from None
        audit.record(
            f"review.{'approved' if verdict == Verdict.APPROVE else 'rejected'}",
            actor=reviewer,
            object_type=audit.ObjectType.APPROVAL,
            object_id=approval.public_id,
            data={
                "review": review.public_id,
                "release": release.name,
                "stage": review.stage,
                "plan_version": review.plan.version,
                "comment": approval.comment,
            },
        )
        transition, blocked = None, ""
        complete = 0 < review.approvals_needed <= len(counted_approvals(review))
        if verdict == Verdict.APPROVE and complete:
            try:
                with transaction.atomic():  # a refused advance keeps the approval
                    transition = _advance(review, release, actor=reviewer)
            except Refused as refused:
                blocked = f"{refused.code}: {refused.message}"
    return ApproveResult(approval, True, transition, blocked)


def advance(review: Review, *, actor) -> tuple[StageTransition, bool]:
    """Advance the release to the stage after the one ``review`` judged, if the review
    still stands and has its approvals. Returns (transition, created); calling it again
    for the same review returns the same transition."""
    with transaction.atomic():
        release = _locked(review.release)
        done = StageTransition.objects.filter(review=review).first()
        if done is not None:
            return done, False
        return _advance(review, release, actor=actor), True


def _advance(review: Review, release: Release, *, actor) -> StageTransition:
    if (refused := stale_reason(review, release)) is not None:
        raise refused
    if review.recommendation != Recommendation.ADVANCE:
        raise Refused("review_not_advance", f"this review recommends {review.recommendation}")
    if review.approvals.filter(verdict=Verdict.REJECT).exists():
        raise Refused("review_rejected", "a reviewer rejected this review")
    approvals = counted_approvals(review)
    if len(approvals) < review.approvals_needed:
        raise Refused(
            "approvals_missing",
            f"{len(approvals)} of {review.approvals_needed} approvals from distinct reviewers",
        )
    doc = plan_doc(release.active_plan)
    stage = doc.stage(release.current_stage)
    # An incident filed after the review still blocks the exit.
    floor = stage.exit_criteria.block_on_incident_severity if stage.exit_criteria else "high"
    if blocking := _open_incidents_at_or_above(release, [floor]):
        raise Refused("open_incident", f"open incident blocks the exit: {', '.join(blocking)}")
    next_stage = doc.next_stage(release.current_stage)
    if next_stage is None:
        raise Refused("final_stage", f"{release.current_stage} is the last stage")
    approvers = sorted(approval.reviewer.get_username() for approval in approvals)
    return _transition(
        release,
        kind=TransitionKind.ADVANCE,
        actor=actor,
        reason=f"review {review.public_id} approved by {', '.join(approvers) or 'nobody needed'}",
        to_stage=next_stage,
        review=review,
        data={"review": review.public_id, "approved_by": approvers},
    )


# --- roll back, pause, resume ----------------------------------------------------------------


def rollback(
    release: Release, *, actor, reason: str, from_stage: str | None = None
) -> StageTransition | None:
    """Move the release back one stage. With ``from_stage``, only if it is still in that
    stage (so a repeated request, or a second tripwire, does not go back twice): None
    when it no longer is."""
    _require_rollout_admin(actor)
    reason = _require_reason(reason)
    with transaction.atomic():
        release = _locked(release)
        if from_stage is not None and release.current_stage != from_stage:
            return None
        if release.state == ReleaseState.RETIRED:
            raise Refused("release_retired", f"{release.name} is retired")
        previous = plan_doc(release.active_plan).previous_stage(release.current_stage)
        if previous is None:
            raise Refused("first_stage", f"{release.current_stage} is the first stage")
        return _transition(
            release, kind=TransitionKind.ROLLBACK, actor=actor, reason=reason, to_stage=previous
        )


def pause(release: Release, *, actor, reason: str) -> StageTransition | None:
    """Stop serving the release (the proxy answers ``release_paused``). None if paused."""
    _require_rollout_admin(actor)
    reason = _require_reason(reason)
    with transaction.atomic():
        release = _locked(release)
        if release.state == ReleaseState.PAUSED:
            return None
        if release.state == ReleaseState.RETIRED:
            raise Refused("release_retired", f"{release.name} is retired")
        return _transition(
            release,
            kind=TransitionKind.PAUSE,
            actor=actor,
            reason=reason,
            to_state=ReleaseState.PAUSED,
        )


def resume(release: Release, *, actor, reason: str) -> StageTransition | None:
    """Serve a paused release again, in the stage it was paused in. None if not paused."""
    _require_rollout_admin(actor)
    reason = _require_reason(reason)
    with transaction.atomic():
        release = _locked(release)
        if release.state != ReleaseState.PAUSED:
            return None
        # An open incident that an incident tripwire acts on would pause it again.
        stage = plan_doc(release.active_plan).stage(release.current_stage)
        floors = [t.severity for t in stage.tripwires if t.metric == "incident"] if stage else []
        if tripping := _open_incidents_at_or_above(release, floors):
            raise Refused(
                "open_incident",
                f"resolve {', '.join(tripping)} first: an incident tripwire acts on it",
            )
        return _transition(
            release,
            kind=TransitionKind.RESUME,
            actor=actor,
            reason=reason,
            to_state=ReleaseState.ACTIVE,
        )
