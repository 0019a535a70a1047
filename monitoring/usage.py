"""Usage telemetry: one event per proxy decision, buffered and written in batches.

The request path only appends a ``UsageRecord`` (``monitoring.records``) to an
in-memory buffer (no I/O, no lock contention worth measuring). A daemon thread writes
the buffer every ``flush_interval`` seconds, or as soon as it holds ``batch_size``
events, with PostgreSQL ``COPY`` (or one bulk INSERT on SQLite), turning the record's
words into their codes on the way (``_row``).

How many events a crash can lose (documented in docs/operations.md): on a clean
shutdown (SIGTERM, lifespan shutdown) none; on a hard kill, those recorded since
the last write, i.e. at most ``batch_size`` events or ``flush_interval`` seconds of
traffic per worker process, whichever is smaller, plus a batch being written at
that instant. While the database is unreachable, events stay buffered up to
``max_buffer`` per process; beyond that the oldest are dropped and counted in
``stagegate_usage_events_dropped_total``.

One bad event never blocks the others. Client-supplied text (the model name asked
for) is cleaned before it is recorded (``clean_text``); a reason or upstream error
the code tables do not know yet is stored as ``other`` (and logged once). If a batch
still cannot be written while the database is reachable (the database refuses a row,
or a tier, endpoint or verdict has no code), the batch is split until the event at
fault is found: the rest is written, that event is set aside (logged, kept in
``UsageRecorder.rejected``) and counted in ``stagegate_usage_events_rejected_total``.

Flagged samples (``monitoring.records.FlagSample``, the redacted excerpts screening
keeps for human review) take the same path: ``record_sample`` buffers them (at most
``max_samples`` per process, the oldest dropped beyond), the same thread writes them
after the events of each flush, to ``monitoring.models.FlaggedSample``, with the same
guarantees: kept while the database is unreachable, one refused sample set aside
(``UsageRecorder.rejected_samples``) without blocking the others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from django.db import close_old_connections, connection, transaction
from django.utils import timezone

from monitoring.models import FlaggedSample, UsageEvent
from monitoring.records import (
    ENDPOINTS,
    ERRORS,
    REASONS,
    TIERS,
    VERDICTS,
    FlagSample,
    UsageRecord,
    valid_kinds,
)
from monitoring.redaction import redact_secrets

log = logging.getLogger(__name__)

# The usage table's columns, in the order ``_row`` gives them: the record's own fields.
COLUMNS: tuple[str, ...] = UsageRecord._fields
REJECTED_KEPT = 100  # events (and samples) set aside that a worker keeps for inspection


def clean_text(text: str, limit: int) -> str:
    """``text`` from a client made safe to store and show: cut to ``limit`` characters,
    every control, format or unassigned character (NUL among them, which PostgreSQL
    cannot store in text) replaced by U+FFFD, and an API key's secret redacted."""
    if len(text) > limit:
        text = text[:limit]
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else "\ufffd" for ch in text)
    return redact_secrets(text)


_TIER, _ENDPOINT, _VERDICT, _REASON, _ERROR = (
    table.codes for table in (TIERS, ENDPOINTS, VERDICTS, REASONS, ERRORS)
)


def _row(event: UsageRecord, adapt=None) -> tuple:
    """The usage table's row for ``event``: its words as codes, its time a datetime
    (passed through ``adapt``, the backend's storage format, if given), the kinds of
    verification still valid at that time as a bit set, and ``flagged`` true whenever
    screening flagged it (``flags`` not empty). ValueError for a word a closed
    vocabulary does not have. (It runs on the writer thread, which shares the
    interpreter lock with the requests: plain dictionary lookups first, the tables'
    fallbacks only for a word they do not know.)"""
    (
        at,
        request_id,
        org,
        key,
        tier,
        release,
        stage,
        endpoint,
        decision,
        reason,
        status,
        error,
        streamed,
        client_disconnected,
        flagged,
        prompt_tokens,
        completion_tokens,
        latency_ms,
        upstream_latency_ms,
        plan_version,
        max_tokens,
        claimed_tier,
        verifications,
        flags,
        routed_to,
    ) = event
    try:
        codes = (_TIER[tier], _ENDPOINT[endpoint], _VERDICT[decision], _REASON[reason])
        error_code, claimed_code = _ERROR[error], _TIER[claimed_tier]
    except KeyError:
        codes = (
            TIERS.write(tier),
            ENDPOINTS.write(endpoint),
            VERDICTS.write(decision),
            REASONS.write(reason),
        )
        error_code, claimed_code = ERRORS.write(error), TIERS.write(claimed_tier)
    created_at = datetime.fromtimestamp(at, UTC)
    return (
        created_at if adapt is None else adapt(created_at),
        request_id,
        org,
        key,
        codes[0],
        release,
        stage,
        codes[1],
        codes[2],
        codes[3],
        status,
        error_code,
        streamed,
        client_disconnected,
        flagged or flags != "",
        prompt_tokens,
        completion_tokens,
        latency_ms,
        upstream_latency_ms,
        plan_version,
        max_tokens,
        claimed_code,
        valid_kinds(verifications, at) if verifications else 0,
        flags,
        routed_to,
    )


