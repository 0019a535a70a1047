"""Usage rollups: stage reviews and tripwires read small aggregates, never raw events.

``UsageRollup`` holds one row per (bucket, release, stage, tier, org, reason, key)
for minute and hour buckets, ``reason`` being the decision's reason code (``ok`` when
allowed) and ``key`` the API key's public id ("" without a valid key). Minute rows
are computed from ``UsageEvent`` rows, hour rows from minute rows. Every write is a
*replacing* upsert (``INSERT ... SELECT ... GROUP BY ... ON CONFLICT DO UPDATE SET
col = EXCLUDED.col``): a bucket is recomputed from the truth and overwritten, never
incremented, so running a rollup twice, or re-running one a crash interrupted, gives
the same rows. The bucketing SELECT is built with the ORM
(``TruncMinute``, ``Count``/``Sum`` with ``filter=``), so the same code runs on
PostgreSQL and SQLite (3.24+ for upsert). Events store their tier and reason as small
integer codes (``monitoring.records``) and rollups as words: the SELECT turns the codes
back into words (``CASE``) as it groups, and so does ``raw_totals``.

``rollup_pending`` is the periodic job (run it every minute). It follows a cursor over
event ids, so events written late, e.g. buffered while the database was down, are
found by their id whatever their ``created_at``. Ids do not arrive in commit order,
though: a writer's COPY can commit after a later id's, below a cursor that has
already passed it. Such a batch was recorded within seconds of its commit, so every
run also recomputes the trailing ``lateness`` window before now, which catches it
provided the job runs more often than ``lateness``.

Screening's flags per category go to ``UsageFlagRollup`` (the same key plus the
category) in the same run and transaction. An event's ``flags`` is comma-joined text,
which SQL cannot split the same way on PostgreSQL and SQLite, so the minute rows are
counted in SQL per distinct ``flags`` text (events with flags only, read through a
partial index), split into categories in Python and written whole; hour rows are
summed from minute rows in SQL, as for usage. Both replace the rows of their range.

Reads: ``stage_totals`` (a review's period: hour rows for the whole hours, minute
rows at both edges) and ``window_totals`` (a tripwire's last minutes). Both count
events in whole minutes: bounds are rounded down to the minute, and both sum over
reasons and keys (as every reader must: a bucket has one row per reason and key).
``raw_totals`` computes the same figures from the raw events, for tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import connection, transaction
from django.db.models import (
    Count,
    DateTimeField,
    Exists,
    ExpressionWrapper,
    F,
    Max,
    Min,
    OuterRef,
    Q,
    QuerySet,
    Sum,
)
from django.db.models.functions import TruncHour, TruncMinute
from django.utils import timezone

from monitoring.models import RollupCursor, UsageEvent, UsageFlagRollup, UsageRollup
from monitoring.records import REASONS, TIERS

MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)
CURSOR_NAME = "usage"

# Taken per chunk transaction on PostgreSQL so that two workers never roll up at once:
# b"sgrollup" read as a (positive) 64-bit integer.
ADVISORY_LOCK_KEY = int.from_bytes(b"sgrollup", "big")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_GROUP = ("release", "stage", "tier", "org", "reason", "key")
# The counters a reader sums over rollup rows (reviews, charts, the usage page), and
# the ones a rollup row stores: those and the latency sum.
COUNTERS = (
    "requests",
    "allowed",
    "denied",
    "errors",
    "flagged",
    "prompt_tokens",
    "completion_tokens",
)
_COUNTERS = (*COUNTERS, "latency_ms_sum")
_FLAG_GROUP = (*_GROUP, "category")
_FLAG_COUNTERS = ("flagged", "denied")
_CATEGORY_LENGTH = UsageFlagRollup._meta.get_field("category").max_length


@dataclass(frozen=True)
class Totals:
    """Usage of one release and stage over [since, until), in whole minutes.

    ``errors`` and ``flagged`` count allowed requests only (a denied request reached no
    model); ``flagged`` counts those flagged by anything (screening or the upstream's
    content filter). ``flagged_by_category`` maps each screening category to the allowed
    requests flagged (or routed) in it, ``denied_by_category`` to the refused requests
    carrying it (blocked); categories with no such request are absent, and a request
    flagged in two categories counts in both. ``denied`` counts every request not
    allowed. ``orgs_by_tier`` maps each tier to the organizations with at least one
    allowed request in the period (blank org ids left out). ``rolled_up_to`` is the
    rollups' freshness when the totals were read (None for raw totals, or before any
    rollup); it is not part of the value, so totals from rollups and from raw events
    compare equal when they count the same.
    """

    since: datetime
    until: datetime
    requests: int = 0
    allowed: int = 0
    denied: int = 0
    errors: int = 0
    flagged: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    orgs_by_tier: dict[str, frozenset[str]] = field(default_factory=dict)
    rolled_up_to: datetime | None = field(default=None, compare=False)
    flagged_by_category: dict[str, int] = field(default_factory=dict)
    denied_by_category: dict[str, int] = field(default_factory=dict)

    @property
    def distinct_orgs(self) -> int:
        """Organizations with an allowed request in the period, in any tier."""
        return len(frozenset().union(*self.orgs_by_tier.values()))


@dataclass(frozen=True)
class RollupReport:
    """What one ``rollup_pending`` run did. ``skipped``: it stopped (possibly before its
    first chunk) because another run held the lock or had moved the cursor."""

    events_seen: int
    buckets_written: int
    chunks: int
    rolled_up_to: datetime | None
    skipped: bool = False


# --- Time arithmetic, all in UTC ----------------------------------------------------------


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"naive datetime {moment!r}: rollups need aware datetimes")
    return moment.astimezone(UTC)


def _floor(moment: datetime, step: timedelta) -> datetime:
    moment = _utc(moment)
    return moment - (moment - _EPOCH) % step


def _ceil(moment: datetime, step: timedelta) -> datetime:
    floor = _floor(moment, step)
    return floor if floor == moment else floor + step


# --- Writing rollups ---------------------------------------------------------------------


def _event_counts() -> dict[str, Any]:
    """The counting rules, as aggregates over ``UsageEvent`` rows."""
    allowed = Q(decision="allow")
    return {
        "n_requests": Count("id"),
        "n_allowed": Count("id", filter=allowed),
        "n_denied": Count("id", filter=~allowed),
        "n_errors": Count("id", filter=allowed & ~Q(error="")),
        "n_flagged": Count("id", filter=allowed & Q(flagged=True)),
        "n_prompt_tokens": Sum("prompt_tokens", filter=allowed, default=0),
        "n_completion_tokens": Sum("completion_tokens", filter=allowed, default=0),
        "n_latency_ms_sum": Sum("latency_ms", filter=allowed, default=0.0),
    }


def _rollup_sums(names: tuple[str, ...] = _COUNTERS) -> dict[str, Any]:
    """The same figures summed over ``UsageRollup`` rows (``n_`` names: an annotation may
    not share a model field's name)."""
    return {f"n_{name}": Sum(name) for name in names}


def _group_columns() -> dict[str, F]:
    return {f"k_{name}": F(name) for name in _GROUP}


# The group columns an event holds as codes, as the words a rollup row holds.
_EVENT_WORDS = {"tier": TIERS.words_of("tier"), "reason": REASONS.words_of("reason")}


def _event_group_columns() -> dict[str, Any]:
    return {f"k_{name}": _EVENT_WORDS.get(name, F(name)) for name in _GROUP}


def _upsert(
    buckets: QuerySet,
    bucket_seconds: int,
    *,
    model: type[UsageRollup | UsageFlagRollup] = UsageRollup,
    group: tuple[str, ...] = _GROUP,
    counters: tuple[str, ...] = _COUNTERS,
) -> int:
    """Write the rows of ``buckets`` (columns k_bucket, k_<group>, n_<counter>) as
    ``bucket_seconds`` rows of ``model``, replacing the counters of rows that exist.
    Returns the number of rows written."""
    select, params = buckets.query.sql_with_params()
    quote = connection.ops.quote_name
    key = ["bucket_seconds", "bucket_start", *group]
    outer = [str(int(bucket_seconds)), "s.k_bucket", *(f"s.k_{name}" for name in group)]
    outer += [f"s.n_{name}" for name in counters]
    updates = ", ".join(f"{quote(name)} = EXCLUDED.{quote(name)}" for name in counters)
    # Columns are taken from the subquery by alias, so the order in which the ORM
    # emits them does not matter. "WHERE 1 = 1": SQLite cannot otherwise tell the
    # upsert's ON CONFLICT from a join's ON after INSERT ... SELECT.
    sql = (
        f"INSERT INTO {quote(model._meta.db_table)}"  # noqa: S608 (names are ours)
        f" ({', '.join(quote(name) for name in (*key, *counters))})"
        f" SELECT {', '.join(outer)} FROM ({select}) s WHERE 1 = 1"
        f" ON CONFLICT ({', '.join(quote(name) for name in key)}) DO UPDATE SET {updates}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return max(cursor.rowcount, 0)


def _plus(reference: str, step: timedelta) -> ExpressionWrapper:
    return ExpressionWrapper(OuterRef(reference) + step, output_field=DateTimeField())


def rollup_window(start: datetime, end: datetime) -> int:
    """Recompute the minute buckets in [start, end) (start rounded down, end up, to the
    minute) from the events, then the hour buckets touching them from the minute rows,
    in one transaction. Rows are replaced, never added to, and rows of the range whose
    events are gone are deleted: running it twice gives identical rows.

    Takes no lock: the periodic job is ``rollup_pending``, which serialises runs.
    Returns the number of rollup rows written (minute and hour).
    """
    first_minute, end_minute = _floor(start, MINUTE), _ceil(end, MINUTE)
    if end_minute <= first_minute:
        return 0
    first_hour, end_hour = _floor(first_minute, HOUR), _ceil(end_minute, HOUR)
    written = 0
    with transaction.atomic():
        minutes = UsageRollup.objects.filter(
            bucket_seconds=UsageRollup.MINUTE,
            bucket_start__gte=first_minute,
            bucket_start__lt=end_minute,
        )
        # The constant range bounds the subquery to the window's events whatever plan
        # is chosen (without it, PostgreSQL may hash the whole table for an anti-join).
        events = UsageEvent.objects.filter(
            created_at__gte=first_minute, created_at__lt=end_minute
        ).order_by()
        events_in_bucket = events.annotate(**_event_group_columns()).filter(
            **{f"k_{name}": OuterRef(name) for name in _GROUP},
            created_at__gte=OuterRef("bucket_start"),
            created_at__lt=_plus("bucket_start", MINUTE),
        )
        minutes.filter(~Exists(events_in_bucket)).delete()
        buckets = events.values(
            k_bucket=TruncMinute("created_at", tzinfo=UTC), **_event_group_columns()
        ).annotate(**_event_counts())
        written += _upsert(buckets, UsageRollup.MINUTE)

        # Hours are recomputed whole from their minute rows, including minutes outside
        # [start, end) that earlier runs wrote, so an hour row is always the sum of its
        # minutes.
        hours = UsageRollup.objects.filter(
            bucket_seconds=UsageRollup.HOUR, bucket_start__gte=first_hour, bucket_start__lt=end_hour
        )
        minute_rows = UsageRollup.objects.filter(
            bucket_seconds=UsageRollup.MINUTE,
            bucket_start__gte=first_hour,
            bucket_start__lt=end_hour,
        ).order_by()
        minutes_in_bucket = minute_rows.filter(
            **{name: OuterRef(name) for name in _GROUP},
            bucket_start__gte=OuterRef("bucket_start"),
            bucket_start__lt=_plus("bucket_start", HOUR),
        )
        hours.filter(~Exists(minutes_in_bucket)).delete()
        hour_buckets = minute_rows.values(
            k_bucket=TruncHour("bucket_start", tzinfo=UTC), **_group_columns()
        ).annotate(**_rollup_sums())
        written += _upsert(hour_buckets, UsageRollup.HOUR)
        written += _rollup_flags(events, first_minute, end_minute, first_hour, end_hour)
    return written


def categories(flags: str) -> list[str]:
    """The categories of an event's ``flags`` text (sorted, unique, each cut to the
    rollup's column: the text comes from the proxy and must never stop a rollup)."""
    return sorted({name.strip()[:_CATEGORY_LENGTH] for name in flags.split(",")} - {""})


def _flag_counts(events: QuerySet, **columns: Any) -> dict[tuple, list[int]]:
    """Flagged and denied counts of ``events`` per (``columns``..., category), each
    column a k_<name> expression: counted in SQL per distinct ``flags`` text, split
    into categories here."""
    allowed = Q(decision="allow")
    rows = (
        events.exclude(flags="")
        .values(**columns, k_flags=F("flags"))
        .annotate(n_flagged=Count("id", filter=allowed), n_denied=Count("id", filter=~allowed))
    )
    counts: dict[tuple, list[int]] = {}
    for row in rows:
        group = tuple(row[name] for name in columns)
        for category in categories(row["k_flags"]):
            sums = counts.setdefault((*group, category), [0, 0])
            sums[0] += row["n_flagged"]
            sums[1] += row["n_denied"]
    return counts


def _rollup_flags(
    events: QuerySet,
    first_minute: datetime,
    end_minute: datetime,
    first_hour: datetime,
    end_hour: datetime,
) -> int:
    """Replace the flag rows of the minutes [first_minute, end_minute) with the counts
    of ``events`` (the events of those minutes), then the hour rows of [first_hour,
    end_hour) with the sums of their minute rows. Returns the rows written."""
    UsageFlagRollup.objects.filter(
        bucket_seconds=UsageRollup.MINUTE,
        bucket_start__gte=first_minute,
        bucket_start__lt=end_minute,
    ).delete()
    minute_rows = [
        UsageFlagRollup(
            bucket_seconds=UsageRollup.MINUTE,
            **dict(zip(("bucket_start", *_FLAG_GROUP), key, strict=True)),
            flagged=flagged,
            denied=denied,
        )
        for key, (flagged, denied) in _flag_counts(
            events, k_bucket=TruncMinute("created_at", tzinfo=UTC), **_event_group_columns()
        ).items()
    ]
    UsageFlagRollup.objects.bulk_create(minute_rows, batch_size=500)
    UsageFlagRollup.objects.filter(
        bucket_seconds=UsageRollup.HOUR, bucket_start__gte=first_hour, bucket_start__lt=end_hour
    ).delete()
    hour_buckets = (
        UsageFlagRollup.objects.filter(
            bucket_seconds=UsageRollup.MINUTE,
            bucket_start__gte=first_hour,
            bucket_start__lt=end_hour,
        )
        .order_by()
        .values(
            k_bucket=TruncHour("bucket_start", tzinfo=UTC),
            **{f"k_{name}": F(name) for name in _FLAG_GROUP},
        )
        .annotate(**_rollup_sums(_FLAG_COUNTERS))
    )
    hours = _upsert(
        hour_buckets,
        UsageRollup.HOUR,
        model=UsageFlagRollup,
        group=_FLAG_GROUP,
        counters=_FLAG_COUNTERS,
    )
    return len(minute_rows) + hours


def _chunks(
    ranges: list[tuple[datetime, datetime]], chunk: timedelta
) -> list[tuple[datetime, datetime]]:
    """Merge overlapping ranges, round them out to whole minutes and cut them where the
    epoch-aligned grid of ``chunk`` crosses them (so 6-hour chunks never split an hour,
    and runs cut the same places)."""
    merged: list[list[datetime]] = []
    for start, end in sorted((_floor(s, MINUTE), _ceil(e, MINUTE)) for s, e in ranges):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    pieces = []
    for start, end in merged:
        cut = start
        while cut < end:
            nxt = min(_floor(cut, chunk) + chunk, end)
            pieces.append((cut, nxt))
            cut = nxt
    return pieces


def _cursor_state(*, lock: bool = False) -> tuple[int, datetime | None] | None:
    rows = RollupCursor.objects.filter(name=CURSOR_NAME)
    if lock:
        rows = rows.select_for_update()
    row = rows.values_list("last_event_id", "rolled_up_to").first()
    return None if row is None else (row[0], row[1])


def _try_lock() -> bool:
    """Take the rollup's transaction-scoped lock, without waiting. SQLite needs none:
    its single writer already serialises the chunk transactions."""
    if connection.vendor != "postgresql":
        return True
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [ADVISORY_LOCK_KEY])
        return bool(cursor.fetchone()[0])


def rollup_pending(
    *,
    now: datetime | None = None,
    chunk: timedelta = timedelta(hours=6),
    lateness: timedelta = timedelta(minutes=5),
) -> RollupReport:
    """Roll up the events written since the last run, and the trailing ``lateness``
    window before ``now``.

    The events with ids above the cursor (up to the largest id now) give the time range
    [earliest, latest created_at] to recompute; with [now - lateness, now) it is
    processed in ``chunk``-sized pieces, each ONE transaction that writes its buckets
    and moves the cursor: ``rolled_up_to`` to the chunk's end (at most ``now``) and, in
    the last chunk, ``last_event_id`` to that largest id. A run killed mid-way loses
    only its uncommitted chunk: rows already written are correct replacements, and as
    the cursor's id has not moved, the next run recomputes the same range (and anything
    newer) to the same totals.

    Runs are serialised on PostgreSQL by ``pg_try_advisory_xact_lock`` in each chunk;
    a run that finds it taken, or finds the cursor moved by another run since it
    planned, stops and reports ``skipped``.
    """
    now = _utc(now or timezone.now())
    if chunk < MINUTE or chunk % MINUTE:
        raise ValueError("chunk must be a whole number of minutes")
    planned = _cursor_state()
    last_id = planned[0] if planned else 0
    high = UsageEvent.objects.aggregate(high=Max("id"))["high"] or 0
    new = UsageEvent.objects.filter(id__gt=last_id, id__lte=high).aggregate(
        seen=Count("id"), earliest=Min("created_at"), latest=Max("created_at")
    )
    ranges = [(now - lateness, now)]
    if new["seen"]:
        # The latest event's minute included (ranges are half-open, rounded out).
        ranges.append((new["earliest"], new["latest"] + timedelta(microseconds=1)))
    pieces = _chunks(ranges, chunk)

    written = done = 0
    reached = planned[1] if planned else None
    for number, (start, end) in enumerate(pieces, start=1):
        with transaction.atomic():
            if not _try_lock() or _cursor_state(lock=True) != planned:
                return RollupReport(new["seen"], written, done, reached, skipped=True)
            written += rollup_window(start, end)
            reached = min(end, now)
            values: dict[str, Any] = {"rolled_up_to": reached}
            if number == len(pieces):
                values["last_event_id"] = max(high, last_id)
            RollupCursor.objects.update_or_create(name=CURSOR_NAME, defaults=values)
            planned = _cursor_state()
        done += 1
    return RollupReport(new["seen"], written, done, reached)


def rolled_up_to() -> datetime | None:
    """The time up to which the rollups are complete (None before the first run)."""
    state = _cursor_state()
    return None if state is None else state[1]


# --- Reading totals ----------------------------------------------------------------------


def _totals(
    rows: QuerySet,
    since: datetime,
    until: datetime,
    fresh: datetime | None,
    flags: Iterable[tuple[str, int, int]] = (),
) -> Totals:
    """Fold rows grouped by (k_tier, k_org) with n_<counter> sums, and ``flags``
    (category, flagged, denied), into a ``Totals``."""
    flagged: dict[str, int] = {}
    denied: dict[str, int] = {}
    for category, n_flagged, n_denied in flags:
        if n_flagged:
            flagged[category] = flagged.get(category, 0) + int(n_flagged)
        if n_denied:
            denied[category] = denied.get(category, 0) + int(n_denied)
    sums = dict.fromkeys(COUNTERS, 0)
    orgs: dict[str, set[str]] = {}
    for row in rows:
        for name in COUNTERS:
            sums[name] += int(row[f"n_{name}"] or 0)
        if row["n_allowed"] and row["k_org"]:
            orgs.setdefault(row["k_tier"], set()).add(row["k_org"])
    return Totals(
        since=since,
        until=until,
        **sums,
        orgs_by_tier={tier: frozenset(names) for tier, names in sorted(orgs.items())},
        rolled_up_to=fresh,
        flagged_by_category=dict(sorted(flagged.items())),
        denied_by_category=dict(sorted(denied.items())),
    )


def _rollup_totals(release: str, stage: str, where: Q, since: datetime, until: datetime) -> Totals:
    rows = (
        UsageRollup.objects.filter(where, release=release, stage=stage)
        .order_by()
        .values(k_tier=F("tier"), k_org=F("org"))
        .annotate(**_rollup_sums(COUNTERS))
    )
    flags = (
        UsageFlagRollup.objects.filter(where, release=release, stage=stage)
        .order_by()
        .values_list("category")
        .annotate(n_flagged=Sum("flagged"), n_denied=Sum("denied"))
    )
    return _totals(rows, since, until, rolled_up_to(), flags)


def _minutes(since: datetime, until: datetime) -> Q:
    return Q(bucket_seconds=UsageRollup.MINUTE, bucket_start__gte=since, bucket_start__lt=until)


def _bounds(since: datetime, until: datetime) -> tuple[datetime, datetime]:
    since, until = _floor(since, MINUTE), _floor(until, MINUTE)
    if until < since:
        raise ValueError(f"until ({until}) is before since ({since})")
    return since, until


def covering(since: datetime, until: datetime) -> Q:
    """The rollup rows that count [since, until) (both whole minutes) exactly once:
    hour rows for the whole hours inside it, minute rows for the partial hours at its
    edges."""
    first_hour, end_hour = _ceil(since, HOUR), _floor(until, HOUR)
    if first_hour >= end_hour:
        return _minutes(since, until)
    hours = Q(
        bucket_seconds=UsageRollup.HOUR, bucket_start__gte=first_hour, bucket_start__lt=end_hour
    )
    return hours | _minutes(since, first_hour) | _minutes(end_hour, until)


def stage_totals(*, release: str, stage: str, since: datetime, until: datetime) -> Totals:
    """Usage of ``release`` in ``stage`` over [since, until), both rounded down to the
    minute, from the rollups (``covering``), summed in the database by (tier, org) and
    by flag category. Three queries; the cost grows with the span and the number of
    orgs and categories, not the traffic.
    Events after ``Totals.rolled_up_to`` may not be counted yet."""
    since, until = _bounds(since, until)
    return _rollup_totals(release, stage, covering(since, until), since, until)


def window_totals(
    *, release: str, stage: str, minutes: int, now: datetime, not_before: datetime | None = None
) -> Totals:
    """Usage of ``release`` in ``stage`` over the ``minutes`` whole minutes before the
    minute of ``now`` (the current minute is still filling): a tripwire's window,
    starting no earlier than the first whole minute at or after ``not_before``. Read
    like ``stage_totals``, so a day-long window costs 24 hour rows per org, not 1440
    minute rows."""
    until = _floor(now, MINUTE)
    since = until - minutes * MINUTE
    if not_before is not None:
        since = min(until, max(since, _ceil(_utc(not_before), MINUTE)))
    return stage_totals(release=release, stage=stage, since=since, until=until)


def raw_totals(*, release: str, stage: str, since: datetime, until: datetime) -> Totals:
    """What ``stage_totals`` returns, computed from the raw events (a scan of the
    period's events: for tests and benchmarks, not for reviews)."""
    since, until = _bounds(since, until)
    events = UsageEvent.objects.filter(
        release=release, stage=stage, created_at__gte=since, created_at__lt=until
    ).order_by()
    rows = events.values(k_tier=_EVENT_WORDS["tier"], k_org=F("org")).annotate(**_event_counts())
    flags = [
        (category, flagged, denied)
        for (category,), (flagged, denied) in _flag_counts(events).items()
    ]
    return _totals(rows, since, until, None, flags)
