"""Tripwires (``rollout.tripwires``): an incident or a flag-rate spike pauses the
release or rolls it back one stage, once, without waiting for people.

Cast: tests/rollout/mini_cast.py (atlas-mini).
"""

from __future__ import annotations

from datetime import timedelta

from django.core import mail
from django.utils import timezone

from monitoring.models import AuditEvent
from rollout import transitions
from rollout.models import Release, StageTransition
from rollout.tripwires import check_tripwires
from tests.rollout.mini_cast import healthy_traffic, review_now


def test_incident_tripwire_pauses_the_release_at_once(
    mini, login_as, rita, settings, django_capture_on_commit_callbacks
):
    settings.STAGEGATE_NOTIFY_EMAILS = ["oncall@example.org"]

    with django_capture_on_commit_callbacks(execute=True):
        response = login_as(rita).post(
            "/api/incidents/",
            {"release": "atlas-mini", "severity": "high", "title": "model leaks training data"},
            format="json",
        )

    assert response.status_code == 201, response.content
    assert response.json()["stage"] == "research_preview"
    mini.refresh_from_db()
    assert mini.state == "paused"
    transition = StageTransition.objects.get(release=mini, kind="pause")
    assert transition.actor is None
    assert "serious-incident" in transition.reason
    assert [message.subject for message in mail.outbox] == [
        "[Stagegate] automatic: atlas-mini paused"
    ]
    audit_actor = AuditEvent.objects.get(action="release.pause").actor
    assert audit_actor == "system:tripwire:serious-incident"


def test_flag_rate_tripwire_pauses_the_release(mini):
    healthy_traffic(mini, count=100, flagged_every=2, minutes=30)

    fired = check_tripwires()

    mini.refresh_from_db()
    assert mini.state == "paused"
    assert [(f.release, f.action) for f in fired] == [("atlas-mini", "pause")]
    assert [r.name for r in fired[0].tripwires] == ["flag-spike"]
    # Checked again: already paused, nothing more happens.
    assert check_tripwires() == []


def test_flag_rate_tripwire_rolls_back_from_commercial(mini, ada, rita, ruth):
    healthy_traffic(mini)
    review = review_now(mini)
    transitions.approve(review, reviewer=rita)
    transitions.approve(review, reviewer=ruth)
    # In commercial for an hour, the last half of it with a flag spike.
    Release.objects.filter(pk=mini.pk).update(stage_entered_at=timezone.now() - timedelta(hours=1))
    mini.refresh_from_db()
    healthy_traffic(mini, count=100, flagged_every=2, minutes=30)

    fired = check_tripwires()
    again = check_tripwires()

    mini.refresh_from_db()
    assert mini.current_stage == "research_preview"
    assert mini.state == "active"
    assert fired[0].action == "rollback"
    assert again == []


def test_tripwire_below_min_requests_does_not_fire(mini):
    healthy_traffic(mini, count=10, flagged_every=1, minutes=30)

    assert check_tripwires() == []
    mini.refresh_from_db()
    assert mini.state == "active"


def test_resumed_release_is_not_paused_again_for_the_traffic_that_paused_it(mini, ada):
    healthy_traffic(mini, count=100, flagged_every=2, minutes=30)
    check_tripwires()
    transitions.resume(mini, actor=ada, reason="filter fixed")

    assert check_tripwires() == []
    mini.refresh_from_db()
    assert mini.state == "active"
