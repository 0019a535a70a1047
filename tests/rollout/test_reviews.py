"""Stage reviews (``rollout.reviews``): what a review recommends from real rollups of
usage events, its audit row, requesting one through the REST API and the
``review_release`` command, and the periodic review of every active release.

Cast: tests/rollout/mini_cast.py (atlas-mini).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from monitoring.flags import decide_sample
from monitoring.models import AuditEvent, FlaggedSample
from monitoring.usage import write_events, write_samples
from rollout import transitions
from rollout.models import Release, Review
from rollout.plans import apply_plan
from rollout.reviews import create_review, review_releases
from tests.factories import assess, fine_tuning_job, flag_sample, make_org, traffic
from tests.rollout.mini_cast import PARTNERS, PLAN, healthy_traffic, results, review_now


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


# --- screening: flags by category, the flagged samples a reviewer decides --------------------

# atlas-mini's first stage screening prompts, keeping flagged samples, with a criterion
# per category, one on the confirmed rate, and a tripwire on the cyber flags alone.
SCREENED = PLAN.replace(
    "      block_on_incident_severity: high\n",
    "      block_on_incident_severity: high\n"
    "      max_flag_rate_by_category: {cyber: 0.05, weapons: 0.01}\n"
    "      max_confirmed_flag_rate: 0.02\n",
    1,
).replace(
    "      - {name: serious-incident, metric: incident, severity: high, action: pause}\n",
    "      - {name: serious-incident, metric: incident, severity: high, action: pause}\n"
    "      - {name: cyber-spike, metric: flag_rate, category: cyber, threshold: 0.2,\n"
    "         window_minutes: 60, min_requests: 20, action: pause}\n"
    "    screening:\n"
    "      rules:\n"
    "        - {category: cyber, action: flag, keywords: [ransomware]}\n"
    "        - {category: weapons, action: block, keywords: [sarin]}\n"
    "      retain_flagged: {days: 30}\n",
    1,
)


@pytest.fixture
def screened(mini, ada):
    apply_plan(SCREENED, actor=ada)
    mini.refresh_from_db()
    return mini


def screened_traffic(release, *, count=400, cyber_every=40, minutes=600):
    """Healthy traffic of which every ``cyber_every``-th request was flagged ``cyber``
    by screening, and one prompt blocked as ``weapons``; returns the flagged events."""
    # In whole minutes before the current one, which reviews and tripwires do not count yet.
    end = timezone.now().replace(second=0, microsecond=0) - timedelta(minutes=1)
    events = traffic(
        release=release.name,
        stage=release.current_stage,
        orgs=PARTNERS,
        count=count,
        start=end - timedelta(minutes=minutes),
        end=end,
    )
    events = [
        event._replace(flags="cyber") if index % cyber_every == 0 else event
        for index, event in enumerate(events)
    ]
    blocked = events[1]._replace(
        request_id="req-blocked", decision="deny", reason="content_blocked", flags="weapons"
    )
    write_events([*events, blocked])
    return [event for event in events if event.flags]


def keep_samples(events) -> list[FlaggedSample]:
    """The samples the proxy kept of ``events`` (one each, as it records them)."""
    write_samples(
        [
            flag_sample(
                at=datetime.fromtimestamp(event.created_at, UTC),
                release=event.release,
                stage=event.stage,
                request_id=event.request_id,
                org=event.org,
            )
            for event in events
        ]
    )
    return list(FlaggedSample.objects.order_by("created_at"))


def test_review_reports_flags_by_category_and_the_samples_by_status(screened, rita):
    flagged = screened_traffic(screened)  # 10 of 400 cyber: 2.5%, bound 4.5%
    samples = keep_samples(flagged[:4])
    decide_sample(samples[0], decision="confirmed", actor=rita)
    decide_sample(samples[1], decision="confirmed", actor=rita)
    decide_sample(samples[2], decision="dismissed", actor=rita)

    review = review_now(screened)

    assert review.telemetry["flagged"] == 10  # a screening flag is a flag
    assert review.telemetry["flagged_by_category"] == {"cyber": 10}
    assert review.telemetry["denied_by_category"] == {"weapons": 1}
    assert review.telemetry["samples"] == {
        "pending": 1,
        "confirmed": 2,
        "dismissed": 1,
        "confirmed_requests": 2,
        "pending_requests": 1,
    }
    assert {name: passed for name, passed in results(review).items() if ":" in name} == {
        "min_distinct_orgs:research_partner": True,
        "max_flag_rate:cyber": True,
        "max_flag_rate:weapons": True,
    }
    confirmed = next(r for r in review.criteria if r["name"] == "max_confirmed_flag_rate")
    assert confirmed["passed"] is False  # one flagged request awaits a decision
    assert confirmed["explanation"].endswith(
        "; 1 flagged request still awaiting a reviewer's decision"
    )
    assert review.recommendation == "hold"
    assert [(t["name"], t["fired"]) for t in review.tripwires][-1] == ("cyber-spike", False)

    decide_sample(samples[3], decision="dismissed", actor=rita)
    after = review_now(screened)

    assert results(after)["max_confirmed_flag_rate"] is True  # 2 of 400: bound 1.8%
    assert after.recommendation == "advance"


def test_review_confirmed_flag_rate_moves_with_each_confirmation(screened, rita):
    flagged = screened_traffic(screened)
    samples = keep_samples(flagged[:3])
    for sample in samples[:2]:
        decide_sample(sample, decision="confirmed", actor=rita)
    decide_sample(samples[2], decision="dismissed", actor=rita)
    before = next(
        r for r in review_now(screened).criteria if r["name"] == "max_confirmed_flag_rate"
    )

    (fourth,) = set(keep_samples(flagged[3:4])) - set(samples)
    decide_sample(fourth, decision="confirmed", actor=rita)
    after = next(r for r in review_now(screened).criteria if r["name"] == "max_confirmed_flag_rate")

    assert (before["passed"], after["passed"]) == (True, False)  # 2 -> 3 of 400
    assert before["explanation"].startswith("confirmed flag rate 95% upper bound 1.8% (2 of 400")
    assert after["explanation"].startswith("confirmed flag rate 95% upper bound 2.18% (3 of 400")


def test_review_without_kept_samples_fails_the_confirmed_rate(screened, ada):
    apply_plan(SCREENED.replace("      retain_flagged: {days: 30}\n", ""), actor=ada)
    screened.refresh_from_db()
    screened_traffic(screened)

    review = review_now(screened)

    confirmed = next(r for r in review.criteria if r["name"] == "max_confirmed_flag_rate")
    assert (confirmed["passed"], confirmed["observed"]) == (False, None)
    assert review.recommendation == "hold"


def test_review_category_tripwire_fires_on_its_own_category(screened):
    screened_traffic(screened, count=100, cyber_every=4, minutes=50)  # 25% cyber

    review = review_now(screened)

    spike = next(t for t in review.tripwires if t["name"] == "cyber-spike")
    assert (spike["fired"], spike["observed"]) == (True, 0.25)
    assert spike["explanation"].startswith("fired: cyber flag rate 25.0% (25 of 100)")
    assert review.recommendation == "rollback"


# --- fine-tuning: held datasets and failed assessments of the stage --------------------------

# atlas-mini's first stage with both fine-tuning criteria.
FINE_TUNED = PLAN.replace(
    "      block_on_incident_severity: high\n",
    "      block_on_incident_severity: high\n"
    "      max_held_dataset_rate: 0.25\n"
    "      max_failed_assessment_rate: 0.2\n",
    1,
)


@pytest.fixture
def fine_tuned(mini, ada):
    apply_plan(FINE_TUNED, actor=ada)
    mini.refresh_from_db()
    return mini


@pytest.fixture
def partners(db):
    return [make_org(slug, tier) for slug, tier in sorted(PARTNERS.items())]


def criterion(review: Review, name: str) -> dict:
    (found,) = [result for result in review.criteria if result["name"] == name]
    return found


def test_review_without_fine_tuning_passes_the_fine_tuning_criteria(fine_tuned):
    healthy_traffic(fine_tuned)

    review = review_now(fine_tuned)

    assert review.recommendation == "advance"
    assert criterion(review, "max_held_dataset_rate") == {
        "name": "max_held_dataset_rate",
        "observed": 0.0,
        "threshold": 0.25,
        "passed": True,
        "explanation": "no datasets screened in this stage",
    }
    assert criterion(review, "max_failed_assessment_rate")["explanation"] == (
        "no tuned models assessed in this stage"
    )
    assert review.telemetry["fine_tuning"]["by_tier_org"] == []


def test_review_fails_on_held_datasets_and_failed_assessments_of_the_stage(
    fine_tuned, partners, ada
):
    healthy_traffic(fine_tuned)
    meridian, northwind = partners
    stage = fine_tuned.current_stage
    accepted = fine_tuning_job(fine_tuned, northwind, stage=stage, verdict="accept")
    fine_tuning_job(fine_tuned, northwind, stage=stage, verdict="hold")
    fine_tuning_job(fine_tuned, northwind, stage=stage)  # not screened yet
    fine_tuning_job(fine_tuned, meridian, stage=stage, verdict="reject")
    filtered = fine_tuning_job(fine_tuned, meridian, stage=stage, verdict="accept_filtered")
    assess(accepted, passed=True)
    assess(filtered, passed=False)
    # Neither counts: held before the release entered the stage, held in another stage.
    before = fine_tuned.stage_entered_at - timedelta(minutes=1)
    fine_tuning_job(fine_tuned, meridian, stage=stage, verdict="hold", created_at=before)
    fine_tuning_job(fine_tuned, meridian, stage="commercial", verdict="hold")

    review = review_now(fine_tuned)

    assert review.recommendation == "hold"
    assert review.summary == (
        "exit criteria not met: max_held_dataset_rate, max_failed_assessment_rate"
    )
    assert criterion(review, "max_held_dataset_rate") == {
        "name": "max_held_dataset_rate",
        "observed": 0.5,
        "threshold": 0.25,
        "passed": False,
        "explanation": "held dataset rate 50.0% observed (2 of 4 screened datasets held or"
        " rejected: 1 held, 1 rejected) is above the 25.0% maximum",
    }
    assert criterion(review, "max_failed_assessment_rate") == {
        "name": "max_failed_assessment_rate",
        "observed": 0.5,
        "threshold": 0.2,
        "passed": False,
        "explanation": "failed assessment rate 50.0% observed (1 of 2 tuned model assessments"
        " failed) is above the 20.0% maximum",
    }
    stored = review.telemetry["fine_tuning"]
    assert {key: value for key, value in stored.items() if key != "by_tier_org"} == {
        "datasets_screened": 4,
        "datasets_held": 1,
        "datasets_rejected": 1,
        "jobs_created": 5,
        "assessments": 2,
        "assessments_failed": 1,
    }
    assert [
        (row["organization_slug"], row["datasets_screened"], row["assessments_failed"])
        for row in stored["by_tier_org"]
    ] == [("meridian-lab", 2, 1), ("northwind-research", 2, 0)]
