"""The release page: timeline, exit criteria in words, tripwire tiles, charts from
rollups, the plan with its versions and diffs; roles and hostile input."""

from __future__ import annotations

import re
from datetime import UTC, timedelta

import pytest
import yaml
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from console.releases import percent, rate_in_words
from monitoring.models import UsageRollup
from monitoring.rollups import rollup_pending
from monitoring.usage import write_events
from rollout import transitions
from rollout.incidents import file_incident, resolve_incident
from rollout.models import Release, ReviewTrigger
from rollout.plans import apply_plan
from rollout.reviews import create_review
from tests.factories import EXAMPLE_PLAN, traffic, usage_event

pytestmark = pytest.mark.django_db

PAGE = "/console/releases/atlas-2/"
PLANS = "/console/releases/atlas-2/plans/"
DIFF = "/console/releases/atlas-2/plans/diff/"
RESEARCH = {"northwind-research": "research_partner"}
KEY_SHAPED = "sgk_0123456789abcdef_" + "a" * 40


@pytest.fixture
def browser():
    return Client()


def _in_stage_since(release: Release, days: float) -> Release:
    """The release entered its stage ``days`` ago, so earlier traffic counts."""
    Release.objects.filter(pk=release.pk).update(
        stage_entered_at=timezone.now() - timedelta(days=days)
    )
    release.refresh_from_db()
    return release


def _send(events: list[tuple]) -> None:
    write_events(events)
    rollup_pending()


def _second_plan(ada) -> None:
    doc = yaml.safe_load(EXAMPLE_PLAN.read_text())
    doc["stages"][0]["tiers"]["research_partner"]["limits"]["requests_per_minute"] = 7
    apply_plan(yaml.safe_dump(doc), actor=ada, comment="slow research down")


# --- who may see it ------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [PAGE, PLANS, DIFF])
def test_anonymous_is_sent_to_sign_in(browser, release, url):
    answer = browser.get(url)
    assert (answer.status_code, answer["Location"]) == (302, f"/console/login/?next={url}")


@pytest.mark.parametrize("who", ["vera", "rita", "ada"])
@pytest.mark.parametrize("url", [PAGE, PLANS, DIFF])
def test_every_staff_role_sees_the_pages(browser, release, request, who, url):
    browser.force_login(request.getfixturevalue(who))
    assert browser.get(url).status_code == 200


@pytest.mark.parametrize("url", [PAGE, PLANS, DIFF])
def test_an_org_admin_is_refused(browser, release, oscar, url):
    browser.force_login(oscar)
    assert browser.get(url).status_code == 403


@pytest.mark.parametrize(
    "url",
    [
        "/console/releases/no-such/",
        "/console/releases/no-such/plans/",
        "/console/releases/no-such/plans/diff/",
        "/console/releases/%3Cscript%3E/",
        f"/console/releases/{KEY_SHAPED}/",
    ],
)
def test_an_unknown_release_is_404(browser, release, vera, url):
    browser.force_login(vera)
    assert browser.get(url).status_code == 404


def test_the_actions_partial_sits_under_the_ladder(browser, release, vera):
    browser.force_login(vera)
    page = browser.get(PAGE).content.decode()
    assert page.index('class="ladder"') < page.index("Exit criteria of research_preview")


# --- exit criteria --------------------------------------------------------------------------------


def test_the_rate_bound_in_words():
    assert rate_in_words(events=3, trials=1200, maximum=0.02, metric="error_rate") == (
        "3 errors in 1,200 requests: observed 0.25%; with 95% confidence the true rate is"
        " below 0.73%, which is under the 2% maximum"
    )
    assert rate_in_words(events=30, trials=1200, maximum=0.02, metric="error_rate") == (
        "30 errors in 1,200 requests: observed 2.5%; with 95% confidence the true rate is"
        " below 3.55%, which is above the 2% maximum"
    )
    assert rate_in_words(events=0, trials=0, maximum=0.01, metric="flag_rate") == (
        "no admitted requests yet: nothing is known, so the 95% upper bound is 100%,"
        " which is above the 1% maximum"
    )
    assert [percent(r) for r in (0.02, 0.0025, 0.00004, 0.1)] == ["2%", "0.25%", "0.004%", "10%"]


