"""Stage reviews (``rollout.reviews``): what a review recommends from real rollups of
usage events, its audit row, requesting one through the REST API and the
``review_release`` command, and the periodic review of every active release.

Cast: tests/rollout/mini_cast.py (atlas-mini).
"""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from django.utils import timezone

from monitoring.models import AuditEvent
from rollout import transitions
from rollout.models import Release, Review
from rollout.plans import apply_plan
from rollout.reviews import create_review, review_releases
from tests.rollout.mini_cast import PLAN, healthy_traffic, results, review_now


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
