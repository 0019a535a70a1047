"""Where reviews and transitions show up outside the services: the Prometheus gauges
(``monitoring.metrics.ReleaseCollector``), the webhook and e-mail of every transition
(``rollout.notifications``), the admin's approve actions and incident form, the
periodic review (``rollout.reviews.review_releases``) and the review and incident
listings of the API.

Cast as in tests/rollout/test_reviews.py: atlas-mini on its three-stage plan, ada the
rollout admin, reviewers rita and ruth, viewer vera.
"""

from __future__ import annotations

import logging

import pytest
from django.contrib.messages import get_messages
from django.core import mail
from django.db import OperationalError, connection
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from monitoring import metrics
from monitoring.metrics import ReleaseCollector
from monitoring.models import AuditEvent
from rollout import transitions
from rollout.incidents import file_incident, resolve_incident
from rollout.models import Incident, Release, Review, StageTransition
from rollout.notifications import NotificationFailed, notify_transition
from rollout.plans import apply_plan
from rollout.reviews import review_releases
from rollout.tasks import notify_transition as notify_transition_task
from tests import live
from tests.rollout import test_reviews
from tests.rollout.test_reviews import PLAN, healthy_traffic, review_now

mini = test_reviews.mini
ruth = test_reviews.ruth

STAGE = ("atlas-mini", "research_preview")


