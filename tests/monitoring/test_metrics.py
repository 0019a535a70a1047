"""The Prometheus gauges of releases and their reviews
(``monitoring.metrics.ReleaseCollector``).

Cast: tests/rollout/mini_cast.py (atlas-mini).
"""

from __future__ import annotations

import logging

import pytest
from django.db import OperationalError, connection
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from monitoring import metrics
from monitoring.metrics import ReleaseCollector
from rollout import transitions
from tests.rollout import mini_cast
from tests.rollout.mini_cast import healthy_traffic, review_now

mini = mini_cast.mini
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
