"""Usage rollups: totals from rollups equal totals from the raw events (random data,
partial hours, minute edges, tripwire windows), rollups replace rather than add (twice,
chunked, after an interrupted run, after events are gone, over rows written before
they were keyed by reason or by key), each bucket keeps its refusals per reason and its
requests per API key, the cursor picks up late events, and the counting rules for
denied, errored and flagged requests; screening's flags per category are rolled up in
the same runs and read back equal to the raw events' too."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection, connections
from django.db.models import Sum

from monitoring.models import RollupCursor, UsageEvent, UsageFlagRollup, UsageRollup
from monitoring.records import UsageRecord
from monitoring.rollups import (
    ADVISORY_LOCK_KEY,
    RollupReport,
    Totals,
    raw_totals,
    rolled_up_to,
    rollup_pending,
    rollup_window,
    stage_totals,
    window_totals,
)
from monitoring.usage import write_events

BASE = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)  # an hour boundary
RELEASES = ("atlas-2", "boreas-1")
STAGES = ("research_preview", "commercial")
ORGS = (  # (org public id, tier); one blank org, as a refusal before the key is known
    ("org_northwind", "research_partner"),
    ("org_acme", "verified_commercial"),
    ("org_initech", "verified_commercial"),
    ("org_tartu", "credentialed_academic"),
    ("org_publicdev", "public"),
    ("", ""),
)
KEY_COLUMNS = (
    "bucket_seconds",
    "bucket_start",
    "release",
    "stage",
    "tier",
    "org",
    "reason",
    "key",
)
COUNTED = len(KEY_COLUMNS)  # where the counters start in a ROW_COLUMNS row
# Refusal reasons of the random events, taken in turn (not from the random stream, so
# the other draws stay as they were).
REFUSALS = ("model_not_available", "rate_limited", "rate_limited", "quota_exceeded")
# API keys of the random events' organizations, in turn likewise: two keys, and a call
# without a valid key (a refusal before the key is known, recorded with its org).
KEY_SUFFIXES = ("_a", "_b", "_a", None)
ROW_COLUMNS = (
    *KEY_COLUMNS,
    "requests",
    "allowed",
    "denied",
    "errors",
    "flagged",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms_sum",
)


def _event(
    at: datetime,
    *,
    release: str = "atlas-2",
    stage: str = "research_preview",
    org: str = "org_northwind",
    tier: str = "research_partner",
    decision: str = "allow",
    reason: str = "",
    key: str | None = "key_0123456789abcdef",
    error: str = "",
    flagged: bool = False,
    flags: str = "",
    prompt_tokens: int = 10,
    completion_tokens: int = 20,
    latency_ms: float = 12.5,
) -> UsageRecord:
    """One event as the proxy records it."""
    return UsageRecord(
        **{
            "created_at": at.timestamp(),
            "request_id": f"req_{at.timestamp():.6f}",
            "org": org,
            "key": key if org and key else "",
            "tier": tier,
            "release": release,
            "stage": stage,
            "endpoint": "chat.completions",
            "decision": decision,
            "reason": reason or ("ok" if decision == "allow" else "model_not_available"),
            "status": 200 if decision == "allow" else 403,
            "error": error,
            "streamed": False,
            "client_disconnected": False,
            "flagged": flagged,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "latency_ms": latency_ms,
            "upstream_latency_ms": None,
            "plan_version": 1,
            "max_tokens": None,
            "claimed_tier": tier,
            "verifications": (),
            "flags": flags,
        }
    )


# Screening flags of the random events, taken in turn like the refusals: most events
# have none; some one category, some two (counted in each), on allowed and denied ones.
FLAG_SETS = ("", "", "cyber", "", "", "", "cyber,weapons", "", "violence/graphic", "", "", "")


def _random_events(count: int, *, seed: int = 7, hours: int = 4) -> list[UsageRecord]:
    """Events over [BASE - 30 min, BASE + hours h), a tenth of them on a minute or hour
    edge or a microsecond before one. Latencies are multiples of 1/4, so their sums
    are exact whatever the order of addition."""
    rng = random.Random(seed)
    span = int((hours * 60 + 30) * 60)
    events = []
    for _ in range(count):
        at = BASE - timedelta(minutes=30) + timedelta(seconds=rng.uniform(0, span))
        if rng.random() < 0.1:
            edge = at.replace(second=0, microsecond=0)
            if rng.random() < 0.3:
                edge = edge.replace(minute=0)
            at = edge - timedelta(microseconds=rng.choice((0, 1)))
        org, tier = rng.choice(ORGS)
        suffix = KEY_SUFFIXES[len(events) % len(KEY_SUFFIXES)]
        allowed = rng.random() < 0.85
        events.append(
            _event(
                at,
                release=rng.choice(RELEASES),
                stage=rng.choice(STAGES),
                org=org,
                tier=tier,
                decision="allow" if allowed else "deny",
                reason="ok" if allowed else REFUSALS[len(events) % len(REFUSALS)],
                key=f"key{org[3:]}{suffix}" if suffix else None,
                error="upstream_error" if rng.random() < 0.1 else "",
                flagged=rng.random() < 0.1,
                flags=FLAG_SETS[len(events) % len(FLAG_SETS)],
                prompt_tokens=rng.randint(0, 500) if allowed else 0,
                completion_tokens=rng.randint(0, 900) if allowed else 0,
                latency_ms=rng.randint(1, 4000) / 4,
            )
        )
    return events


FLAG_KEY_COLUMNS = (*KEY_COLUMNS, "category")
FLAG_ROW_COLUMNS = (*FLAG_KEY_COLUMNS, "flagged", "denied")


def _rows() -> list[tuple]:
    """Every rollup row: usage, then flags per category."""
    usage = UsageRollup.objects.order_by(*KEY_COLUMNS).values_list(*ROW_COLUMNS)
    flags = UsageFlagRollup.objects.order_by(*FLAG_KEY_COLUMNS).values_list(*FLAG_ROW_COLUMNS)
    return [*usage, *flags]


def _periods() -> list[tuple[datetime, datetime]]:
    """Whole span, whole hours, partial hours at both edges (not minute-aligned either),
    inside one hour, across one hour boundary, and empty."""
    return [
        (BASE - timedelta(hours=1), BASE + timedelta(hours=5)),
        (BASE, BASE + timedelta(hours=3)),
        (
            BASE + timedelta(minutes=17, seconds=30),
            BASE + timedelta(hours=3, minutes=42, seconds=10),
        ),
        (BASE - timedelta(minutes=29, seconds=59), BASE + timedelta(hours=2, minutes=1)),
        (BASE + timedelta(hours=1, minutes=5), BASE + timedelta(hours=1, minutes=55)),
        (BASE + timedelta(minutes=50), BASE + timedelta(hours=1, minutes=10)),
        (BASE + timedelta(hours=2), BASE + timedelta(hours=2)),
    ]


def _assert_totals_match_raw() -> None:
    for release in RELEASES:
        for stage in STAGES:
            for since, until in _periods():
                kwargs = {"release": release, "stage": stage, "since": since, "until": until}
                assert stage_totals(**kwargs) == raw_totals(**kwargs), kwargs


END = BASE + timedelta(hours=4, minutes=1)  # after every random event


def test_stage_totals_random_data_equal_raw_totals(db):
    write_events(_random_events(3000))

    rollup_pending(now=END)

    _assert_totals_match_raw()
    whole = raw_totals(release="atlas-2", stage="commercial", since=BASE, until=END)
    assert (whole.requests > 500, whole.distinct_orgs) == (True, 5)


def test_stage_totals_partial_hours_match_raw_totals(db):
    edges = [BASE + timedelta(hours=1), BASE + timedelta(hours=2, minutes=13)]
    events = []
    for edge in edges:
        for delta in (-61, -60, -1, 0, 1, 59, 60):
            events.append(_event(edge + timedelta(seconds=delta)))
        events.append(_event(edge - timedelta(microseconds=1)))
    write_events(events)
    rollup_pending(now=END)

    periods = [
        (BASE + timedelta(minutes=59), BASE + timedelta(hours=2, minutes=14)),
        (BASE + timedelta(minutes=59, seconds=59), BASE + timedelta(hours=2, minutes=13)),
        (BASE + timedelta(hours=1), BASE + timedelta(hours=2, minutes=12, seconds=59)),
        (BASE + timedelta(hours=1, minutes=1), BASE + timedelta(hours=2)),
        (BASE + timedelta(minutes=1), BASE + timedelta(hours=3, seconds=1)),
    ]
    got = [
        stage_totals(release="atlas-2", stage="research_preview", since=s, until=u).requests
        for s, u in periods
    ]
    raw = [
        raw_totals(release="atlas-2", stage="research_preview", since=s, until=u).requests
        for s, u in periods
    ]
    # Bounds round down to the minute. [0:59, 2:14) holds all but 0:58:59 and 2:14:00;
    # [0:59, 2:13) loses the four from 2:13:00; [1:00, 2:12) holds 1:00:00 to 1:01:00
    # and 2:11:59; [1:01, 2:00) only 1:01:00.
    assert (got, raw) == ([14, 11, 5, 1, 16], [14, 11, 5, 1, 16])


def test_rollup_window_run_twice_gives_identical_rows(db):
    write_events(_random_events(1500))
    start, end = BASE - timedelta(minutes=45), END

    first_written = rollup_window(start, end)
    first = _rows()
    second_written = rollup_window(start, end)

    assert (_rows(), second_written) == (first, first_written)
    assert first_written == len(first)


def test_rollup_pending_run_twice_gives_identical_rows(db):
    write_events(_random_events(1500))

    rollup_pending(now=END)
    first = _rows()
    again = rollup_pending(now=END)

    assert _rows() == first
    assert (again.events_seen, again.skipped) == (0, False)
    _assert_totals_match_raw()


def test_rollup_pending_late_event_with_higher_id_is_counted(db):
    write_events(_random_events(500))
    rollup_pending(now=END)
    period = {"release": "atlas-2", "stage": "commercial", "since": BASE, "until": END}
    before = stage_totals(**period)

    # Buffered while the database was down: an old created_at, written after the run.
    late = BASE + timedelta(hours=1, minutes=7, seconds=3)
    write_events([_event(late, stage="commercial", org="org_acme", tier="verified_commercial")])
    report = rollup_pending(now=END + timedelta(minutes=1))

    after = stage_totals(**period)
    assert (report.events_seen, after.requests, after.allowed) == (
        1,
        before.requests + 1,
        before.allowed + 1,
    )
    assert after == raw_totals(**period)
    assert rolled_up_to() == END + timedelta(minutes=1)


def test_rollup_pending_out_of_order_commit_within_lateness_is_counted(db):
    now = BASE + timedelta(hours=2)
    make = []
    for i in range(1, 11):
        values = _event(now - timedelta(seconds=30 - i))._asdict()
        values.update(created_at=datetime.fromtimestamp(values["created_at"], UTC), verifications=0)
        make.append(UsageEvent(id=i, **values))
    UsageEvent.objects.bulk_create([e for e in make if e.id not in (5, 6)])
    rollup_pending(now=now)

    # Ids 5 and 6 were taken by a writer that commits only now, below the cursor.
    UsageEvent.objects.bulk_create([e for e in make if e.id in (5, 6)])
    rollup_pending(now=now + timedelta(minutes=2))

    period = {"release": "atlas-2", "stage": "research_preview", "since": BASE, "until": now}
    assert (stage_totals(**period).requests, RollupCursor.objects.get().last_event_id) == (10, 10)


def test_totals_counting_rules_denied_errors_flagged(db):
    at = BASE + timedelta(minutes=3)
    write_events(
        [
            _event(at, org="org_northwind", tier="research_partner"),
            _event(at, org="org_acme", tier="verified_commercial", error="upstream_error"),
            _event(at, org="org_acme", tier="verified_commercial", flagged=True),
            # Denied: counted as requests and denied, never as errors, flagged or tokens,
            # and a denied org is not one that used the stage.
            _event(
                at,
                org="org_tartu",
                tier="credentialed_academic",
                decision="deny",
                error="upstream_error",
                flagged=True,
                prompt_tokens=1000,
            ),
            _event(at, org="", tier="public"),  # allowed, but no org to count
            _event(at, stage="commercial", org="org_publicdev", tier="public"),  # other stage
        ]
    )
    rollup_pending(now=END)
    period = {"release": "atlas-2", "stage": "research_preview", "since": BASE, "until": END}

    totals = stage_totals(**period)

    assert totals == Totals(
        since=BASE,
        until=END,
        requests=5,
        allowed=4,
        denied=1,
        errors=1,
        flagged=1,
        prompt_tokens=40,
        completion_tokens=80,
        orgs_by_tier={
            "research_partner": frozenset({"org_northwind"}),
            "verified_commercial": frozenset({"org_acme"}),
        },
    )
    assert (totals.distinct_orgs, totals.rolled_up_to) == (2, END)
    assert totals == raw_totals(**period)
    row = UsageRollup.objects.get(
        bucket_seconds=60, stage="research_preview", org="org_acme", bucket_start=at
    )
    assert (row.requests, row.errors, row.flagged, row.latency_ms_sum) == (2, 1, 1, 25.0)


def test_flags_per_category_counting_rules(db):
    at = BASE + timedelta(minutes=3)
    later = BASE + timedelta(hours=1, minutes=30)
    write_events(
        [
            _event(at, flags="cyber"),  # flagged by screening: flagged too
            _event(at, flags="cyber,weapons"),  # two categories: counted in each
            _event(later, flags="cyber", org="org_acme", tier="verified_commercial"),
            _event(at, flagged=True),  # the upstream's content filter: no category
            # blocked: denied in its category, never flagged
            _event(at, decision="deny", reason="content_blocked", flags="weapons"),
            _event(at, stage="commercial", flags="cyber"),  # another stage
        ]
    )
    rollup_pending(now=END)
    period = {"release": "atlas-2", "stage": "research_preview", "since": BASE, "until": END}

    totals = stage_totals(**period)

    assert (totals.allowed, totals.flagged, totals.denied) == (4, 4, 1)
    assert (totals.flagged_by_category, totals.denied_by_category) == (
        {"cyber": 3, "weapons": 1},
        {"weapons": 1},
    )
    assert totals == raw_totals(**period)
    half = stage_totals(**{**period, "until": BASE + timedelta(minutes=30)})
    assert half.flagged_by_category == {"cyber": 2, "weapons": 1}
    rows = UsageFlagRollup.objects.filter(bucket_seconds=3600, stage="research_preview")
    assert sorted(
        rows.values_list("bucket_start", "org", "reason", "category", "flagged", "denied")
    ) == [
        (BASE, "org_northwind", "content_blocked", "weapons", 0, 1),
        (BASE, "org_northwind", "ok", "cyber", 2, 0),
        (BASE, "org_northwind", "ok", "weapons", 1, 0),
        (BASE + timedelta(hours=1), "org_acme", "ok", "cyber", 1, 0),
    ]


def test_flag_rows_are_replaced_when_their_events_are_gone(db):
    write_events([_event(BASE + timedelta(minutes=m), flags="cyber") for m in (1, 2, 70)])
    rollup_pending(now=END)
    UsageEvent.objects.filter(created_at__lt=BASE + timedelta(hours=1)).delete()

    rollup_window(BASE, END)

    rows = UsageFlagRollup.objects.order_by("bucket_seconds", "bucket_start")
    assert list(rows.values_list("bucket_seconds", "bucket_start", "flagged")) == [
        (60, BASE + timedelta(minutes=70), 1),
        (3600, BASE + timedelta(hours=1), 1),
    ]


def test_window_totals_last_minutes_from_minute_rows(db):
    now = BASE + timedelta(hours=1, minutes=2, seconds=30)
    minutes_ago = [0, 1, 9, 10, 11, 65]  # before the minute of now
    write_events(
        [_event(now.replace(second=5) - timedelta(minutes=m)) for m in minutes_ago]
        + [_event(now.replace(second=0))]  # in the current minute: not yet in a window
    )
    rollup_pending(now=now + timedelta(minutes=1))

    totals = window_totals(release="atlas-2", stage="research_preview", minutes=10, now=now)

    since, until = BASE + timedelta(minutes=52), BASE + timedelta(hours=1, minutes=2)
    assert (totals.since, totals.until, totals.requests) == (since, until, 3)
    assert totals == raw_totals(
        release="atlas-2", stage="research_preview", since=since, until=until
    )


def test_totals_empty_database_are_zero(db):
    totals = stage_totals(release="atlas-2", stage="research_preview", since=BASE, until=END)

    assert totals == Totals(since=BASE, until=END)
    assert (totals.requests, totals.distinct_orgs, totals.rolled_up_to, rolled_up_to()) == (
        0,
        0,
        None,
        None,
    )
    report = rollup_pending(now=END)
    assert report == RollupReport(
        events_seen=0, buckets_written=0, chunks=1, rolled_up_to=END, skipped=False
    )


def test_rollup_pending_small_chunks_equal_one_big_chunk(db):
    write_events(_random_events(2000, hours=7))
    now = BASE + timedelta(hours=7, minutes=1)

    small = rollup_pending(now=now, chunk=timedelta(minutes=20))
    chunked = _rows()
    UsageRollup.objects.all().delete()
    RollupCursor.objects.all().delete()
    big = rollup_pending(now=now, chunk=timedelta(days=1))

    assert _rows() == chunked
    # The events span [7:59, 16:01) (the earliest a microsecond before 8:00): cut by the
    # epoch's 20-minute grid, one minute, 24 pieces and one minute; or one piece.
    earliest = UsageEvent.objects.order_by("created_at").first().created_at
    assert (earliest, small.chunks, big.chunks, small.rolled_up_to, big.rolled_up_to) == (
        BASE - timedelta(hours=1, microseconds=1),
        26,
        1,
        now,
        now,
    )
    assert small.events_seen == big.events_seen == 2000


def test_rollup_pending_after_interrupted_run_gives_same_totals(db):
    write_events(_random_events(1500))
    # What a run killed in its second chunk leaves: the first chunk committed (rows and
    # rolled_up_to), the cursor's event id not moved.
    rollup_window(BASE - timedelta(minutes=30), BASE + timedelta(minutes=30))
    RollupCursor.objects.create(name="usage", rolled_up_to=BASE + timedelta(minutes=30))

    report = rollup_pending(now=END, chunk=timedelta(hours=1))
    resumed = _rows()
    UsageRollup.objects.all().delete()
    RollupCursor.objects.all().delete()
    rollup_pending(now=END, chunk=timedelta(hours=1))

    assert (resumed, report.events_seen) == (_rows(), 1500)
    _assert_totals_match_raw()


def test_rollup_window_events_gone_deletes_their_buckets(db):
    write_events(_random_events(1000))
    rollup_pending(now=END)
    # Retention removes the first hour's commercial events.
    UsageEvent.objects.filter(stage="commercial", created_at__lt=BASE + timedelta(hours=1)).delete()

    rollup_window(BASE - timedelta(hours=2), END)

    fresh = _rows()
    UsageRollup.objects.all().delete()
    rollup_window(BASE - timedelta(hours=2), END)
    assert fresh == _rows()
    gone = UsageRollup.objects.filter(
        stage="commercial", bucket_start__lt=BASE + timedelta(hours=1)
    )
    assert gone.count() == 0
    _assert_totals_match_raw()


def test_hour_rows_equal_the_sum_of_their_minutes(db):
    write_events(_random_events(1000))
    rollup_pending(now=END)
    minutes: dict[tuple, list[int]] = {}
    for row in UsageRollup.objects.filter(bucket_seconds=60).values_list(*ROW_COLUMNS):
        hour = row[1].replace(minute=0)
        sums = minutes.setdefault((hour, *row[2:COUNTED]), [0] * 8)
        for i, value in enumerate(row[COUNTED:]):
            sums[i] += value

    hours = {
        row[1:COUNTED]: list(row[COUNTED:])
        for row in UsageRollup.objects.filter(bucket_seconds=3600).values_list(*ROW_COLUMNS)
    }

    assert hours == minutes


def test_flag_hour_rows_equal_the_sum_of_their_minutes(db):
    write_events(_random_events(1000))
    rollup_pending(now=END)
    minutes: dict[tuple, list[int]] = {}
    for row in UsageFlagRollup.objects.filter(bucket_seconds=60).values_list(*FLAG_ROW_COLUMNS):
        sums = minutes.setdefault((row[1].replace(minute=0), *row[2:-2]), [0, 0])
        sums[0] += row[-2]
        sums[1] += row[-1]

    hours = {
        row[1:-2]: list(row[-2:])
        for row in UsageFlagRollup.objects.filter(bucket_seconds=3600).values_list(
            *FLAG_ROW_COLUMNS
        )
    }

    assert hours == minutes
    assert len(hours) > 50


@pytest.mark.skipif(connection.vendor != "postgresql", reason="SQLite serialises its writers")
def test_rollup_pending_another_run_holding_the_lock_skips(db):
    write_events(_random_events(100))
    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s)", [ADVISORY_LOCK_KEY])
        report = rollup_pending(now=END)
    finally:
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [ADVISORY_LOCK_KEY])
        other.close()

    assert (report, _rows(), rolled_up_to()) == (
        RollupReport(events_seen=100, buckets_written=0, chunks=0, rolled_up_to=None, skipped=True),
        [],
        None,
    )
    assert rollup_pending(now=END).skipped is False


def test_rollups_keep_refusals_per_reason_in_each_bucket(db):
    first, second = BASE + timedelta(minutes=3), BASE + timedelta(minutes=40, seconds=5)
    denied = {"decision": "deny", "prompt_tokens": 0, "completion_tokens": 0}
    write_events(
        [
            _event(first),
            _event(first + timedelta(seconds=20)),
            _event(first, reason="rate_limited", **denied),
            _event(first + timedelta(seconds=59), reason="rate_limited", **denied),
            _event(first, reason="quota_exceeded", **denied),
            _event(second, reason="rate_limited", **denied),
            _event(second),
        ]
    )
    rollup_pending(now=END)

    rows = UsageRollup.objects.order_by("bucket_seconds", "bucket_start", "reason")
    assert list(rows.values_list("bucket_seconds", "bucket_start", "reason", "requests")) == [
        (60, first, "ok", 2),
        (60, first, "quota_exceeded", 1),
        (60, first, "rate_limited", 2),
        (60, second.replace(second=0), "ok", 1),
        (60, second.replace(second=0), "rate_limited", 1),
        (3600, BASE, "ok", 3),
        (3600, BASE, "quota_exceeded", 1),
        (3600, BASE, "rate_limited", 3),
    ]
    hour = UsageRollup.objects.filter(bucket_seconds=3600, reason="rate_limited").get()
    assert (hour.allowed, hour.denied, hour.prompt_tokens) == (0, 3, 0)
    period = {"release": "atlas-2", "stage": "research_preview", "since": BASE, "until": END}
    totals = stage_totals(**period)
    assert (totals.requests, totals.allowed, totals.denied) == (7, 3, 4)
    assert totals == raw_totals(**period)


def test_rollup_replaces_rows_from_before_reasons_without_double_counting(db):
    # Rows as migration 0005 leaves them: reason "" holding every reason of the bucket.
    write_events(_random_events(1500))
    rollup_pending(now=END)
    fresh = _rows()
    merged: dict[tuple, list] = {}
    for row in UsageRollup.objects.values_list(*ROW_COLUMNS):
        sums = merged.setdefault(row[:6], [0] * 8)
        for i, value in enumerate(row[COUNTED:]):
            sums[i] += value
    UsageRollup.objects.all().delete()
    UsageRollup.objects.bulk_create(
        UsageRollup(
            **dict(zip(ROW_COLUMNS, (*group, "", "", *sums), strict=True))  # reason, key ""
        )
        for group, sums in merged.items()
    )
    assert set(UsageRollup.objects.values_list("reason", flat=True)) == {""}
    _assert_totals_match_raw()  # a legacy row is still its whole bucket

    # The next rollup of part of the range, cutting hours: its "" minute rows are
    # replaced, and the hours it touches are summed again from old and new minutes.
    since, until = BASE + timedelta(hours=1, minutes=20), BASE + timedelta(hours=2, minutes=10)
    rollup_window(since, until)
    _assert_totals_match_raw()
    minutes = UsageRollup.objects.filter(bucket_seconds=60)
    touched = minutes.filter(bucket_start__gte=since, bucket_start__lt=until)
    assert (touched.filter(reason="").exists(), touched.exists()) == (False, True)
    assert minutes.filter(bucket_start__lt=since, reason="").exists()
    for hour in (BASE + timedelta(hours=1), BASE + timedelta(hours=2)):
        in_hour = minutes.filter(bucket_start__gte=hour, bucket_start__lt=hour + timedelta(hours=1))
        hour_rows = UsageRollup.objects.filter(bucket_seconds=3600, bucket_start=hour)
        assert hour_rows.aggregate(n=Sum("requests")) == in_hour.aggregate(n=Sum("requests"))

    # The whole range: exactly the rows a first rollup writes.
    rollup_window(BASE - timedelta(hours=2), END)
    assert _rows() == fresh
    _assert_totals_match_raw()


def test_rollups_keep_requests_per_key_in_each_bucket(db):
    first, second = BASE + timedelta(minutes=7), BASE + timedelta(minutes=31, seconds=30)
    denied = {"decision": "deny", "reason": "rate_limited", "prompt_tokens": 0}
    write_events(
        [
            _event(first, key="key_batch"),
            _event(first + timedelta(seconds=30), key="key_batch"),
            _event(first, key="key_ci"),
            _event(first, key="key_ci", completion_tokens=0, **denied),
            _event(first, key=None, decision="deny", reason="invalid_key", prompt_tokens=0),
            _event(second, key="key_batch"),
            _event(second, key="key_ci", org="org_acme", tier="verified_commercial"),
        ]
    )
    rollup_pending(now=END)

    rows = UsageRollup.objects.order_by("bucket_seconds", "bucket_start", "org", "key", "reason")
    assert list(
        rows.values_list("bucket_seconds", "bucket_start", "org", "key", "reason", "requests")
    ) == [
        (60, first, "org_northwind", "", "invalid_key", 1),
        (60, first, "org_northwind", "key_batch", "ok", 2),
        (60, first, "org_northwind", "key_ci", "ok", 1),
        (60, first, "org_northwind", "key_ci", "rate_limited", 1),
        (60, second.replace(second=0), "org_acme", "key_ci", "ok", 1),
        (60, second.replace(second=0), "org_northwind", "key_batch", "ok", 1),
        (3600, BASE, "org_acme", "key_ci", "ok", 1),
        (3600, BASE, "org_northwind", "", "invalid_key", 1),
        (3600, BASE, "org_northwind", "key_batch", "ok", 3),
        (3600, BASE, "org_northwind", "key_ci", "ok", 1),
        (3600, BASE, "org_northwind", "key_ci", "rate_limited", 1),
    ]
    batch = UsageRollup.objects.get(bucket_seconds=3600, key="key_batch")
    assert (batch.allowed, batch.prompt_tokens, batch.completion_tokens) == (3, 30, 60)
    # Readers that do not show keys sum over them: the totals are the raw ones.
    period = {"release": "atlas-2", "stage": "research_preview", "since": BASE, "until": END}
    totals = stage_totals(**period)
    assert (totals.requests, totals.allowed, totals.denied) == (7, 5, 2)
    assert totals.orgs_by_tier == {
        "research_partner": frozenset({"org_northwind"}),
        "verified_commercial": frozenset({"org_acme"}),
    }
    assert totals == raw_totals(**period)


def test_random_events_spread_over_keys_keep_totals_equal_to_raw(db):
    write_events(_random_events(2000))
    rollup_pending(now=END)
    keys = set(UsageRollup.objects.values_list("key", flat=True))
    assert {"", "key_northwind_a", "key_northwind_b", "key_acme_a"} <= keys
    _assert_totals_match_raw()


def test_rollup_replaces_rows_from_before_keys_without_double_counting(db):
    # Rows as migration 0006 leaves them: key "" holding every key of the bucket (and
    # reason kept). Keyless events exist too, so some "" rows are overwritten, not gone.
    write_events(_random_events(1500))
    rollup_pending(now=END)
    fresh = _rows()
    merged: dict[tuple, list] = {}
    for row in UsageRollup.objects.values_list(*ROW_COLUMNS):
        sums = merged.setdefault(row[: COUNTED - 1], [0] * 8)
        for i, value in enumerate(row[COUNTED:]):
            sums[i] += value
    UsageRollup.objects.all().delete()
    UsageRollup.objects.bulk_create(
        UsageRollup(**dict(zip(ROW_COLUMNS, (*group, "", *sums), strict=True)))
        for group, sums in merged.items()
    )
    assert set(UsageRollup.objects.values_list("key", flat=True)) == {""}
    _assert_totals_match_raw()  # a legacy row is still its whole bucket

    since, until = BASE + timedelta(hours=1, minutes=20), BASE + timedelta(hours=2, minutes=10)
    rollup_window(since, until)
    _assert_totals_match_raw()
    minutes = UsageRollup.objects.filter(bucket_seconds=60)
    touched = minutes.filter(bucket_start__gte=since, bucket_start__lt=until)
    assert touched.exclude(key="").exists()
    for hour in (BASE + timedelta(hours=1), BASE + timedelta(hours=2)):
        in_hour = minutes.filter(bucket_start__gte=hour, bucket_start__lt=hour + timedelta(hours=1))
        hour_rows = UsageRollup.objects.filter(bucket_seconds=3600, bucket_start=hour)
        assert hour_rows.aggregate(n=Sum("requests")) == in_hour.aggregate(n=Sum("requests"))

    rollup_window(BASE - timedelta(hours=2), END)
    assert _rows() == fresh
    _assert_totals_match_raw()
