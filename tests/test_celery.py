"""The periodic work on a real Celery worker (Redis broker, PostgreSQL), and the same
tasks on the embedded mode's in-process scheduler.

The worker tests need PostgreSQL and Redis (CI's first run); the scheduler tests run
in both modes.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import openai
import psycopg
import pytest
from django.conf import settings
from django.utils import timezone

from access.keys import issue_key
from monitoring.models import UsageRollup
from monitoring.rollups import raw_totals, rollup_pending, stage_totals
from monitoring.tasks import rollup_usage
from monitoring.usage import write_events
from rollout.models import Release
from rollout.plans import apply_plan
from rollout.tasks import check_tripwires
from stagegate.celery import app
from stagegate.schedule import Periodic, beat_schedule, schedule
from stagegate.scheduler import InProcessScheduler
from tests.factories import make_org, traffic
from tests.live import CeleryWorker, database_env, wait_until
from tests.rollout.mini_cast import PARTNERS, PLAN, healthy_traffic

pytestmark = pytest.mark.usefixtures("live_db")

needs_services = pytest.mark.skipif(
    not (settings.REDIS_URL and settings.DATABASES["default"]["ENGINE"].endswith("postgresql")),
    reason="needs PostgreSQL and Redis (DATABASE_URL, REDIS_URL)",
)


@pytest.fixture
def worker():
    queue = f"stagegate-test-{os.getpid()}-{time.monotonic_ns()}"
    started = CeleryWorker(queue)
    yield started
    started.stop()


@pytest.fixture
def mini(ada):
    apply_plan(PLAN, actor=ada)
    return Release.objects.get(name="atlas-mini")


def totals(release, since):
    """Rolled-up totals from ``since`` to the end of the current minute."""
    until = timezone.now() + timedelta(minutes=1)
    return stage_totals(release=release.name, stage=release.current_stage, since=since, until=until)


def truth(release, since):
    """The same, counted from the raw events."""
    until = timezone.now() + timedelta(minutes=1)
    return raw_totals(release=release.name, stage=release.current_stage, since=since, until=until)


def rollup_rows() -> list[tuple]:
    return list(
        UsageRollup.objects.order_by("bucket_seconds", "bucket_start", "org").values_list(
            "bucket_seconds", "bucket_start", "org", "requests", "allowed", "flagged"
        )
    )


# --- a real worker -------------------------------------------------------------------------


@needs_services
def test_worker_rolls_up_usage(worker, mini):
    healthy_traffic(mini, count=3000, minutes=300)
    since = timezone.now() - timedelta(hours=6)

    report = worker.run(rollup_usage)

    assert report["events_seen"] == 3000
    assert report["skipped"] is False
    assert totals(mini, since) == truth(mini, since)
    assert totals(mini, since).allowed == 3000


@needs_services
def test_worker_killed_mid_rollup_then_rerun_gives_the_same_totals(worker, mini):
    since = timezone.now() - timedelta(hours=6)
    healthy_traffic(mini, count=2000, minutes=300)
    rollup_pending()
    before = rollup_rows()
    healthy_traffic(mini, count=2000, minutes=300)  # new events in the same buckets
    # Hold the earliest hour bucket's row, so the worker's rollup stops inside its FIRST
    # chunk's transaction after it has rewritten that chunk's minute buckets, and kill it
    # there. (The last hour would let the earlier chunks commit whenever the five hours of
    # traffic cross the 6-hour chunk grid, i.e. at some times of day.)
    locked_hour = UsageRollup.objects.filter(bucket_seconds=3600).order_by("bucket_start").first()
    dsn = database_env()["DATABASE_URL"].replace("postgres://", "postgresql://")
    with psycopg.connect(dsn) as blocker, psycopg.connect(dsn, autocommit=True) as watcher:
        blocker.execute(
            "SELECT 1 FROM monitoring_usagerollup WHERE id = %s FOR UPDATE", [locked_hour.pk]
        )
        rollup_usage.apply_async(queue=worker.queue)

        def waiting_backend():
            row = watcher.execute(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query ILIKE '%%usagerollup%%'"
            ).fetchone()
            return row and row[0]

        stuck = wait_until(waiting_backend, timeout=30, what="the rollup to block on the lock")
        worker.kill()
        blocker.rollback()  # the orphaned backend wakes, finds its client gone, rolls back
        wait_until(
            lambda: (
                not watcher.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = %s", [stuck]
                ).fetchone()
            ),
            timeout=30,
            what="the killed worker's database session to end",
        )

    assert rollup_rows() == before  # nothing of the killed run was committed
    rerun = CeleryWorker(worker.queue)
    try:
        report = rerun.run(rollup_usage)
    finally:
        rerun.stop()
    assert report["skipped"] is False
    assert totals(mini, since) == truth(mini, since)
    assert totals(mini, since).allowed == 4000
    after = rollup_rows()
    rollup_pending()  # and once more: the same rows
    assert rollup_rows() == after


@needs_services
def test_worker_tripwire_pauses_release_and_proxy_refuses_next_request(
    worker, proxy_server, demo_upstream, ada
):
    apply_plan(PLAN.replace("http://127.0.0.1:9/v1", demo_upstream.base_url), actor=ada)
    # In its first stage for an hour; the synthetic flag spike is the last 20 minutes.
    Release.objects.filter(name="atlas-mini").update(
        stage_entered_at=timezone.now() - timedelta(hours=1)
    )
    org = make_org("northwind-research", "research_partner")
    key = issue_key(organization=org, name="ci", actor=ada).raw_key
    proxy_server.wait_synced()
    client = openai.OpenAI(base_url=f"{proxy_server.url}/v1", api_key=key, max_retries=0)
    hello = [{"role": "user", "content": "hello"}]
    assert client.chat.completions.create(model="atlas-mini", messages=hello).choices
    now = timezone.now()
    write_events(
        traffic(
            release="atlas-mini",
            stage="research_preview",
            orgs=PARTNERS,
            count=60,
            start=now - timedelta(minutes=20),
            end=now,
            flagged_every=1,
        )
    )

    fired = worker.run(check_tripwires)

    assert [(f["release"], f["action"], f["tripwires"]) for f in fired] == [
        ("atlas-mini", "pause", ["flag-spike"])
    ]
    proxy_server.wait_synced()
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(model="atlas-mini", messages=hello)
    assert refused.value.body["code"] == "release_paused"


# --- the beat schedule and the in-process scheduler -----------------------------------------


def test_beat_and_in_process_scheduler_run_the_same_tasks():
    jobs = schedule()

    assert sorted(beat_schedule()) == sorted(job.task for job in jobs)
    app.loader.import_default_modules()
    assert all(job.task in app.tasks for job in jobs)
    assert {job.task for job in jobs} == {
        "stagegate.rollup_usage",
        "stagegate.check_tripwires",
        "stagegate.review_releases",
        "stagegate.expire_verifications",
        "stagegate.delete_expired_samples",
        "stagegate.publish_audit_checkpoint",
        "stagegate.advance_fine_tuning_jobs",
        "stagegate.delete_expired_findings",
    }


def test_in_process_scheduler_rolls_up_usage(mini):
    healthy_traffic(mini, count=500, minutes=60)
    since = timezone.now() - timedelta(hours=2)
    scheduler = InProcessScheduler([Periodic("stagegate.rollup_usage", 0.05)])
    scheduler.start()
    try:
        wait_until(lambda: scheduler.runs["stagegate.rollup_usage"] >= 2, timeout=30, what="runs")
    finally:
        scheduler.stop()

    assert totals(mini, since) == truth(mini, since)
    assert totals(mini, since).allowed == 500


def test_in_process_scheduler_survives_a_failing_task():
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("boom")

    scheduler = InProcessScheduler([Periodic("broken", 0.01)], resolve=lambda name: broken)
    scheduler.start()
    try:
        wait_until(lambda: len(calls) >= 3, timeout=10, what="three runs")
    finally:
        scheduler.stop()

    assert scheduler.runs["broken"] >= 3


def test_tasks_are_acknowledged_late_and_retry_a_bounded_number_of_times():
    app.loader.import_default_modules()
    for job in schedule():
        task = app.tasks[job.task]
        assert task.acks_late is True
        assert task.max_retries == 3
    assert app.conf.task_reject_on_worker_lost is False
