"""Usage over time, for charts: the hour rollups of one release, bucket by bucket.

Reads ``UsageRollup`` hour rows only (never raw events): one query, summed in the
database by (hour, stage, tier, reason), so its cost grows with the span and the
number of tiers and reasons, not with the traffic or the number of organizations.
The current hour's row is partial (the rollup rewrites it every minute); callers show
it as it is. ``regroup`` sums over reasons; ``refusals_by_reason`` splits the refused
requests of the same rows by reason, so a page gets both from the one query.
``flags_per_bucket`` reads one screening category's admitted flags the same way, from
``UsageFlagRollup``'s hour rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.db.models import Sum

from monitoring.models import UsageFlagRollup, UsageRollup
from monitoring.rollups import COUNTERS

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Bucket:
    """Usage of one release in one time bucket and tier (and stage and decision reason,
    unless merged). ``reason`` is the rollups' (``ok`` for admitted requests, "" for
    rows rolled up before reasons were kept, or once merged)."""

    start: datetime
    stage: str
    tier: str
    reason: str = ""
    requests: int = 0
    allowed: int = 0
    denied: int = 0
    errors: int = 0
    flagged: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _floor(moment: datetime, step: timedelta) -> datetime:
    moment = moment.astimezone(UTC)
    return moment - (moment - _EPOCH) % step


def hourly_usage(*, release: str, since: datetime, until: datetime) -> list[Bucket]:
    """The hour buckets of ``release`` starting in [since, until) (``since`` rounded
    down to the hour), one per (hour, stage, tier, reason) with traffic, oldest first.
    One query over at most (hours x stages x tiers x reasons) grouped rows."""
    if since.tzinfo is None or until.tzinfo is None:
        raise ValueError("hourly_usage needs timezone-aware datetimes")
    rows = (
        UsageRollup.objects.filter(
            release=release,
            bucket_seconds=UsageRollup.HOUR,
            bucket_start__gte=_floor(since, HOUR),
            bucket_start__lt=until,
        )
        .order_by()
        .values("bucket_start", "stage", "tier", "reason")
        .annotate(**{f"n_{name}": Sum(name) for name in COUNTERS})
        .order_by("bucket_start", "stage", "tier", "reason")
    )
    return [
        Bucket(
            start=row["bucket_start"].astimezone(UTC),
            stage=row["stage"],
            tier=row["tier"],
            reason=row["reason"],
            **{name: int(row[f"n_{name}"] or 0) for name in COUNTERS},
        )
        for row in rows
    ]


def regroup(
    buckets: Iterable[Bucket], *, step: timedelta = HOUR, stage: str | None = None
) -> dict[datetime, dict[str, Bucket]]:
    """Buckets merged into ``step``-long buckets (a whole number of hours, aligned to
    the epoch) and per tier, across stages and reasons or for ``stage`` only: {start:
    {tier: Bucket}}, oldest first."""
    if step < HOUR or step % HOUR:
        raise ValueError("step must be a whole number of hours")
    merged: dict[datetime, dict[str, dict[str, int]]] = {}
    for bucket in buckets:
        if stage is not None and bucket.stage != stage:
            continue
        sums = merged.setdefault(_floor(bucket.start, step), {}).setdefault(
            bucket.tier, dict.fromkeys(COUNTERS, 0)
        )
        for name in COUNTERS:
            sums[name] += getattr(bucket, name)
    return {
        start: {
            tier: Bucket(start=start, stage=stage or "", tier=tier, **sums)
            for tier, sums in sorted(tiers.items())
        }
        for start, tiers in sorted(merged.items())
    }


def totals_per_bucket(grouped: dict[datetime, dict[str, Bucket]]) -> list[Bucket]:
    """One bucket per time step, summed over tiers, oldest first."""
    result = []
    for start, tiers in grouped.items():
        sums = dict.fromkeys(COUNTERS, 0)
        for bucket in tiers.values():
            for name in COUNTERS:
                sums[name] += getattr(bucket, name)
        result.append(Bucket(start=start, stage="", tier="", **sums))
    return result


def refusals_by_reason(
    buckets: Iterable[Bucket], *, step: timedelta = HOUR, stage: str | None = None
) -> dict[datetime, Counter[str]]:
    """Refused requests per ``step``-long bucket (as ``regroup``) and reason, across
    stages or for ``stage`` only: {start: Counter({reason: refused})}, oldest first,
    only buckets with a refusal. Reason "" is refusals rolled up before reasons were
    kept. Reads nothing: it folds ``hourly_usage`` rows."""
    if step < HOUR or step % HOUR:
        raise ValueError("step must be a whole number of hours")
    merged: dict[datetime, Counter[str]] = {}
    for bucket in buckets:
        if bucket.denied and (stage is None or bucket.stage == stage):
            merged.setdefault(_floor(bucket.start, step), Counter())[bucket.reason] += bucket.denied
    return dict(sorted(merged.items()))


def flags_per_bucket(
    *, release: str, stage: str, category: str, since: datetime, until: datetime, step=HOUR
) -> dict[datetime, int]:
    """Admitted requests of ``release`` in ``stage`` flagged in ``category``, per
    ``step``-long bucket (as ``regroup``) starting in [since, until): {start: flagged},
    oldest first, only buckets with a flag. One query over the hour rows."""
    if since.tzinfo is None or until.tzinfo is None:
        raise ValueError("flags_per_bucket needs timezone-aware datetimes")
    if step < HOUR or step % HOUR:
        raise ValueError("step must be a whole number of hours")
    rows = (
        UsageFlagRollup.objects.filter(
            release=release,
            stage=stage,
            category=category,
            bucket_seconds=UsageRollup.HOUR,
            bucket_start__gte=_floor(since, HOUR),
            bucket_start__lt=until,
        )
        .order_by()
        .values_list("bucket_start")
        .annotate(n=Sum("flagged"))
    )
    merged: dict[datetime, int] = {}
    for start, flagged in rows:
        if flagged:
            bucket = _floor(start, step)
            merged[bucket] = merged.get(bucket, 0) + int(flagged)
    return dict(sorted(merged.items()))