def scrape(collector: ReleaseCollector) -> str:
    """One scrape of ``collector`` alone, as Prometheus would see it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry).decode()


def series(text: str, name: str) -> dict[tuple[str, ...], float]:
    """The samples of one metric in exposition ``text``: (release, stage, criterion)
    or (release, recommendation), as far as it has them -> value."""
    order = ("release", "stage", "criterion", "recommendation")
    return {
        tuple(sample.labels[label] for label in order if label in sample.labels): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


# --- metrics ----------------------------------------------------------------------------------

# The collector runs outside any transaction (the proxy scrapes in a thread of its own)
# and starts with close_old_connections(), which inside a test's atomic block would
# close the connection under it: these tests use committed data.
on_committed_data = pytest.mark.usefixtures("live_db")


@on_committed_data
def test_release_collector_reports_the_stage_of_a_release_without_review(mini):
    text = scrape(ReleaseCollector(ttl=0))

    assert series(text, "stagegate_release_stage") == {STAGE: 0.0}
    assert series(text, "stagegate_release_paused") == {("atlas-mini",): 0.0}
    assert series(text, "stagegate_review_recommendation") == {}
    assert series(text, "stagegate_review_criterion_passed") == {}


@on_committed_data
def test_release_collector_reports_the_latest_review(mini):
    healthy_traffic(mini)
    review_now(mini)
    review = review_now(mini)

    text = scrape(ReleaseCollector(ttl=0))

    observed = series(text, "stagegate_review_criterion_observed")
    threshold = series(text, "stagegate_review_criterion_threshold")
    passed = series(text, "stagegate_review_criterion_passed")
    assert (observed[(*STAGE, "min_requests")], threshold[(*STAGE, "min_requests")]) == (
        400.0,
        200.0,
    )
    assert (observed[(*STAGE, "min_distinct_orgs")], threshold[(*STAGE, "min_distinct_orgs")]) == (
        2.0,
        2.0,
    )
    # Every criterion of the review, and nothing else: one series each.
    assert passed == {(*STAGE, result["name"]): 1.0 for result in review.criteria} | {
        (*STAGE, "approvals"): 0.0
    }
    assert observed == {
        (*STAGE, result["name"]): float(result["observed"])
        for result in review.criteria
        if isinstance(result["observed"], int | float)
    }
    assert series(text, "stagegate_review_recommendation") == {("atlas-mini", "advance"): 1.0}
    assert series(text, "stagegate_review_timestamp_seconds") == {
        ("atlas-mini",): review.created_at.timestamp()
    }


@on_committed_data
def test_release_collector_reports_a_pause_on_the_next_scrape(mini, ada):
    collector = ReleaseCollector(ttl=0)
    before = series(scrape(collector), "stagegate_release_paused")

    transitions.pause(mini, actor=ada, reason="abuse report")

    assert before == {("atlas-mini",): 0.0}
    assert series(scrape(collector), "stagegate_release_paused") == {("atlas-mini",): 1.0}


@on_committed_data
def test_release_collector_repeats_its_figures_within_the_ttl(mini, ada):
    collector = ReleaseCollector(ttl=3600)
    scrape(collector)

    transitions.pause(mini, actor=ada, reason="abuse report")

    assert series(scrape(collector), "stagegate_release_paused") == {("atlas-mini",): 0.0}


@on_committed_data
def test_release_collector_yields_nothing_when_the_database_fails(mini, caplog):
    def database_down(execute, sql, params, many, context):
        raise OperationalError("connection refused")

    collector = ReleaseCollector(ttl=0)
    with caplog.at_level(logging.ERROR), connection.execute_wrapper(database_down):
        during = scrape(collector)

    assert during == ""
    assert [record.getMessage() for record in caplog.records] == [
        "could not read release and review metrics"
    ]
    # The next scrape, with the database back, reports again.
    assert series(scrape(collector), "stagegate_release_stage") == {STAGE: 0.0}


@on_committed_data
def test_render_includes_the_release_and_review_series(mini, ada):
    healthy_traffic(mini)
    review_now(mini)
    transitions.pause(mini, actor=ada, reason="abuse report")

    # The only in-process caller of render(): its collector's 10 s cache starts empty.
    lines = metrics.render().decode().splitlines()

    ours = [line for line in lines if 'release="atlas-mini"' in line]
    assert [line for line in ours if line.startswith("stagegate_release_")] == [
        'stagegate_release_stage{release="atlas-mini",stage="research_preview"} 0.0',
        'stagegate_release_paused{release="atlas-mini"} 1.0',
    ]
    assert [line for line in ours if 'criterion="min_requests"' in line] == [
        'stagegate_review_criterion_observed{criterion="min_requests",'
        'release="atlas-mini",stage="research_preview"} 400.0',
        'stagegate_review_criterion_threshold{criterion="min_requests",'
        'release="atlas-mini",stage="research_preview"} 200.0',
        'stagegate_review_criterion_passed{criterion="min_requests",'
        'release="atlas-mini",stage="research_preview"} 1.0',
    ]
    assert [line for line in ours if line.startswith("stagegate_review_recommendation")] == [
        'stagegate_review_recommendation{recommendation="advance",release="atlas-mini"} 1.0'
    ]
    assert "# TYPE stagegate_release_stage gauge" in lines


# --- notifications --------------------------------------------------------------------------


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


# --- admin ----------------------------------------------------------------------------------


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


# --- the periodic review --------------------------------------------------------------------


@pytest.fixture
def paused_release(ada):
    apply_plan(PLAN.replace("release: atlas-mini", "release: atlas-nano"), actor=ada)
    release = Release.objects.get(name="atlas-nano")
    transitions.pause(release, actor=ada, reason="waiting for a fix")
    return release


def test_review_releases_reviews_each_active_release(mini, paused_release):
    reviews = review_releases()

    assert [(r.release.name, r.trigger, r.requested_by) for r in reviews] == [
        ("atlas-mini", "schedule", None)
    ]
    assert list(Review.objects.values_list("release__name", flat=True)) == ["atlas-mini"]
    assert list(
        AuditEvent.objects.filter(action="review.created").values_list("actor", "object_id")
    ) == [("system:reviews", reviews[0].public_id)]


def test_review_releases_goes_on_after_one_fails(mini, paused_release, ada, caplog):
    transitions.resume(paused_release, actor=ada, reason="fixed")
    Release.objects.filter(pk=paused_release.pk).update(current_stage="nowhere")

    with caplog.at_level(logging.ERROR, logger="rollout.reviews"):
        reviews = review_releases()

    assert [r.release.name for r in reviews] == ["atlas-mini"]
    assert [record.getMessage() for record in caplog.records] == [
        "periodic review of atlas-nano failed"
    ]


# --- the API --------------------------------------------------------------------------------


def test_review_list_of_a_release_is_newest_first(mini, release, login_as, vera):
    first, second, third = review_now(mini), review_now(mini), review_now(mini)
    review_now(release)

    response = login_as(vera).get("/api/reviews/", {"release": "atlas-mini"})

    assert response.status_code == 200
    assert [r["public_id"] for r in response.json()["results"]] == [
        third.public_id,
        second.public_id,
        first.public_id,
    ]


def test_review_detail_shows_approvals_until_superseded(mini, login_as, ada, rita, vera):
    healthy_traffic(mini)
    review = review_now(mini, ada)
    transitions.approve(review, reviewer=rita, comment="numbers look fine")
    client = login_as(vera)

    current = client.get(f"/api/reviews/{review.public_id}/").json()
    review_now(mini)
    superseded = client.get(f"/api/reviews/{review.public_id}/").json()

    assert [
        (a["reviewer"], a["verdict"], a["comment"], a["stage"], a["plan_version"])
        for a in current["approvals"]
    ] == [("rita", "approve", "numbers look fine", "research_preview", 1)]
    assert (current["approvals_counted"], current["stale"], current["transition"]) == (
        1,
        None,
        None,
    )
    assert (superseded["approvals_counted"], superseded["stale"]) == (1, "review_superseded")


def test_review_list_queries_do_not_grow_with_the_rows(
    mini, login_as, ada, vera, django_assert_max_num_queries
):
    client = login_as(vera)
    review_now(mini, ada)
    client.get("/api/reviews/")  # warm up: later requests make the same session lookups

    with django_assert_max_num_queries(4) as one:
        listed_one = client.get("/api/reviews/", {"release": "atlas-mini"})
    for _ in range(4):
        review_now(mini, ada)
    with django_assert_max_num_queries(4) as five:
        listed_five = client.get("/api/reviews/", {"release": "atlas-mini"})

    assert (len(listed_one.json()["results"]), len(listed_five.json()["results"])) == (1, 5)
    assert len(five) == len(one)


def test_incident_list_filters_by_status(mini, login_as, rita, vera):
    resolved = file_incident(mini, severity="low", title="slow answers", actor=rita)
    resolve_incident(resolved, actor=rita, resolution="upstream scaled up")
    still_open = file_incident(mini, severity="medium", title="odd refusals", actor=rita)

    response = login_as(vera).get("/api/incidents/", {"status": "open"})

    assert response.status_code == 200
    assert [(i["public_id"], i["status"]) for i in response.json()["results"]] == [
        (still_open.public_id, "open")
    ]


def test_viewer_reads_incidents_but_cannot_file_one(mini, login_as, rita, vera):
    file_incident(mini, severity="low", title="slow answers", actor=rita)
    client = login_as(vera)

    listed = client.get("/api/incidents/")
    filed = client.post(
        "/api/incidents/",
        {"release": "atlas-mini", "severity": "critical", "title": "nope"},
        format="json",
    )

    assert (listed.status_code, len(listed.json()["results"])) == (200, 1)
    assert filed.status_code == 403
    assert Incident.objects.count() == 1


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
