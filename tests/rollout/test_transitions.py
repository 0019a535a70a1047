"""Transitions (``rollout.transitions``): four-eyes approval and the advance it
completes, pause, resume and roll back, through the REST API and the services.

Cast: tests/rollout/mini_cast.py (atlas-mini).
"""

from __future__ import annotations

import pytest

from monitoring.models import AuditEvent
from rollout import transitions
from rollout.incidents import file_incident, resolve_incident
from rollout.models import Incident, StageTransition
from rollout.plans import apply_plan
from tests.factories import make_user
from tests.rollout.mini_cast import PLAN, healthy_traffic, review_now


def test_release_advances_after_two_distinct_reviewers_approve(mini, login_as, ada, rita, ruth):
    healthy_traffic(mini)
    review = review_now(mini, ada)

    first = login_as(rita).post(f"/api/reviews/{review.public_id}/approve/", {}, format="json")
    mini.refresh_from_db()
    assert first.status_code == 201
    assert first.json()["transition"] is None
    assert mini.current_stage == "research_preview"

    second = login_as(ruth).post(f"/api/reviews/{review.public_id}/approve/", {}, format="json")

    assert second.status_code == 201, second.content
    mini.refresh_from_db()
    assert mini.current_stage == "commercial"
    transition = StageTransition.objects.get(review=review)
    assert second.json()["transition"]["public_id"] == transition.public_id
    assert (transition.kind, transition.from_stage, transition.to_stage) == (
        "advance",
        "research_preview",
        "commercial",
    )
    event = AuditEvent.objects.get(action="release.advance")
    assert event.data["approved_by"] == ["rita", "ruth"]
    assert event.object_type == "release"


def test_same_reviewer_twice_counts_once(mini, rita):
    healthy_traffic(mini)
    review = review_now(mini)

    transitions.approve(review, reviewer=rita)
    again = transitions.approve(review, reviewer=rita)

    mini.refresh_from_db()
    assert again.created is False
    assert mini.current_stage == "research_preview"
    assert len(transitions.counted_approvals(review)) == 1


def test_self_approval_is_refused(mini, login_as, rita):
    healthy_traffic(mini)
    requested = login_as(rita).post("/api/reviews/", {"release": "atlas-mini"}, format="json")

    response = login_as(rita).post(
        f"/api/reviews/{requested.json()['public_id']}/approve/", {}, format="json"
    )

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "self_approval"


def test_rollout_admin_without_reviewer_role_cannot_approve(mini, login_as, ada):
    healthy_traffic(mini)
    review = review_now(mini)

    response = login_as(ada).post(f"/api/reviews/{review.public_id}/approve/", {}, format="json")

    assert response.status_code == 403


def test_approval_of_a_superseded_review_is_refused(mini, login_as, rita, ruth):
    healthy_traffic(mini)
    old = review_now(mini)
    transitions.approve(old, reviewer=rita)
    new = review_now(mini)

    response = login_as(ruth).post(f"/api/reviews/{old.public_id}/approve/", {}, format="json")

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "review_superseded"
    # rita's approval of the old review does not carry over: one more is not enough.
    transitions.approve(new, reviewer=ruth)
    mini.refresh_from_db()
    assert mini.current_stage == "research_preview"


def test_plan_change_voids_approvals(mini, ada, rita, ruth):
    healthy_traffic(mini)
    review = review_now(mini)
    transitions.approve(review, reviewer=rita)

    apply_plan(PLAN.replace("min_requests: 200", "min_requests: 300", 1), actor=ada)

    with pytest.raises(transitions.Refused) as refused:
        transitions.approve(review, reviewer=ruth)
    assert refused.value.code == "plan_changed"
    with pytest.raises(transitions.Refused):
        transitions.advance(review, actor=ada)


def test_stage_change_voids_approvals(mini, ada, rita, ruth):
    healthy_traffic(mini)
    review = review_now(mini)
    transitions.approve(review, reviewer=rita)
    transitions.pause(mini, actor=ada, reason="investigating")
    transitions.resume(mini, actor=ada, reason="false alarm")

    # Same stage, but paused and resumed: still the same stint, so the approval counts.
    result = transitions.approve(review, reviewer=ruth)
    assert result.transition is not None
    mini.refresh_from_db()
    transitions.rollback(mini, actor=ada, reason="back to research")
    mini.refresh_from_db()

    # Back in research_preview, a new stint: the old review can no longer be approved.
    with pytest.raises(transitions.Refused) as refused:
        transitions.approve(review, reviewer=make_user("rex", roles=("reviewer",)))
    assert refused.value.code == "stage_changed"


