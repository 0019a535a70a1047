"""Notifications (``rollout.notifications``): the webhook and e-mail of every
transition, sent after the commit, and the Celery task's retries.

Cast: tests/rollout/mini_cast.py (atlas-mini).
"""

from __future__ import annotations

import pytest
from django.core import mail

from rollout import transitions
from rollout.incidents import file_incident
from rollout.notifications import NotificationFailed, notify_transition
from rollout.tasks import notify_transition as notify_transition_task
from tests import live
from tests.rollout.mini_cast import healthy_traffic, review_now


@pytest.fixture
def webhook(settings):
    hook = live.Webhook()
    settings.STAGEGATE_NOTIFY_WEBHOOK_URL = hook.url
    yield hook
    hook.stop()


def test_pause_posts_the_transition_to_the_webhook(
    mini, ada, webhook, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        transition = transitions.pause(mini, actor=ada, reason="abuse report  from a partner")

    assert webhook.requests == [
        (
            "application/json",
            {
                "event": "release.pause",
                "release": "atlas-mini",
                "transition": transition.public_id,
                "from_stage": "research_preview",
                "to_stage": "research_preview",
                "from_state": "active",
                "to_state": "paused",
                "plan_version": 1,
                "actor": "ada",
                "automatic": False,
                "reason": "abuse report from a partner",
                "at": transition.created_at.isoformat(),
            },
        )
    ]


def test_notification_is_sent_only_after_the_commit(
    mini, ada, webhook, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        transitions.pause(mini, actor=ada, reason="abuse report")

    assert (len(callbacks), webhook.requests) == (1, [])


def test_tripwire_pause_is_announced_as_automatic(
    mini, rita, webhook, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        file_incident(mini, severity="high", title="model leaks training data", actor=rita)

    assert [(b["event"], b["actor"], b["automatic"]) for b in webhook.bodies] == [
        ("release.pause", "system", True)
    ]


def test_webhook_answering_500_fails_the_notification(mini, ada, webhook):
    transition = transitions.pause(mini, actor=ada, reason="abuse report")
    webhook.status = 500

    with pytest.raises(NotificationFailed, match="500"):
        notify_transition(transition.public_id)


def test_unreachable_webhook_fails_the_notification(mini, ada, settings):
    transition = transitions.pause(mini, actor=ada, reason="abuse report")
    settings.STAGEGATE_NOTIFY_WEBHOOK_URL = f"http://127.0.0.1:{live.free_port()}/hook"

    with pytest.raises(NotificationFailed, match="webhook"):
        notify_transition(transition.public_id)


def test_notify_task_retries_a_failing_webhook_three_times(mini, ada, webhook):
    transition = transitions.pause(mini, actor=ada, reason="abuse report")
    webhook.status = 503

    # Run eagerly, Celery's retries happen at once: the first try and three retries.
    result = notify_transition_task.apply(kwargs={"transition_id": transition.public_id})

    assert (result.state, type(result.result)) == ("FAILURE", NotificationFailed)
    assert len(webhook.bodies) == 4


def test_failing_webhook_does_not_undo_the_pause(
    mini, ada, webhook, django_capture_on_commit_callbacks
):
    webhook.status = 500

    with django_capture_on_commit_callbacks(execute=True):
        transitions.pause(mini, actor=ada, reason="abuse report")

    mini.refresh_from_db()
    assert (mini.state, len(webhook.bodies)) == ("paused", 1)


def test_pause_is_e_mailed_to_the_notify_list(
    mini, ada, settings, django_capture_on_commit_callbacks
):
    settings.STAGEGATE_NOTIFY_EMAILS = ["oncall@example.org", "ml-leads@example.org"]

    with django_capture_on_commit_callbacks(execute=True):
        transition = transitions.pause(mini, actor=ada, reason="abuse report")

    assert [(m.subject, m.to, m.from_email) for m in mail.outbox] == [
        (
            "[Stagegate] atlas-mini paused",
            ["oncall@example.org", "ml-leads@example.org"],
            "stagegate@localhost",
        )
    ]
    assert mail.outbox[0].body.splitlines() == [
        "event: release.pause",
        "release: atlas-mini",
        f"transition: {transition.public_id}",
        "from_stage: research_preview",
        "to_stage: research_preview",
        "from_state: active",
        "to_state: paused",
        "plan_version: 1",
        "actor: ada",
        "automatic: False",
        "reason: abuse report",
        f"at: {transition.created_at.isoformat()}",
    ]


def test_advance_is_e_mailed_with_the_new_stage(
    mini, ada, rita, ruth, settings, django_capture_on_commit_callbacks
):
    settings.STAGEGATE_NOTIFY_EMAILS = ["oncall@example.org"]
    healthy_traffic(mini)
    review = review_now(mini, ada)

    with django_capture_on_commit_callbacks(execute=True):
        transitions.approve(review, reviewer=rita)
        transitions.approve(review, reviewer=ruth)

    assert [m.subject for m in mail.outbox] == ["[Stagegate] atlas-mini advanced to commercial"]
