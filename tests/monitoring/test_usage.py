"""The usage buffer: batching, the writer thread, failures, overflow and clean shutdown;
``write_events`` against the test database (COPY on PostgreSQL, bulk INSERT on SQLite),
the record's words stored as codes and read back as words; and ``mark_used`` writing
keys' last_used_at through the callback the proxy gives."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
from django.db import OperationalError, connection
from django.utils import timezone

from access.keys import issue_key, touch_keys_last_used
from access.models import ApiKey
from monitoring.models import FlaggedSample, UsageEvent
from monitoring.records import REASONS, FlagSample, UsageRecord, excerpt
from monitoring.usage import UsageRecorder, clean_text, write_events

CREATED_AT = 1_790_000_000.25  # POSIX seconds, exact in binary and in microseconds


def _event(n: int) -> UsageRecord:
    """Event ``n`` as the proxy records it."""
    values = {
        "created_at": CREATED_AT + n,
        "request_id": f"req_{n:06d}",
        "org": "org_northwind",
        "key": "key_0123456789abcdef",
        "tier": "research_partner",
        "release": "atlas-2",
        "stage": "research_preview",
        "endpoint": "chat.completions",
        "decision": "allow" if n % 3 else "deny",
        "reason": "ok" if n % 3 else "rate_limited",
        "status": 200 if n % 3 else 429,
        "error": "upstream_error" if n == 4 else "",
        "streamed": n % 2 == 0,
        "client_disconnected": n == 2,
        "flagged": n == 1,
        "prompt_tokens": 10 + n,
        "completion_tokens": 20 * n,
        "latency_ms": 12.5 + n,
        "upstream_latency_ms": None if n % 3 == 0 else 10.25 * n,
        "plan_version": None if n == 5 else 3,
        "max_tokens": None if n % 2 else 256 * n,
        "claimed_tier": "research_partner",
        # valid for ever; expired just before the request; expiring just after it
        "verifications": (
            ("monitoring_agreement", None),
            ("business_kyc", CREATED_AT + n - 0.5),
            ("academic_credential", CREATED_AT + n + 0.5),
        ),
    }
    return UsageRecord(**values)


class Writer:
    """A writer that keeps each batch, or raises like a database that is down."""

    def __init__(self, *, failures: int = 0) -> None:
        self.batches: list[list[UsageRecord]] = []
        self.failures = failures  # how many of the next calls fail; -1: all of them
        self.calls: list[float] = []  # monotonic time of each call

    def __call__(self, batch: list[UsageRecord]) -> None:
        self.calls.append(time.monotonic())
        if self.failures:
            self.failures -= 1
            raise OperationalError("connection refused")
        self.batches.append(list(batch))

    @property
    def written(self) -> list[UsageRecord]:
        return [event for batch in self.batches for event in batch]


def _wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout} s")
        time.sleep(0.002)


@pytest.fixture
def stopped():
    """Recorders to stop at the end of the test, even if it fails."""
    recorders: list[UsageRecorder] = []
    yield recorders.append
    for recorder in recorders:
        recorder.stop(timeout=2)


# --- buffering -------------------------------------------------------------------------


def test_flush_writes_events_in_order():
    writer = Writer()
    recorder = UsageRecorder(writer=writer)
    events = [_event(n) for n in range(5)]
    for event in events:
        recorder.record(event)
    assert recorder.pending() == 5
    assert recorder.flush() is True
    assert writer.batches == [events]
    assert (recorder.pending(), recorder.written, recorder.dropped) == (0, 5, 0)


def test_flush_with_nothing_buffered_does_not_call_writer():
    writer = Writer()
    recorder = UsageRecorder(writer=writer)
    assert recorder.flush() is True
    assert writer.calls == []


def test_flush_reports_batch_to_on_write():
    written: list[int] = []
    recorder = UsageRecorder(writer=Writer(), on_write=lambda count, _: written.append(count))
    for n in range(3):
        recorder.record(_event(n))
    recorder.flush()
    recorder.flush()
    assert written == [3]


def test_record_batch_size_wakes_thread_early(stopped):
    writer = Writer()
    recorder = UsageRecorder(writer=writer, flush_interval=60, batch_size=5)
    stopped(recorder)
    recorder.start()
    events = [_event(n) for n in range(5)]
    for event in events:
        recorder.record(event)
    _wait_until(lambda: recorder.written == 5)
    assert writer.batches == [events]  # one write of the whole batch, not before


def test_thread_writes_every_flush_interval(stopped):
    writer = Writer()
    recorder = UsageRecorder(writer=writer, flush_interval=0.01, batch_size=1000)
    stopped(recorder)
    recorder.start()
    recorder.record(_event(0))
    _wait_until(lambda: recorder.written == 1)
    assert writer.written == [_event(0)]


# --- failures --------------------------------------------------------------------------


def test_flush_failing_writer_keeps_events_for_next_flush():
    writer = Writer(failures=2)
    recorder = UsageRecorder(writer=writer)
    events = [_event(n) for n in range(5)]
    for event in events[:3]:
        recorder.record(event)
    assert recorder.flush() is False
    assert (recorder.pending(), recorder.written) == (3, 0)
    for event in events[3:]:
        recorder.record(event)
    assert recorder.flush() is False
    assert recorder.pending() == 5
    assert recorder.flush() is True
    assert writer.batches == [events]  # each once, in order
    assert recorder.flush() is True
    assert writer.batches == [events]
    assert (recorder.pending(), recorder.written, recorder.dropped) == (0, 5, 0)


def test_buffer_over_max_buffer_drops_oldest_while_writer_fails():
    drops: list[int] = []
    writer = Writer(failures=1)
    recorder = UsageRecorder(writer=writer, max_buffer=3, on_drop=drops.append)
    events = [_event(n) for n in range(5)]
    for event in events:
        recorder.record(event)
    assert (recorder.pending(), recorder.dropped, drops) == (3, 2, [1, 1])
    assert recorder.flush() is False
    assert (recorder.pending(), recorder.dropped, drops) == (3, 2, [1, 1])
    assert recorder.flush() is True
    assert writer.batches == [events[2:]]
    assert (recorder.written, recorder.dropped) == (3, 2)


def test_flush_failing_writer_within_max_buffer_drops_nothing():
    drops: list[int] = []
    recorder = UsageRecorder(writer=Writer(failures=1), max_buffer=3, on_drop=drops.append)
    for n in range(3):
        recorder.record(_event(n))
    assert recorder.flush() is False
    assert (recorder.pending(), recorder.dropped, drops) == (3, 0, [])


def test_thread_backs_off_while_writer_fails(stopped):
    writer = Writer(failures=-1)
    recorder = UsageRecorder(writer=writer, flush_interval=0.01, batch_size=1)
    stopped(recorder)
    recorder.start()
    recorder.record(_event(0))
    _wait_until(lambda: len(writer.calls) == 1)
    recorder.record(_event(1))  # traffic goes on while the database is down
    _wait_until(lambda: len(writer.calls) == 2)
    assert writer.calls[1] - writer.calls[0] >= 0.5


# --- shutdown --------------------------------------------------------------------------


def test_stop_flushes_everything_from_running_thread():
    writer = Writer()
    recorder = UsageRecorder(writer=writer, flush_interval=60, batch_size=1000)
    recorder.start()
    events = [_event(n) for n in range(10)]
    for event in events:
        recorder.record(event)
    recorder.stop(timeout=5)
    assert writer.written == events
    assert recorder.pending() == 0


def test_stop_retries_once_when_last_flush_fails():
    writer = Writer(failures=1)
    recorder = UsageRecorder(writer=writer, flush_interval=60, batch_size=1000)
    recorder.start()
    events = [_event(n) for n in range(3)]
    for event in events:
        recorder.record(event)
    recorder.stop(timeout=5)
    assert writer.batches == [events]
    assert recorder.pending() == 0


def test_stop_without_thread_flushes():
    writer = Writer()
    recorder = UsageRecorder(writer=writer)
    recorder.record(_event(0))
    recorder.stop()
    assert writer.batches == [[_event(0)]]


# --- the database ----------------------------------------------------------------------


FIELDS = UsageRecord._fields


def _stored(event: UsageRecord) -> tuple:
    """What the row reads as: the same values, created_at as an aware UTC datetime and
    the verifications as the kinds still valid then."""
    kinds = frozenset(
        kind
        for kind, expires in event.verifications
        if expires is None or expires > event.created_at
    )
    return event._replace(
        created_at=datetime.fromtimestamp(event.created_at, UTC), verifications=kinds
    )


@pytest.mark.django_db
def test_write_events_stores_rows_with_same_values():
    events = [_event(n) for n in range(6)]
    write_events(events)
    rows = list(UsageEvent.objects.order_by("request_id").values_list(*FIELDS))
    assert rows == [_stored(event) for event in events]
    assert rows[0][0] == datetime(2026, 9, 21, 14, 13, 20, 250_000, tzinfo=UTC)
    assert rows[0][FIELDS.index("verifications")] == frozenset(
        {"monitoring_agreement", "academic_credential"}
    )


@pytest.mark.django_db
def test_write_events_stores_words_as_codes_and_filters_by_word():
    write_events([_event(n) for n in range(6)])
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT tier, endpoint, decision, reason, error, claimed_tier, verifications"
            f" FROM {UsageEvent._meta.db_table} WHERE request_id IN ('req_000003', 'req_000004')"
            " ORDER BY request_id"
        )
        # research_partner 1, chat.completions 1, deny 2 / allow 1, rate_limited 9 / ok 1,
        # no error 0 / upstream_error 1, academic_credential 2 | monitoring_agreement 4
        assert cursor.fetchall() == [(1, 1, 2, 9, 0, 1, 6), (1, 1, 1, 1, 1, 1, 6)]
    denied = UsageEvent.objects.filter(decision="deny", reason="rate_limited", error="")
    assert list(denied.order_by("request_id").values_list("request_id", flat=True)) == [
        "req_000000",
        "req_000003",
    ]


@pytest.mark.django_db
def test_write_events_stores_an_unknown_reason_as_other_and_logs_it_once(caplog):
    events = [_event(1)._replace(reason="new_refusal"), _event(2)._replace(reason="new_refusal")]
    REASONS.unknown.discard("new_refusal")
    write_events(events)
    assert list(UsageEvent.objects.values_list("reason", flat=True)) == ["other", "other"]
    assert [r.getMessage() for r in caplog.records] == [
        "no reason code for 'new_refusal' yet: stored as 'other'"
    ]


@pytest.mark.django_db
def test_write_events_with_no_events_runs_no_query(django_assert_num_queries):
    with django_assert_num_queries(0):
        write_events([])


@pytest.mark.django_db
def test_flush_with_default_writer_stores_rows():
    recorder = UsageRecorder()
    events = [_event(n) for n in range(3)]
    for event in events:
        recorder.record(event)
    assert recorder.flush() is True
    rows = list(UsageEvent.objects.order_by("request_id").values_list(*FIELDS))
    assert rows == [_stored(event) for event in events]


@pytest.mark.django_db(transaction=True)
def test_flush_sets_aside_an_event_the_database_refuses_and_writes_the_rest():
    # A negative status breaks a CHECK constraint on every database; on PostgreSQL a NUL
    # in text is refused too (found by fuzzing: one such row stopped every later write).
    # A tier the code table does not have cannot be stored either.
    bad = [_event(3)._replace(status=-1), _event(5)._replace(tier="platinum")]
    if connection.vendor == "postgresql":
        bad.append(_event(7)._replace(release="atlas\x002"))
    good = [_event(n) for n in range(10) if n not in (3, 5, 7)]
    rejected: list[int] = []
    recorder = UsageRecorder(on_reject=rejected.append)
    for event in sorted(good + bad, key=lambda e: e.request_id):
        recorder.record(event)

    assert recorder.flush() is True

    rows = list(UsageEvent.objects.order_by("request_id").values_list(*FIELDS))
    assert rows == [_stored(event) for event in good]
    assert sorted(recorder.rejected) == sorted(bad)
    assert rejected == [1] * len(bad)
    assert recorder.pending() == 0
    recorder.record(_event(11))  # and the next batch goes through
    assert recorder.flush() is True
    assert UsageEvent.objects.count() == len(good) + 1


def test_flush_keeps_everything_while_the_database_is_unreachable():
    writer = Writer(failures=-1)
    recorder = UsageRecorder(writer=writer, reachable=lambda: False)
    for n in range(8):
        recorder.record(_event(n))
    assert recorder.flush() is False
    assert (recorder.pending(), len(recorder.rejected), len(writer.calls)) == (8, 0, 1)


def test_clean_text_replaces_control_characters_and_bounds_length():
    assert clean_text("atlas-2", 63) == "atlas-2"
    assert clean_text("atlas\x002", 63) == "atlas\ufffd2"
    assert clean_text("a\tb\x7fc\u200bd\ud800", 63) == "a\ufffdb\ufffdc\ufffdd\ufffd"
    assert clean_text("é" * 100, 63) == "é" * 63
    assert clean_text("\x00" * 1000, 4) == "\ufffd" * 4
    secret = "sgk_0123456789abcdef_" + "Ab1" * 15
    assert clean_text(secret, 63) == "sgk_0123456789abcdef_[redacted]"


def _touch(interval_seconds: int):
    """The callback the proxy gives: ``access.keys.touch_keys_last_used``."""
    return partial(touch_keys_last_used, interval_seconds=interval_seconds)


@pytest.mark.django_db
def test_mark_used_sets_last_used_at_on_next_touch(northwind):
    api_key = issue_key(organization=northwind, name="t", actor=None).api_key
    other = issue_key(organization=northwind, name="other", actor=None).api_key
    recorder = UsageRecorder(writer=Writer(), on_keys_used=_touch(60))
    recorder.mark_used(api_key.key_id)
    before = timezone.now()
    recorder._touch_keys()
    after = timezone.now()
    api_key.refresh_from_db()
    other.refresh_from_db()
    assert before <= api_key.last_used_at <= after
    assert other.last_used_at is None


@pytest.mark.django_db
def test_mark_used_writes_at_most_once_per_interval(northwind):
    api_key = issue_key(organization=northwind, name="t", actor=None).api_key
    recent = timezone.now() - timedelta(seconds=30)
    ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=recent)
    recorder = UsageRecorder(writer=Writer(), on_keys_used=_touch(60))
    recorder.mark_used(api_key.key_id)
    recorder._touch_keys()
    api_key.refresh_from_db()
    assert api_key.last_used_at == recent

    stale = timezone.now() - timedelta(seconds=61)
    ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=stale)
    recorder.mark_used(api_key.key_id)
    recorder._touch_keys()
    api_key.refresh_from_db()
    assert api_key.last_used_at > stale + timedelta(seconds=60)


@pytest.mark.django_db
def test_touch_keys_without_marks_runs_no_query(django_assert_num_queries):
    recorder = UsageRecorder(writer=Writer(), on_keys_used=_touch(60))
    with django_assert_num_queries(0):
        recorder._touch_keys()


# --- screening: flags on the event, flagged samples ---------------------------------------


@pytest.mark.django_db
def test_write_events_stores_screening_flags_and_sets_flagged():
    flagged = _event(2)._replace(flags="cyber,weapons", flagged=False)
    routed = _event(4)._replace(flags="cyber", routed_to="atlas-2-mini", flagged=False)
    write_events([_event(1), flagged, routed, _event(5)])
    rows = UsageEvent.objects.order_by("request_id").values_list(
        "request_id", "flagged", "flags", "routed_to"
    )
    assert list(rows) == [
        ("req_000001", True, "", ""),  # the upstream's content filter
        ("req_000002", True, "cyber,weapons", ""),
        ("req_000004", True, "cyber", "atlas-2-mini"),
        ("req_000005", False, "", ""),
    ]


def _sample(n: int, **changes) -> FlagSample:
    key = "sgk_0123456789abcdef_" + "Ab1" * 15
    values = {
        "created_at": CREATED_AT + n,
        "request_id": f"req_{n:06d}",
        "release": "atlas-2",
        "stage": "research_preview",
        "tier": "research_partner",
        "org": "org_northwind",
        "key": "key_0123456789abcdef",
        "categories": "cyber,weapons",
        "source": "prompt",
        "action": "flag",
        "excerpt": excerpt(f"my key is {key}, now write ransomware"),
        "retain_days": 30,
    }
    return FlagSample(**{**values, **changes})


@pytest.mark.django_db
def test_record_sample_is_written_by_the_next_flush_and_expires_after_its_days():
    recorder = UsageRecorder()
    recorder.record(_event(1))
    recorder.record_sample(_sample(1))
    recorder.record_sample(_sample(2, source="response", action="block", retain_days=1))
    assert recorder.pending_samples() == 2

    assert recorder.flush() is True

    rows = FlaggedSample.objects.order_by("request_id").values_list(
        "request_id", "categories", "source", "action", "excerpt", "status", "decided_by"
    )
    assert list(rows) == [
        (
            f"req_00000{n}",
            "cyber,weapons",
            source,
            action,
            "my key is sgk_0123456789abcdef_[redacted], now write ransomware",
            "pending",
            None,
        )
        for n, source, action in ((1, "prompt", "flag"), (2, "response", "block"))
    ]
    first, second = FlaggedSample.objects.order_by("request_id")
    created = datetime.fromtimestamp(CREATED_AT + 1, UTC)
    assert (first.created_at, first.expires_at) == (created, created + timedelta(days=30))
    assert second.expires_at == second.created_at + timedelta(days=1)
    assert (recorder.pending_samples(), recorder.samples_written, UsageEvent.objects.count()) == (
        0,
        2,
        1,
    )


def test_samples_wait_while_the_database_is_unreachable():
    events, samples = Writer(failures=1), Writer(failures=0)
    recorder = UsageRecorder(writer=events, sample_writer=samples, reachable=lambda: False)
    recorder.record(_event(0))
    recorder.record_sample(_sample(0))
    assert recorder.flush() is False
    assert (recorder.pending(), recorder.pending_samples(), samples.calls) == (1, 1, [])
    assert recorder.flush() is True
    assert (events.written, samples.written) == ([_event(0)], [_sample(0)])


def test_record_sample_beyond_max_samples_drops_the_oldest():
    samples = Writer()
    recorder = UsageRecorder(writer=Writer(), sample_writer=samples, max_samples=2)
    for n in range(3):
        recorder.record_sample(_sample(n))
    assert recorder.flush() is True
    assert (samples.written, recorder.samples_dropped) == ([_sample(1), _sample(2)], 1)


@pytest.mark.django_db(transaction=True)
def test_flush_sets_aside_a_sample_the_database_refuses_and_writes_the_rest():
    bad = _sample(3, source="p" * 100) if connection.vendor == "postgresql" else None
    bad = bad or _sample(3, retain_days=10**9)  # an expiry no database can store
    recorder = UsageRecorder()
    for sample in (_sample(1), bad, _sample(5)):
        recorder.record_sample(sample)
    assert recorder.flush() is True
    assert list(
        FlaggedSample.objects.order_by("request_id").values_list("request_id", flat=True)
    ) == [
        "req_000001",
        "req_000005",
    ]
    assert list(recorder.rejected_samples) == [bad]
