"""Stage reviews, four-eyes approval and transitions, through the REST API and the
services, on real rollups of usage events.

Cast: atlas-mini, a three-stage plan small enough to pass its exit criteria with a
few hundred events: research_preview (2 orgs, 2 approvals) -> commercial -> general.
Reviewers rita, ruth and rex; ada is the rollout admin; vera a viewer.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core import mail
from django.utils import timezone

from monitoring.models import AuditEvent
from monitoring.usage import write_events
from rollout import transitions
from rollout.models import Incident, Release, Review, StageTransition
from rollout.plans import apply_plan
from rollout.reviews import create_review
from rollout.tripwires import check_tripwires
from tests.factories import make_user, traffic

PLAN = """
release: atlas-mini
upstream: {base_url: "http://127.0.0.1:9/v1", model: atlas-mini-1}
stages:
  - name: research_preview
    tiers:
      research_partner:
        limits: {requests_per_minute: 60, tokens_per_minute: 10000, tokens_per_day: 100000,
                 max_tokens: 1000}
    exit_criteria:
      min_days_in_stage: 1
      min_requests: 200
      min_distinct_orgs: 2
      min_distinct_orgs_per_tier: {research_partner: 2}
      max_flag_rate: 0.05
      max_error_rate: 0.05
      block_on_incident_severity: high
      approvals_needed: 2
    tripwires:
      - {name: flag-spike, metric: flag_rate, threshold: 0.5, window_minutes: 60,
         min_requests: 20, action: pause}
      - {name: serious-incident, metric: incident, severity: high, action: pause}
  - name: commercial
    tiers:
      research_partner:
        limits: {requests_per_minute: 60, tokens_per_minute: 10000, tokens_per_day: 100000,
                 max_tokens: 1000}
      verified_commercial:
        limits: {requests_per_minute: 60, tokens_per_minute: 10000, tokens_per_day: 100000,
                 max_tokens: 1000}
    exit_criteria:
      min_days_in_stage: 1
      min_requests: 200
      min_distinct_orgs: 2
      max_flag_rate: 0.05
      max_error_rate: 0.05
      approvals_needed: 2
    tripwires:
      - {name: flag-spike, metric: flag_rate, threshold: 0.5, window_minutes: 60,
         min_requests: 20, action: rollback}
      - {name: critical-incident, metric: incident, severity: critical, action: rollback}
  - name: general
    tiers:
      public:
        limits: {requests_per_minute: 60, tokens_per_minute: 10000, tokens_per_day: 100000,
                 max_tokens: 1000}
