"""Announcing transitions: a JSON POST to ``STAGEGATE_NOTIFY_WEBHOOK_URL`` and/or an
e-mail to ``STAGEGATE_NOTIFY_EMAILS`` through Django's e-mail backend.

Sent after the transition commits (``stagegate.celery.enqueue``), never inside it: a
slow webhook must not hold the release's lock. A failed send raises, so the Celery
task retries it a bounded number of times.
"""

from __future__ import annotations

from django.conf import settings
from django.core.mail import send_mail

from rollout.models import StageTransition
from stagegate.webhooks import WebhookFailed, post_json


class NotificationFailed(Exception):
    pass


def transition_message(transition: StageTransition) -> dict:
    """The webhook's JSON body; the e-mail says the same in words."""
    return {
        "event": f"release.{transition.kind}",
        "release": transition.release.name,
        "transition": transition.public_id,
        "from_stage": transition.from_stage,
        "to_stage": transition.to_stage,
        "from_state": transition.from_state,
        "to_state": transition.to_state,
        "plan_version": transition.plan.version,
        "actor": transition.actor.get_username() if transition.actor else "system",
        "automatic": transition.actor is None,
        "reason": transition.reason,
        "at": transition.created_at.isoformat(),
    }


def _subject(message: dict) -> str:
    what = {
        "release.advance": f"advanced to {message['to_stage']}",
        "release.rollback": f"rolled back to {message['to_stage']}",
        "release.pause": "paused",
        "release.resume": "resumed",
    }.get(message["event"], message["event"])
    prefix = "[Stagegate] automatic: " if message["automatic"] else "[Stagegate] "
    return f"{prefix}{message['release']} {what}"


def notify_transition(transition_id: str) -> dict:
    """Send the notifications of one transition. Returns what was sent."""
    transition = StageTransition.objects.select_related("release", "plan", "actor").get(
        public_id=transition_id
    )
    message = transition_message(transition)
    sent = {"webhook": False, "emails": 0}
    url = settings.STAGEGATE_NOTIFY_WEBHOOK_URL
    if url:
        try:
            post_json(url, message)
        except WebhookFailed as exc:
            raise NotificationFailed(str(exc)) from exc
        sent["webhook"] = True
    recipients = settings.STAGEGATE_NOTIFY_EMAILS
    if recipients:
        body = "\n".join(f"{key}: {value}" for key, value in message.items())
        sent["emails"] = send_mail(
            _subject(message), body, settings.DEFAULT_FROM_EMAIL, recipients, fail_silently=False
        )
    return sent