def test_criteria_show_observed_threshold_progress_and_the_bound_in_words(browser, release, vera):
    _in_stage_since(release, 3)
    now = timezone.now()
    _send(
        traffic(
            release="atlas-2",
            stage="research_preview",
            orgs=RESEARCH,
            count=1200,
            start=now - timedelta(days=2),
            end=now - timedelta(days=1),
            error_every=400,
        )
    )
    browser.force_login(vera)
    page = browser.get(PAGE).content.decode()
    assert (
        "3 errors in 1,200 requests: observed 0.25%; with 95% confidence the true rate is"
        " below 0.73%, which is under the 2% maximum."
    ) in page
    assert '<progress max="10000.000000" value="1200.000000"' in page
    assert "8,800 to go" in page  # min_requests 10,000
    assert "at least 10,000" in page
    assert "2 to go" in page  # 1 of 3 distinct orgs
    assert "approvals are collected once a review recommends advance" in page


# --- tripwire tiles -------------------------------------------------------------------------------


def _tiles(page: str) -> dict[str, str]:
    """Tripwire name -> the state its tile shows."""
    return dict(re.findall(r'data-tripwire="([^"]+)" data-state="([^"]+)"', page))


def test_tripwires_cannot_judge_before_any_rollup(browser, release, vera):
    browser.force_login(vera)
    page = browser.get(PAGE).content.decode()
    assert _tiles(page) == {
        "flag-spike": "cannot judge",
        "flag-drift": "cannot judge",
        "error-spike": "cannot judge",
        "serious-incident": "armed",
    }


def test_tripwires_without_enough_traffic_say_so(browser, release, vera):
    rollup_pending()
    browser.force_login(vera)
    page = browser.get(PAGE).content.decode()
    assert _tiles(page) == {
        "flag-spike": "not enough traffic yet",
        "flag-drift": "not enough traffic yet",
        "error-spike": "not enough traffic yet",
        "serious-incident": "armed",
    }
    assert "0 of the 50 admitted requests it needs in the last 15 min" in page
    assert "sample: 0 admitted requests in the window" in page


def test_a_tripwire_over_its_threshold_shows_fired_with_its_sample(browser, release, vera, ada):
    _in_stage_since(release, 1)
    now = timezone.now()
    _send(
        traffic(
            release="atlas-2",
            stage="research_preview",
            orgs=RESEARCH,
            count=60,
            start=now - timedelta(minutes=12),
            end=now - timedelta(minutes=2),
            error_every=5,
        )
    )
    file_incident(release, severity="critical", title="leak", actor=ada)
    browser.force_login(vera)
    page = browser.get(PAGE).content.decode()
    assert _tiles(page) == {
        "flag-spike": "not enough traffic yet",
        "flag-drift": "not enough traffic yet",
        "error-spike": "fired",
        "serious-incident": "fired",
    }
    assert "sample: 60 admitted requests in the window" in page
    assert "error-spike threshold 10%" in page  # the tile chart's threshold line


# --- charts ---------------------------------------------------------------------------------------


def test_charts_are_drawn_from_rollups_with_thresholds_and_series(browser, release, vera):
    _in_stage_since(release, 3)
    now = timezone.now()
    events = traffic(
        release="atlas-2",
        stage="research_preview",
        orgs=RESEARCH,
        count=300,
        start=now - timedelta(hours=30),
        end=now - timedelta(hours=1),
        error_every=50,
        flagged_every=60,
    )
    events.append(
        usage_event(
            at=now - timedelta(hours=3),
            release="atlas-2",
            stage="research_preview",
            org="acme-commercial",
            tier="verified_commercial",
            decision="deny",
            reason="model_not_available",
            status=404,
        )
    )
    events += [
        usage_event(
            at=now - timedelta(hours=hours),
            release="atlas-2",
            stage="research_preview",
            org="northwind-research",
            tier="research_partner",
            decision="deny",
            reason="rate_limited",
            status=429,
        )
        for hours in (2, 2.5, 5)
    ]
    _send(events)
    browser.force_login(vera)
    page = browser.get(PAGE).content.decode()
    for title in (
        "<title>Requests by tier, the last 7d</title>",
        "<title>Admitted vs refused by reason, the last 7d</title>",
        "<title>Error rate in research_preview, the last 7d</title>",
        "<title>Flag rate in research_preview, the last 7d</title>",
        "<title>Tokens, the last 7d</title>",
    ):
        assert title in page
    for series in (
        "research_partner",
        "verified_commercial",
        "admitted",
        "rate_limited",
        "model_not_available",
        "error rate per bucket",
        "flag rate per bucket",
        "95% upper bound, cumulative",
        "prompt tokens",
        "completion tokens",
    ):
        assert f">{series}</text>" in page  # in a chart's legend
    assert "max error rate 2%" in page
    assert "max flag rate 1%" in page
    assert "their reasons are not" not in page