def write_events(events: list[UsageRecord]) -> None:
    """Write events in one statement: COPY on PostgreSQL, a bulk INSERT elsewhere."""
    if not events:
        return
    if connection.vendor == "postgresql":
        table = UsageEvent._meta.db_table
        columns = ", ".join(COLUMNS)
        with (
            connection.cursor() as cursor,
            cursor.cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy,
        ):
            for event in events:
                copy.write_row(_row(event))
    else:
        # One executemany: the ORM's bulk_create costs four times as much CPU per row,
        # and this thread shares the interpreter lock with the requests.
        sql = (
            f"INSERT INTO {UsageEvent._meta.db_table} ({', '.join(COLUMNS)})"  # noqa: S608
            f" VALUES ({', '.join(['%s'] * len(COLUMNS))})"
        )
        with transaction.atomic(), connection.cursor() as cursor:
            adapt = connection.ops.adapt_datetimefield_value  # the ORM's storage format
            cursor.executemany(sql, [_row(event, adapt) for event in events])


def write_samples(samples: list[FlagSample]) -> None:
    """Write flagged samples in one INSERT; each expires ``retain_days`` after it was
    made. The excerpt is redacted again on the way (``RedactedTextField``)."""
    if not samples:
        return
    rows = []
    for sample in samples:
        created_at = datetime.fromtimestamp(sample.created_at, UTC)
        rows.append(
            FlaggedSample(
                created_at=created_at,
                request_id=sample.request_id,
                release=clean_text(sample.release, 63),
                stage=sample.stage,
                tier=sample.tier,
                org=sample.org,
                key=sample.key,
                categories=sample.categories,
                source=sample.source,
                action=sample.action,
                excerpt=sample.excerpt,
                expires_at=created_at + timedelta(days=sample.retain_days),
            )
        )
    FlaggedSample.objects.bulk_create(rows)


def database_reachable() -> bool:
    """Whether a fresh connection to the database answers (after a failed write)."""
    try:
        connection.ensure_connection()
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception:
        connection.close()
        return False
    return True


