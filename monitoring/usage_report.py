"""Usage over a chosen period, for the console's usage page: read from the rollups only.

``usage_report`` sums ``UsageRollup`` rows over [since, until) (both rounded down to
the minute) the way ``rollups.stage_totals`` does for a review: hour rows for the
whole hours inside the period, minute rows for the partial hours at its two edges. It
narrows by release, stage, tier and organization (each optional) and returns:

- ``series``: one ``UsageFigures`` per chart bucket (an hour or a day, every bucket of
  the period present, empty ones zero), summed in the database;
- ``groups``: the period's totals per tier or per organization, summed in the database;
- ``total``: the whole period.

Three queries (the series, the groups, the rollups' freshness); what they cost grows
with the span and the number of (release, stage, tier, org) combinations, never with
the number of usage events. Counting rules are the rollups' (``UsageRollup``): errors,
flags and tokens count admitted requests only.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Literal

from django.db.models import F, Sum
from django.db.models.functions import TruncDay, TruncHour

from monitoring.models import UsageRollup
from monitoring.rollups import HOUR, MINUTE, _floor, covering, rolled_up_to

DAY = timedelta(days=1)
GROUPINGS = ("tier", "org")
Grouping = Literal["tier", "org"]


@dataclass(frozen=True)
class UsageFigures:
    """Counters summed over some rollup rows (see ``UsageRollup`` for what each counts)."""

    requests: int = 0
    allowed: int = 0
    denied: int = 0
    errors: int = 0
    flagged: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def error_rate(self) -> float | None:
        """Errors per admitted request; None when nothing was admitted."""
        return self.errors / self.allowed if self.allowed else None

    @property
    def flag_rate(self) -> float | None:
        """Flagged answers per admitted request; None when nothing was admitted."""
        return self.flagged / self.allowed if self.allowed else None

    def __add__(self, other: UsageFigures) -> UsageFigures:
        return UsageFigures(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )


COUNTERS = tuple(f.name for f in fields(UsageFigures))


@dataclass(frozen=True)
class UsageReport:
    since: datetime
    until: datetime
    step: timedelta  # a chart bucket: HOUR or DAY
    group_by: Grouping
    series: list[tuple[datetime, UsageFigures]]
    groups: list[tuple[str, UsageFigures]]  # by requests, most first, then by key
    total: UsageFigures
    rolled_up_to: datetime | None


def chart_step(since: datetime, until: datetime) -> timedelta:
    """Hour buckets up to a week, day buckets beyond (at most a few hundred bars)."""
    return HOUR if until - since <= 7 * DAY else DAY


def _figures(row: dict) -> UsageFigures:
    return UsageFigures(**{name: int(row[f"n_{name}"] or 0) for name in COUNTERS})


def usage_report(
    *,
    since: datetime,
    until: datetime,
    release: str = "",
    stage: str = "",
    tier: str = "",
    org: str = "",
    group_by: Grouping = "tier",
) -> UsageReport:
    """Usage over [since, until) (rounded down to the minute), narrowed to ``release``,
    ``stage``, ``tier`` and ``org`` (an organization's public id) where given; ``org``
    and ``tier`` are the values the rollups hold. Raises ValueError if ``until`` is
    before ``since`` or ``group_by`` is not one of ``GROUPINGS``."""
    if group_by not in GROUPINGS:
        raise ValueError(f"group_by must be one of {GROUPINGS}, not {group_by!r}")
    since, until = _floor(since, MINUTE), _floor(until, MINUTE)
    if until < since:
        raise ValueError(f"until ({until}) is before since ({since})")
    narrow = {
        name: value
        for name, value in (("release", release), ("stage", stage), ("tier", tier), ("org", org))
        if value
    }
    rows = UsageRollup.objects.filter(covering(since, until), **narrow).order_by()
    sums = {f"n_{name}": Sum(name) for name in COUNTERS}

    step = chart_step(since, until)
    trunc = TruncHour if step == HOUR else TruncDay
    by_bucket = {
        _floor(row["k_bucket"], step): _figures(row)
        for row in rows.values(k_bucket=trunc("bucket_start", tzinfo=UTC)).annotate(**sums)
    }
    series = []
    moment = _floor(since, step)
    while moment < until:
        series.append((moment, by_bucket.get(moment, UsageFigures())))
        moment += step

    groups = [
        (row["k_group"], _figures(row)) for row in rows.values(k_group=F(group_by)).annotate(**sums)
    ]
    groups.sort(key=lambda pair: (-pair[1].requests, pair[0]))
    total = sum((figures for _, figures in groups), UsageFigures())
    return UsageReport(
        since=since,
        until=until,
        step=step,
        group_by=group_by,
        series=series,
        groups=groups,
        total=total,
        rolled_up_to=rolled_up_to(),
    )