def _legend(page: str, title: str) -> list[str]:
    """The legend's names of the chart titled ``title``, in order."""
    chart = page.split(f"<title>{title}</title>", 1)[1].split("</svg>", 1)[0]
    legend = chart.split('<g class="legend">', 1)[1].split("</g>", 1)[0]
    return re.findall(r">([^<]+)</text>", legend)


def test_refusals_are_stacked_by_reason_top_five_then_other(browser, release, vera):
    # Ten minutes into an hour two hours ago: every event in that one hour bucket.
    at = (timezone.now() - timedelta(hours=2)).replace(minute=10, second=0, microsecond=0)
    counts = {  # reason: refusals
        "rate_limited": 7,
        "quota_exceeded": 6,
        "release_paused": 5,
        "verification_required": 4,
        "invalid_key": 3,
        "key_revoked": 2,
        "request_too_large": 1,
    }
    events = [
        usage_event(
            at=at + timedelta(seconds=index),
            release="atlas-2",
            stage="research_preview",
            org="northwind-research",
            tier="research_partner",
            decision="deny",
            reason=reason,
            status=429,
            request_id=f"req-{reason}-{index}",
        )
        for reason, count in counts.items()
        for index in range(count)
    ]
    events.append(
        usage_event(
            at=at, release="atlas-2", stage="research_preview", org="n", tier="research_partner"
        )
    )
    _send(events)
    browser.force_login(vera)
    page = browser.get(PAGE).content.decode()

    title = "Admitted vs refused by reason, the last 7d"
    assert _legend(page, title) == [
        "admitted",
        "rate_limited",
        "quota_exceeded",
        "release_paused",
        "verification_required",
        "invalid_key",
        "other",
    ]
    hour = f"{at.astimezone(UTC):%Y-%m-%d %H}:00"
    assert f"<title>rate_limited {hour}: 7</title>" in page
    assert f"<title>other {hour}: 3</title>" in page  # key_revoked 2, request_too_large 1
    assert f"<title>admitted {hour}: 1</title>" in page


def test_refusals_rolled_up_before_reasons_were_kept_are_labelled(browser, release, vera):
    # A row as migration 0005 leaves an older rollup: reason "", the whole bucket.
    hour = timezone.now().astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    UsageRollup.objects.create(
        bucket_seconds=3600,
        bucket_start=hour - timedelta(hours=3),
        release="atlas-2",
        stage="research_preview",
        tier="research_partner",
        org="northwind-research",
        requests=12,
        allowed=9,
        denied=3,
    )
    browser.force_login(vera)
    page = browser.get(PAGE).content.decode()

    assert _legend(page, "Admitted vs refused by reason, the last 7d") == [
        "admitted",
        "reason not recorded",
    ]


@pytest.mark.parametrize(
    ("asked", "title"),
    [
        ("24h", "the last 24h"),
        ("30d", "the last 30d"),
        ("stint", "this stint"),
        ("\x00", "the last 7d"),
        ("<script>alert(1)</script>", "the last 7d"),
        ("7d" * 5000, "the last 7d"),
        (KEY_SHAPED, "the last 7d"),
    ],
)
def test_a_range_is_chosen_or_falls_back_to_7_days(browser, release, vera, asked, title):
    browser.force_login(vera)
    answer = browser.get(PAGE, {"range": asked})
    assert answer.status_code == 200
    assert f"<title>Tokens, {title}</title>" in answer.content.decode()
    assert b"<script>alert" not in answer.content


# --- the timeline ---------------------------------------------------------------------------------


def test_the_timeline_lists_what_happened_newest_first(browser, release, vera, ada):
    rollup_pending()
    create_review(release, trigger=ReviewTrigger.API, requested_by=ada)
    incident = file_incident(release, severity="low", title="odd answer", actor=ada)
    resolve_incident(incident, actor=ada, resolution="expected behaviour")
    transitions.pause(release, actor="system:tripwire:flag-spike", reason="tripwire flag-spike: x")
    transitions.resume(release, actor=ada, reason="checked, fine")
    browser.force_login(vera)
    page = browser.get(PAGE).content.decode()
    timeline = page.split('id="timeline"', 1)[1]
    order = [
        "resumed in research_preview",
        "tripwire fired: paused in research_preview",
        "incident resolved (low): odd answer",
        "incident filed (low): odd answer",
        "review recommends hold",
        "created in research_preview",
    ]
    positions = [timeline.index(title) for title in order]
    assert positions == sorted(positions)
    assert "by system:tripwire" in timeline
    assert "by ada" in timeline
    assert "checked, fine" in timeline