class UsageRecorder:
    """A bounded buffer of usage events and the thread that writes it."""

    def __init__(
        self,
        *,
        flush_interval: float = 1.0,
        batch_size: int = 500,
        max_buffer: int = 100_000,
        writer: Callable[[list[UsageRecord]], None] = write_events,
        reachable: Callable[[], bool] = database_reachable,
        on_drop: Callable[[int], None] | None = None,
        on_write: Callable[[int, float], None] | None = None,
        on_reject: Callable[[int], None] | None = None,
        on_keys_used: Callable[..., object] | None = None,
        sample_writer: Callable[[list[FlagSample]], None] = write_samples,
        max_samples: int = 10_000,
    ) -> None:
        """``on_keys_used(key_ids, now=...)`` writes the last-used time of the keys
        ``mark_used`` named since its last call (the proxy passes
        ``access.keys.touch_keys_last_used``); it is called from the writer thread after
        each flush, and what it raises is logged, never raised."""
        self._on_keys_used = on_keys_used
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self.max_buffer = max_buffer
        self._writer = writer
        self._reachable = reachable
        self._on_drop = on_drop
        self._on_reject = on_reject
        self.rejected: deque[UsageRecord] = deque(maxlen=REJECTED_KEPT)
        self._on_write = on_write
        self._buffer: deque[UsageRecord] = deque()
        self._sample_writer = sample_writer
        self.max_samples = max_samples
        self._samples: deque[FlagSample] = deque()
        self.rejected_samples: deque[FlagSample] = deque(maxlen=REJECTED_KEPT)
        self.samples_dropped = 0
        self.samples_written = 0
        self._used: set[str] = set()  # key ids whose last_used_at is due
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self.written = 0

    def record(self, event: UsageRecord) -> None:
        """Buffer one event. Never blocks, never raises."""
        if len(self._buffer) >= self.max_buffer:  # the database has been down a while
            self._buffer.popleft()
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop(1)
        self._buffer.append(event)
        if len(self._buffer) >= self.batch_size:
            self._wake.set()

    def record_sample(self, sample: FlagSample) -> None:
        """Buffer one flagged sample for the next flush. Never blocks, never raises."""
        if len(self._samples) >= self.max_samples:
            self._samples.popleft()
            self.samples_dropped += 1
        self._samples.append(sample)

    def mark_used(self, key_id: str) -> None:
        """Have the next flush write the key's last_used_at (the caller rate-limits this)."""
        self._used.add(key_id)

    def pending(self) -> int:
        return len(self._buffer)

    def pending_samples(self) -> int:
        return len(self._samples)

    def flush(self) -> bool:
        """Write everything buffered so far (events, then samples); while the database
        is unreachable keep it for the next try. Returns False if anything was kept."""
        batch: list[UsageRecord] = []
        while self._buffer:
            batch.append(self._buffer.popleft())
        if batch:
            started = time.perf_counter()

            def written(count: int) -> None:
                self.written += count
                if self._on_write is not None:
                    self._on_write(count, time.perf_counter() - started)

            kept, error = self._write(batch, self._writer, written, self._reject)
            if kept:
                log.warning("usage events not written yet (%d kept): %s", len(kept), error)
                self._keep(kept)
                return False  # the samples wait for the database too
        samples: list[FlagSample] = []
        while self._samples:
            samples.append(self._samples.popleft())
        if samples:
            kept_samples, error = self._write(
                samples, self._sample_writer, self._samples_written, self._reject_sample
            )
            if kept_samples:
                log.warning(
                    "flagged samples not written yet (%d kept): %s", len(kept_samples), error
                )
                self._samples.extendleft(reversed(kept_samples))
                while len(self._samples) > self.max_samples:
                    self._samples.popleft()
                    self.samples_dropped += 1
                return False
        return True

    def _write(
        self, batch: list, writer: Callable, written: Callable, reject: Callable
    ) -> tuple[list, Exception | None]:
        """Write ``batch`` through ``writer``, halving a part the database refuses until
        the item at fault is found and set aside (``reject``); ``written(count)`` after
        each part written. Returns what is left unwritten because the database is
        unreachable (empty when done) and the error that said so."""
        parts = [batch]
        while parts:
            part = parts.pop()
            try:
                writer(part)
            except Exception as exc:
                connection.close()
                if not self._reachable():  # an outage: keep this and what is left
                    return [item for rest in (*parts, part) for item in rest], exc
                if len(part) > 1:  # the database refused something in it: halve it
                    middle = len(part) // 2
                    parts += [part[middle:], part[:middle]]
                else:
                    reject(part[0], exc)
                continue
            written(len(part))
        return [], None

    def _samples_written(self, count: int) -> None:
        self.samples_written += count

    def _keep(self, events: list[UsageRecord]) -> None:
        """Put unwritten events back at the head of the buffer, within ``max_buffer``."""
        self._buffer.extendleft(reversed(events))
        overflow = len(self._buffer) - self.max_buffer
        if overflow > 0:
            for _ in range(overflow):
                self._buffer.popleft()
            self.dropped += overflow
            if self._on_drop is not None:
                self._on_drop(overflow)

    def _reject(self, event: UsageRecord, exc: Exception) -> None:
        self.rejected.append(event)
        log.error("usage event %s set aside, it cannot be written: %s", event.request_id, exc)
        if self._on_reject is not None:
            self._on_reject(1)

    def _reject_sample(self, sample: FlagSample, exc: Exception) -> None:
        self.rejected_samples.append(sample)
        log.error("flagged sample %s set aside, it cannot be written: %s", sample.request_id, exc)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="stagegate-usage", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread after a last flush (a clean shutdown loses nothing)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        else:
            self.flush()

    def _touch_keys(self) -> None:
        if not self._used or self._on_keys_used is None:
            return
        used, self._used = self._used, set()
        now = timezone.now()
        try:
            self._on_keys_used(used, now=now)
        except Exception as exc:  # last_used is a convenience; never worth an outage
            log.warning("could not write last_used_at: %s", exc)

    def _run(self) -> None:
        backoff = 0.0
        while True:
            if backoff:  # the database is failing: a full buffer must not hurry the retry
                self._stop.wait(backoff)
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            stopping = self._stop.is_set()
            close_old_connections()
            ok = self.flush()
            self._touch_keys()
            backoff = 0.0 if ok else min(max(backoff * 2, 0.5), 30.0)
            if stopping:
                if not ok:
                    ok = self.flush()  # one last try before giving up
                connection.close()
                return