def test_rejection_blocks_the_advance(mini, ada, rita, ruth, rex):
    healthy_traffic(mini)
    review = review_now(mini)
    transitions.approve(review, reviewer=rita, verdict="reject")
    transitions.approve(review, reviewer=ruth)

    result = transitions.approve(review, reviewer=rex)

    mini.refresh_from_db()
    assert mini.current_stage == "research_preview"
    assert result.transition is None
    assert result.blocked.startswith("review_rejected")


def test_hold_review_cannot_be_approved(mini, rita):
    review = review_now(mini)

    with pytest.raises(transitions.Refused) as refused:
        transitions.approve(review, reviewer=rita)

    assert refused.value.code == "review_not_advance"


def test_advance_is_idempotent(mini, ada, rita, ruth, login_as):
    healthy_traffic(mini)
    review = review_now(mini)
    transitions.approve(review, reviewer=rita)
    transitions.approve(review, reviewer=ruth)

    response = login_as(ada).post(f"/api/reviews/{review.public_id}/advance/", format="json")

    assert response.status_code == 200
    mini.refresh_from_db()
    assert mini.current_stage == "commercial"
    assert StageTransition.objects.filter(release=mini, kind="advance").count() == 1


def test_open_incident_blocks_the_advance(mini, ada, rita, ruth):
    healthy_traffic(mini)
    review = review_now(mini)
    transitions.approve(review, reviewer=rita)
    Incident.objects.create(
        release=mini, stage="research_preview", severity="high", title="jailbreak found"
    )

    result = transitions.approve(review, reviewer=ruth)

    assert result.transition is None
    assert result.blocked.startswith("open_incident")
    assert review.approvals.count() == 2


def test_pause_and_resume_need_a_reason_and_are_audited(mini, login_as, ada):
    client = login_as(ada)
    url = f"/api/releases/{mini.public_id}"

    missing = client.post(f"{url}/pause/", {}, format="json")
    paused = client.post(f"{url}/pause/", {"reason": "abuse report"}, format="json")
    again = client.post(f"{url}/pause/", {"reason": "abuse report"}, format="json")
    resumed = client.post(f"{url}/resume/", {"reason": "report closed"}, format="json")

    assert missing.status_code == 400
    assert paused.status_code == 201
    assert paused.json()["to_state"] == "paused"
    assert again.json() == {"changed": False}
    assert resumed.status_code == 201
    assert list(
        AuditEvent.objects.filter(action__in=["release.pause", "release.resume"]).values_list(
            "action", "data__reason"
        )
    ) == [("release.pause", "abuse report"), ("release.resume", "report closed")]


def test_reviewer_cannot_pause(mini, login_as, rita):
    response = login_as(rita).post(
        f"/api/releases/{mini.public_id}/pause/", {"reason": "x"}, format="json"
    )

    assert response.status_code == 403


def test_rollback_goes_back_one_stage_once(mini, login_as, ada, rita, ruth):
    healthy_traffic(mini)
    review = review_now(mini)
    transitions.approve(review, reviewer=rita)
    transitions.approve(review, reviewer=ruth)
    client = login_as(ada)
    url = f"/api/releases/{mini.public_id}/rollback/"
    body = {"reason": "flag rate too high", "from_stage": "commercial"}

    first = client.post(url, body, format="json")
    second = client.post(url, body, format="json")

    assert first.status_code == 201
    assert first.json()["to_stage"] == "research_preview"
    assert second.json() == {"changed": False}
    mini.refresh_from_db()
    assert mini.current_stage == "research_preview"


def test_rollback_from_the_first_stage_is_refused(mini, login_as, ada):
    response = login_as(ada).post(
        f"/api/releases/{mini.public_id}/rollback/", {"reason": "oops"}, format="json"
    )

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "first_stage"


def test_resume_is_refused_while_a_tripping_incident_is_open(mini, ada, rita):
    incident = file_incident(mini, severity="high", title="data leak", actor=rita)
    transitions.pause(mini, actor=ada, reason="data leak")

    with pytest.raises(transitions.Refused) as refused:
        transitions.resume(mini, actor=ada, reason="back")
    resolve_incident(incident, actor=rita, resolution="prompt filter deployed")
    resumed = transitions.resume(mini, actor=ada, reason="back")

    assert refused.value.code == "open_incident"
    assert resumed.to_state == "active"
