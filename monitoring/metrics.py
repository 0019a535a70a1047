"""Prometheus metrics: every series Stagegate exports, defined in one place.

With several worker processes, ``stagegate.serve`` sets ``PROMETHEUS_MULTIPROC_DIR``
before any worker imports prometheus_client; each process then writes its values
to memory-mapped files there and ``render()`` merges them, so a scrape sees the
totals of all workers whichever worker answers it.
"""

from __future__ import annotations

import logging
import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Proxy overhead is sub-millisecond and model calls take seconds: buckets span both.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
)  # fmt: skip

REQUESTS = Counter(
    "stagegate_proxy_requests",
    "Proxy decisions, by release, stage, effective tier, endpoint and reason code (ok = allowed).",
    ["release", "stage", "tier", "endpoint", "reason"],
)
REQUEST_LATENCY = Histogram(
    "stagegate_proxy_request_duration_seconds",
    "Time from request to last byte sent, in the proxy, by endpoint.",
    ["endpoint"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_LATENCY = Histogram(
    "stagegate_proxy_upstream_duration_seconds",
    "Time the upstream took, from sending the request to its last byte, by release.",
    ["release"],
    buckets=LATENCY_BUCKETS,
)
RATE_LIMITED = Counter(
    "stagegate_proxy_rate_limited",
    "Requests refused by a rate limit or quota, by release, tier and the limit that applied.",
    ["release", "tier", "limit"],
)
UPSTREAM_ERRORS = Counter(
    "stagegate_proxy_upstream_errors",
    "Upstream calls that failed: unreachable, timeout, bad status or bad body.",
    ["release", "error"],
)
TOKENS = Counter(
    "stagegate_proxy_tokens",
    "Tokens served, by release, tier and kind (prompt or completion).",
    ["release", "tier", "kind"],
)
CLIENT_DISCONNECTS = Counter(
    "stagegate_proxy_client_disconnects",
    "Streams the client left before the end.",
    ["release"],
)
SLOW_CLIENTS = Counter(
    "stagegate_slow_clients_cut",
    "Requests cut off because their headers or body did not arrive in time (any route),"
    " by phase: headers or body.",
    ["phase"],
)
UNAVAILABLE = Counter(
    "stagegate_proxy_unavailable",
    "Requests refused with 503 because a store could not be reached (fail closed).",
    ["store"],
)
LIMIT_COUNTERS_LOST = Counter(
    "stagegate_proxy_limit_counters_lost",
    "Times a worker found the rate-limit counters gone (Redis restarted without its data,"
    " was flushed or failed over); the rest of that minute is refused.",
)
SNAPSHOT_RELOADS = Counter(
    "stagegate_proxy_snapshot_reloads",
    "Times a worker loaded a new snapshot of keys, organizations and releases.",
)
SNAPSHOT_LOAD_SECONDS = Histogram(
    "stagegate_proxy_snapshot_load_seconds",
    "Time to load a snapshot from the database.",
    buckets=LATENCY_BUCKETS,
)
INVALIDATION_LAG = Histogram(
    "stagegate_proxy_invalidation_lag_seconds",
    "From a change's commit (its audit row) to the new snapshot serving requests.",
    buckets=LATENCY_BUCKETS,
)
USAGE_WRITTEN = Counter("stagegate_usage_events_written", "Usage events written to the database.")
USAGE_DROPPED = Counter(
    "stagegate_usage_events_dropped",
    "Usage events dropped because the buffer was full while the database was unreachable.",
)
USAGE_REJECTED = Counter(
    "stagegate_usage_events_rejected",
    "Usage events the database refused on their own (not for an outage), set aside so the"
    " rest of their batch is written.",
)
UNSETTLED = Counter(
    "stagegate_proxy_reservations_unsettled",
    "Token reservations that could not be settled after the call (they expire with their window).",
)
USAGE_PENDING = Gauge(
    "stagegate_usage_events_pending",
    "Usage events buffered in a worker, not yet written.",
    multiprocess_mode="livesum",
)


_children: dict[tuple, object] = {}


def child(metric, *labels: str):
    """``metric.labels(*labels)``, remembered: the proxy calls this on every request,
    and prometheus-client's own lookup takes a lock and rebuilds the key each time.
    Callers keep label values bounded (no client-chosen strings)."""
    key = (id(metric), labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


class DatabaseCollector:
    """Gauges read from the database when scraped (at most every ``ttl`` seconds; a
    scrape in between gets the same figures). The values live in the database, not in
    a process, so whichever worker answers the scrape reports the same thing; a
    subclass says which in ``_families``."""

    what = "database metrics"  # for the log line when they cannot be read

    def __init__(self, ttl: float = 10.0) -> None:
        self.ttl = ttl
        self._cached: tuple[float, list] | None = None

    def describe(self):
        return []  # collected only on scrape: registering must not query the database

    def _families(self) -> list:
        raise NotImplementedError

    def collect(self):
        from django.db import close_old_connections, connection

        now = time.monotonic()
        if self._cached is None or now - self._cached[0] >= self.ttl:
            if not connection.in_atomic_block:  # a scrape's thread may hold a dead connection
                close_old_connections()
            try:
                self._cached = (now, self._families())
            except Exception:  # a scrape must still answer with the proxy's own series
                log.exception("could not read %s", self.what)
                return []
        return self._cached[1]


class ReleaseCollector(DatabaseCollector):
    """Each release's stage and state, and its latest review's criteria."""

    what = "release and review metrics"

    def _families(self) -> list:
        from rollout.status import release_status

        stage = GaugeMetricFamily(
            "stagegate_release_stage",
            "Position of the release's current stage in its plan (0 = first); the stage label"
            " names it.",
            labels=["release", "stage"],
        )
        paused = GaugeMetricFamily(
            "stagegate_release_paused", "1 while the release is paused.", labels=["release"]
        )
        observed = GaugeMetricFamily(
            "stagegate_review_criterion_observed",
            "Each exit criterion's observed value in the release's latest review (rates are"
            " 95% Wilson upper bounds).",
            labels=["release", "stage", "criterion"],
        )
        threshold = GaugeMetricFamily(
            "stagegate_review_criterion_threshold",
            "Each numeric exit criterion's threshold in the release's latest review.",
            labels=["release", "stage", "criterion"],
        )
        passed = GaugeMetricFamily(
            "stagegate_review_criterion_passed",
            "1 when the criterion passed in the release's latest review, else 0.",
            labels=["release", "stage", "criterion"],
        )
        recommendation = GaugeMetricFamily(
            "stagegate_review_recommendation",
            "1 for the recommendation of the release's latest review.",
            labels=["release", "recommendation"],
        )
        reviewed_at = GaugeMetricFamily(
            "stagegate_review_timestamp_seconds",
            "When the release's latest review was made (Unix time).",
            labels=["release"],
        )
        for status in release_status():
            stage.add_metric([status.release, status.stage], status.stage_index)
            paused.add_metric([status.release], 1 if status.state == "paused" else 0)
            review = status.review
            if review is None:
                continue
            reviewed_at.add_metric([status.release], review.created_at.timestamp())
            recommendation.add_metric([status.release, review.recommendation], 1)
            for result in review.criteria:
                labels = [status.release, review.stage, result["name"]]
                passed.add_metric(labels, 1 if result["passed"] else 0)
                if isinstance(result["observed"], int | float):
                    observed.add_metric(labels, result["observed"])
                if isinstance(result["threshold"], int | float):
                    threshold.add_metric(labels, result["threshold"])
        return [stage, paused, observed, threshold, passed, recommendation, reviewed_at]


class AuditCollector(DatabaseCollector):
    """The audit chain's latest seq. Read at scrape time rather than set by the task
    that publishes checkpoints: that task runs on a Celery worker, which nothing
    scrapes. Prometheus keeps the history outside the database, so a seq that goes
    down (rows cut from the end) shows there whatever the database says later."""

    what = "the audit chain's latest seq"

    def _families(self) -> list:
        from monitoring.checkpoints import latest_checkpoint

        seq = GaugeMetricFamily(
            "stagegate_audit_checkpoint_seq",
            "Seq of the audit log's latest row; it only ever grows (a drop means rows were"
            " removed: check with verify_audit --checkpoint).",
        )
        seq.add_metric([], latest_checkpoint().seq)
        return [seq]


class FineTuningCollector(DatabaseCollector):
    """Fine-tuning jobs by status and what waits for reviewers, per release (read from
    ``tuning.telemetry`` at scrape time, as the releases' from ``rollout.status``)."""

    what = "fine-tuning metrics"

    def _families(self) -> list:
        from tuning.telemetry import awaiting_review, jobs_by_status

        jobs = GaugeMetricFamily(
            "stagegate_fine_tuning_jobs",
            "Fine-tuning jobs of the release in each status.",
            labels=["release", "status"],
        )
        held = GaugeMetricFamily(
            "stagegate_fine_tuning_awaiting_review",
            "Held datasets (subject dataset) and tuned models held by a failed assessment"
            " (subject model) waiting for reviewers.",
            labels=["release", "subject"],
        )
        for (release, status), count in sorted(jobs_by_status().items()):
            jobs.add_metric([release, status], count)
        for (release, subject), count in sorted(awaiting_review().items()):
            held.add_metric([release, subject], count)
        return [jobs, held]


# Series read from the database at scrape time (DatabaseCollector), apart from the
# per-process ones above.
FROM_DATABASE = CollectorRegistry(auto_describe=False)
FROM_DATABASE.register(ReleaseCollector())
FROM_DATABASE.register(AuditCollector())
FROM_DATABASE.register(FineTuningCollector())


def render() -> bytes:
    """The exposition text for a scrape, merged across worker processes if needed,
    followed by the gauges read from the database."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry) + generate_latest(FROM_DATABASE)
    return generate_latest() + generate_latest(FROM_DATABASE)


def mark_process_dead(pid: int) -> None:
    """Forget a worker's live gauges when it exits (multiprocess mode only)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _multiprocess.mark_process_dead(pid)
