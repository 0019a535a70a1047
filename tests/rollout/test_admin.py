"""The rollout admin (``rollout.admin``): the review approve and reject actions, the
incident form and its resolution, the release pause action.

Cast: tests/rollout/mini_cast.py (atlas-mini).
"""

from __future__ import annotations

from django.contrib.messages import get_messages

from monitoring.models import AuditEvent
from rollout.incidents import file_incident
from rollout.models import Incident, Review, StageTransition
from tests.rollout.mini_cast import healthy_traffic, review_now


def staff(user):
    """``user`` let into the admin (is_staff); the review pages follow the user's staff
    role, with no model permissions granted."""
    user.is_staff = True
    user.save(update_fields=["is_staff"])
    return user


def admin_action(client, user, action: str, review: Review):
    """Run a changelist action on one review as ``user``; the messages it left."""
    client.force_login(user)
    response = client.post(
        "/admin/rollout/review/",
        {"action": action, "_selected_action": [review.pk]},
        follow=True,
    )
    assert response.redirect_chain == [("/admin/rollout/review/", 302)]
    return [(m.level_tag, m.message) for m in get_messages(response.wsgi_request)]


def test_admin_approve_action_by_two_reviewers_advances_the_release(mini, client, ada, rita, ruth):
    staff(rita)
    staff(ruth)
    healthy_traffic(mini)
    review = review_now(mini, ada)

    first = admin_action(client, rita, "approve", review)
    mini.refresh_from_db()
    stage_after_first = mini.current_stage
    second = admin_action(client, ruth, "approve", review)

    assert first == [("success", f"{review.public_id}: approve recorded")]
    assert stage_after_first == "research_preview"
    assert second == [
        ("success", f"{review.public_id}: approve recorded; atlas-mini advanced to commercial")
    ]
    mini.refresh_from_db()
    assert mini.current_stage == "commercial"
    assert list(review.approvals.values_list("reviewer__username", "verdict")) == [
        ("rita", "approve"),
        ("ruth", "approve"),
    ]


def test_admin_approve_action_refuses_the_requester(mini, client, rita):
    staff(rita)
    healthy_traffic(mini)
    review = review_now(mini, rita)

    messages = admin_action(client, rita, "approve", review)

    assert messages == [
        (
            "error",
            f"{review.public_id}: you requested this review; another reviewer must approve it",
        )
    ]
    assert review.approvals.count() == 0
    assert AuditEvent.objects.filter(action="review.approved").count() == 0


def test_admin_reject_action_blocks_the_advance(mini, client, ada, rita, ruth):
    staff(rita)
    staff(ruth)
    healthy_traffic(mini)
    review = review_now(mini, ada)

    admin_action(client, rita, "reject", review)
    messages = admin_action(client, ruth, "approve", review)

    assert messages == [("success", f"{review.public_id}: approve recorded")]
    mini.refresh_from_db()
    assert mini.current_stage == "research_preview"


def test_admin_incident_form_files_and_trips_the_release(
    mini, client, rita, django_capture_on_commit_callbacks
):
    client.force_login(staff(rita))

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/admin/rollout/incident/add/",
            {
                "release": mini.pk,
                "stage": "",
                "severity": "high",
                "title": "model leaks training data",
                "description": "found by a partner",
            },
        )

    assert response.status_code == 302, response.content
    incident = Incident.objects.get()
    assert (incident.stage, incident.severity, incident.status, incident.opened_by) == (
        "research_preview",
        "high",
        "open",
        rita,
    )
    event = AuditEvent.objects.get(action="incident.opened")
    assert (event.actor, event.object_id, event.data) == (
        "rita",
        incident.public_id,
        {
            "release": "atlas-mini",
            "stage": "research_preview",
            "severity": "high",
            "title": "model leaks training data",
        },
    )
    mini.refresh_from_db()
    assert mini.state == "paused"
    assert list(StageTransition.objects.exclude(kind="create").values_list("kind", "actor")) == [
        ("pause", None)
    ]


def test_admin_incident_form_with_low_severity_leaves_the_release_active(
    mini, client, rita, django_capture_on_commit_callbacks
):
    client.force_login(staff(rita))

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/admin/rollout/incident/add/",
            {"release": mini.pk, "stage": "", "severity": "low", "title": "typo in docs"},
        )

    assert response.status_code == 302, response.content
    mini.refresh_from_db()
    assert (Incident.objects.count(), mini.state) == (1, "active")


def test_admin_incident_form_refuses_a_stage_not_in_the_plan(mini, client, rita):
    client.force_login(staff(rita))

    response = client.post(
        "/admin/rollout/incident/add/",
        {"release": mini.pk, "stage": "nowhere", "severity": "low", "title": "typo in docs"},
    )

    assert response.status_code == 200
    assert response.context["adminform"].form.errors == {
        "stage": ["atlas-mini's plan has no stage 'nowhere'."]
    }
    assert Incident.objects.count() == 0


def test_admin_incident_resolve_needs_a_resolution(mini, client, rita):
    incident = file_incident(mini, severity="low", title="slow answers", actor=rita)
    client.force_login(staff(rita))
    url = f"/admin/rollout/incident/{incident.pk}/change/"
    form = {"title": "slow answers", "description": "", "status": "resolved"}

    blank = client.post(url, {**form, "resolution": "  "})
    resolved = client.post(url, {**form, "resolution": "upstream scaled up"})

    assert blank.status_code == 200
    assert blank.context["adminform"].form.errors == {
        "resolution": ["Say how the incident was resolved."]
    }
    assert resolved.status_code == 302
    incident.refresh_from_db()
    assert (incident.status, incident.resolution, incident.resolved_by) == (
        "resolved",
        "upstream scaled up",
        rita,
    )
    assert AuditEvent.objects.get(action="incident.resolved").actor == "rita"


def test_admin_pause_action_asks_for_a_reason_then_pauses(mini, client, ada):
    ada.is_staff = True
    ada.save(update_fields=["is_staff"])
    client.force_login(ada)
    selected = {"action": "pause", "_selected_action": [mini.pk]}

    asked = client.post("/admin/rollout/release/", selected)
    mini.refresh_from_db()
    state_when_asked = mini.state
    done = client.post(
        "/admin/rollout/release/", {**selected, "apply": "1", "reason": "abuse report"}
    )

    assert asked.status_code == 200
    assert b"Reason (kept in the audit log)" in asked.content
    assert state_when_asked == "active"
    assert done.status_code == 302
    mini.refresh_from_db()
    assert mini.state == "paused"
    assert AuditEvent.objects.get(action="release.pause").data["reason"] == "abuse report"


def test_admin_pause_action_by_a_reviewer_is_refused(mini, client, rita):
    staff(rita)
    client.force_login(rita)

    client.post(
        "/admin/rollout/release/",
        {"action": "pause", "_selected_action": [mini.pk], "apply": "1", "reason": "x"},
    )

    mini.refresh_from_db()
    assert mini.state == "active"