"""
PARTNERS = {"northwind-research": "research_partner", "meridian-lab": "research_partner"}


@pytest.fixture
def mini(db, ada):
    apply_plan(PLAN, actor=ada)
    release = Release.objects.get(name="atlas-mini")
    # Two days into its first stage, so min_days_in_stage (1) can pass.
    Release.objects.filter(pk=release.pk).update(
        stage_entered_at=timezone.now() - timedelta(days=2)
    )
    release.refresh_from_db()
    return release


@pytest.fixture
def ruth(db):
    return make_user("ruth", roles=("reviewer",))


@pytest.fixture
def rex(db):
    return make_user("rex", roles=("reviewer",))


def healthy_traffic(release, *, count=400, flagged_every=0, error_every=0, minutes=600):
    now = timezone.now()
    write_events(
        traffic(
            release=release.name,
            stage=release.current_stage,
            orgs=PARTNERS,
            count=count,
            start=now - timedelta(minutes=minutes),
            end=now - timedelta(seconds=1),
            flagged_every=flagged_every,
            error_every=error_every,
        )
    )


def review_now(release, user=None) -> Review:
    return create_review(release, trigger="api" if user else "schedule", requested_by=user)


def results(review: Review) -> dict[str, bool]:
    return {result["name"]: result["passed"] for result in review.criteria}


# --- reviews ------------------------------------------------------------------------------


def test_review_without_traffic_recommends_hold(mini):
    review = review_now(mini)

    assert review.recommendation == "hold"
    assert results(review) == {
        "min_days_in_stage": True,
        "min_requests": False,
        "min_distinct_orgs": False,
        "min_distinct_orgs:research_partner": False,
        "max_flag_rate": False,
        "max_error_rate": False,
        "no_open_incident": True,
        "approvals": False,
    }
    assert review.telemetry["allowed"] == 0
    assert "min_requests" in review.summary


def test_review_with_healthy_traffic_recommends_advance(mini):
    healthy_traffic(mini)

    review = review_now(mini)

    assert review.recommendation == "advance"
    assert review.next_stage == "commercial"
    assert review.approvals_needed == 2
    assert review.telemetry["allowed"] == 400
    assert review.telemetry["orgs_by_tier"] == {"research_partner": 2}
    assert results(review)["max_error_rate"] is True


def test_review_with_little_traffic_holds_on_the_rate_bound(mini):
    # 60 clean requests: the point rates are 0, but the 95% upper bounds (5.9%) are
    # above the 5% maxima, so luck cannot pass the stage.
    healthy_traffic(mini, count=60)

    review = review_now(mini)

    assert review.recommendation == "hold"
    assert results(review)["max_flag_rate"] is False
    assert results(review)["max_error_rate"] is False


def test_review_with_stale_telemetry_never_passes(mini, settings):
    healthy_traffic(mini)
    settings.STAGEGATE_TELEMETRY_MAX_STALENESS = 60

    review = create_review(mini, trigger="schedule", now=timezone.now() + timedelta(hours=1))

    assert review.recommendation == "hold"
    assert results(review)["min_requests"] is False
    assert "stale" in next(r for r in review.criteria if r["name"] == "min_requests")["explanation"]


def test_review_is_audited_and_immutable(mini, rita):
    review = review_now(mini, rita)

    event = AuditEvent.objects.get(action="review.created", object_id=review.public_id)
    assert event.actor == "rita"
    assert event.data["recommendation"] == "hold"
    review.summary = "edited"
    with pytest.raises(Exception, match="immutable"):
        review.save()


def test_review_api_requests_a_review(mini, login_as, rita):
    healthy_traffic(mini)

    response = login_as(rita).post("/api/reviews/", {"release": "atlas-mini"}, format="json")

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["recommendation"] == "advance"
    assert body["requested_by"] == "rita"
    assert body["approvals"] == []
    assert body["approvals_counted"] == 0
    assert body["stale"] is None


def test_review_api_refuses_viewers(mini, login_as, vera):
    response = login_as(vera).post("/api/reviews/", {"release": "atlas-mini"}, format="json")

    assert response.status_code == 403
    assert Review.objects.count() == 0


# --- four eyes ------------------------------------------------------------------------------


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


# --- pause, resume, roll back ---------------------------------------------------------------


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


# --- incidents and tripwires ------------------------------------------------------------------


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


def test_low_incident_does_not_trip(mini, rita):
    from rollout.incidents import file_incident

    file_incident(mini, severity="low", title="typo in docs", actor=rita)

    mini.refresh_from_db()
    assert mini.state == "active"


def test_resolving_an_incident_is_audited(mini, login_as, rita):
    from rollout.incidents import file_incident

    incident = file_incident(mini, severity="low", title="slow answers", actor=rita)

    response = login_as(rita).post(
        f"/api/incidents/{incident.public_id}/resolve/",
        {"resolution": "upstream scaled up"},
        format="json",
    )

    assert response.status_code == 200
    assert response.json()["status"] == "resolved"
    assert AuditEvent.objects.filter(action="incident.resolved").count() == 1


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


def test_review_release_command_stores_and_prints_the_review(mini, rita):
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    call_command("review_release", "atlas-mini", "--as", "rita", stdout=out)

    review = Review.objects.get()
    assert review.requested_by == rita
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"{review.public_id}: atlas-mini in research_preview: hold")
    assert lines[2] == "  FAIL min_requests: 0 admitted requests, 200 required (200 to go)"


def test_resumed_release_is_not_paused_again_for_the_traffic_that_paused_it(mini, ada):
    healthy_traffic(mini, count=100, flagged_every=2, minutes=30)
    check_tripwires()
    transitions.resume(mini, actor=ada, reason="filter fixed")

    assert check_tripwires() == []
    mini.refresh_from_db()
    assert mini.state == "active"


def test_resume_is_refused_while_a_tripping_incident_is_open(mini, ada, rita):
    from rollout.incidents import file_incident, resolve_incident

    incident = file_incident(mini, severity="high", title="data leak", actor=rita)
    transitions.pause(mini, actor=ada, reason="data leak")

    with pytest.raises(transitions.Refused) as refused:
        transitions.resume(mini, actor=ada, reason="back")
    resolve_incident(incident, actor=rita, resolution="prompt filter deployed")
    resumed = transitions.resume(mini, actor=ada, reason="back")

    assert refused.value.code == "open_incident"
    assert resumed.to_state == "active"
