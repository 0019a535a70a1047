"""What a refused action means, in words for the person who tried it.

Services refuse with a stable code (``stagegate.errors.Refused``); the API shows the
code and its one-line message. The console says what happened and what to do next,
one sentence per code of the actions it offers (``rollout.transitions``,
``rollout.reviews.create_review``). A test ties this table to the codes those modules
raise, so a new code cannot reach a user as a bare message unnoticed.
"""

from __future__ import annotations

from stagegate.errors import Refused

SENTENCES: dict[str, str] = {
    # approving and rejecting (rollout.transitions.approve)
    "self_approval": (
        "You requested this review, so you cannot approve it: another reviewer must (four eyes)."
    ),
    "not_a_reviewer": "Only users with the reviewer role approve or reject reviews.",
    "already_decided": "You already gave your verdict on this review; a verdict cannot change.",
    "review_superseded": (
        "A newer review of this release exists; approvals count only on the latest review, "
        "so vote on that one."
    ),
    "plan_changed": (
        "The rollout plan changed since this review, so its approvals no longer count: "
        "request a new review."
    ),
    "stage_changed": (
        "The release moved stage since this review, so its approvals no longer count: "
        "request a new review."
    ),
    "release_not_active": (
        "The release is not active (paused or retired); approvals count only while it "
        "is served. Resume it and request a new review."
    ),
    "review_not_advance": (
        "This review does not recommend an advance, so there is nothing to approve."
    ),
    # carrying out the advance the last approval completes (rollout.transitions._advance)
    "review_rejected": "A reviewer rejected this review, so it cannot advance.",
    "approvals_missing": "The review does not have all its approvals yet.",
    "final_stage": "The release is in its last stage; there is no stage to advance to.",
    "open_incident": "An open incident blocks this; resolve it first.",
    # pause, resume, roll back
    "not_rollout_admin": "Only a rollout admin may pause, resume or roll back a release.",
    "reason_required": "Say why: a reason is required.",
    "release_retired": "The release is retired; nothing can change it any more.",
    "first_stage": "The release is in its first stage; there is no stage to roll back to.",
    # requesting a review (rollout.reviews)
    "no_plan": "The release has no rollout plan to review it against.",
    "stage_not_in_plan": "The release's stage is not in its plan; apply a plan that has it.",
    # deciding a flagged sample (monitoring.flags.decide_sample)
    "sample_decided": (
        "This sample was already decided, by another reviewer or in another tab; a decision"
        " cannot change."
    ),
    "sample_not_found": "This sample is gone: it expired, or it never existed.",
}

# Why a review is stale, as the queue says it ("stale: the plan changed; ...").
STALE_PHRASES: dict[str, str] = {
    "review_superseded": "a newer review replaces it",
    "plan_changed": "the plan changed",
    "stage_changed": "the release changed stage",
    "release_not_active": "the release is not active",
}


def explain(refused: Refused) -> str:
    """One sentence for ``refused``; its detail (incident ids, counts) appended when the
    code's sentence alone would hide it."""
    sentence = SENTENCES.get(refused.code)
    if sentence is None:
        return refused.message[:1].upper() + refused.message[1:] + "."
    if refused.code in ("open_incident", "approvals_missing"):
        return f"{sentence} ({refused.message})"
    return sentence


def stale_phrase(refused: Refused) -> str:
    """``stale: <why>; request a new review``, for a review whose approvals no longer
    count."""
    why = STALE_PHRASES.get(refused.code, refused.message)
    return f"stale: {why}; request a new review"