# --- the plan -------------------------------------------------------------------------------------


def test_the_plan_is_shown_readably_with_its_versions(browser, release, vera, ada):
    _second_plan(ada)
    browser.force_login(vera)
    page = browser.get(PLANS).content.decode()
    assert "Rollout plan of atlas-2, version 2" in page
    assert "slow research down" in page
    assert '<a href="?version=1">v1</a>' in page
    assert "flag-spike</strong>: flag_rate ≥ 5% over 60 min with at least 100 requests" in page
    assert '<th scope="row">research_partner</th><td>monitoring_agreement</td>' in page
    old = browser.get(PLANS, {"version": "1"}).content.decode()
    assert "Rollout plan of atlas-2, version 1" in old


def test_the_diff_between_two_versions(browser, release, vera, ada):
    _second_plan(ada)
    browser.force_login(vera)
    page = browser.get(DIFF, {"a": "1", "b": "2"}).content.decode()
    assert "v1 → v2" in page
    assert '<span class="del">-        requests_per_minute: 60</span>' in page
    assert '<span class="add">+        requests_per_minute: 7</span>' in page
    assert page.count('<span class="add">') == 1
    # Without a choice: the newest against the one before; the other way round too.
    assert (
        '<span class="add">+        requests_per_minute: 7</span>'
        in browser.get(DIFF).content.decode()
    )
    backwards = browser.get(DIFF, {"a": "2", "b": "1"}).content.decode()
    assert '<span class="add">+        requests_per_minute: 60</span>' in backwards


@pytest.mark.parametrize(
    "query",
    [
        {"a": "\x00", "b": "2"},
        {"a": "1", "b": "999"},
        {"a": "-1", "b": "1"},
        {"a": KEY_SHAPED, "b": "1"},
        {"a": "<script>alert(1)</script>", "b": "1"},
        {"a": "1" * 5000, "b": "1"},
        {"a": "1"},
    ],
)
def test_hostile_diff_choices_are_a_form_error(browser, release, vera, ada, query):
    _second_plan(ada)
    browser.force_login(vera)
    answer = browser.get(DIFF, query)
    assert answer.status_code == 200
    assert b"Pick two versions of this plan from the lists." in answer.content
    assert b"<script>alert" not in answer.content


@pytest.mark.parametrize(
    ("version", "status"),
    [("999", 404), ("\x00", 200), ("1.0", 200), ("-1", 200), ("9" * 5000, 200), ("٣", 200)],
)
def test_hostile_versions_fall_back_or_404(browser, release, vera, version, status):
    browser.force_login(vera)
    assert browser.get(PLANS, {"version": version}).status_code == status


# --- bounded queries ------------------------------------------------------------------------------


def _history(*, days: int, per_day: int, reviews: int, ada) -> None:
    now = timezone.now()
    orgs = {f"org-{n}": "research_partner" for n in range(per_day // 50 + 1)}
    events = traffic(
        release="atlas-2",
        stage="research_preview",
        orgs=orgs,
        count=days * per_day,
        start=now - timedelta(days=days),
        end=now - timedelta(minutes=5),
        error_every=97,
        flagged_every=89,
    )
    _send(events)
    release = Release.objects.get(name="atlas-2")
    for _ in range(reviews):
        create_review(release, trigger=ReviewTrigger.SCHEDULE, roll_up=False)


def _count_queries(browser, url: str) -> int:
    browser.get(url)  # warm up: the session, the roles
    with CaptureQueriesContext(connection) as queries:
        assert browser.get(url).status_code == 200
    return len(queries)


@pytest.mark.parametrize("url", [PAGE, f"{PAGE}?range=30d", PLANS, DIFF])
def test_queries_do_not_grow_with_traffic_or_history(
    browser, release, vera, ada, django_assert_num_queries, url
):
    _in_stage_since(release, 40)
    _history(days=1, per_day=100, reviews=1, ada=ada)
    browser.force_login(vera)
    small = _count_queries(browser, url)
    _history(days=30, per_day=400, reviews=5, ada=ada)
    _second_plan(ada)
    browser.get(url)
    with django_assert_num_queries(small):
        assert browser.get(url).status_code == 200
