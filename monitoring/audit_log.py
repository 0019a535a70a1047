"""Reading the audit log: search, pages, each row's before and after, exports, and the
chain's verification status.

Search filters are cheap on any size of log: ``action`` (exact, or a prefix ending in
a dot: ``key.``), ``object_id`` (indexed), ``actor`` and ``object_type`` (exact) narrow
a scan that walks ``seq`` backwards and stops at a page. Free text over the rows' data
(case-insensitive, on the JSON as text) is not indexed, so it searches only the newest
``TEXT_SEARCH_WINDOW`` rows: a bound on what one request may scan.

Pages are keyset pages on ``seq`` (``before`` / ``after``), so a page costs the same
wherever it is in the log and no page counts the whole table.

``verify_chain`` reads every row, so pages never run it: they show the last
verification's result and when it ran (kept in the cache, shared by every worker),
and a rollout admin may run it again (``run_verification``). It also checks the last
published checkpoint (``monitoring.checkpoints``), which catches a cut tail.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from django.core.cache import cache
from django.db.models import QuerySet
from django.utils import timezone

from monitoring.audit import verify_chain
from monitoring.checkpoints import last_published, verify_against
from monitoring.models import AuditEvent

PAGE_SIZE = 50
TEXT_SEARCH_WINDOW = 100_000
EXPORT_MAX_ROWS = 100_000
VERIFICATION_CACHE_KEY = "monitoring:audit:last_verification"
VERIFICATION_TTL = 30 * 24 * 3600


@dataclass(frozen=True)
class AuditFilters:
    actor: str = ""
    action: str = ""  # exact, or a prefix when it ends with "."
    object_type: str = ""
    object_id: str = ""
    text: str = ""  # free text over the data, in the newest TEXT_SEARCH_WINDOW rows


def search(filters: AuditFilters) -> QuerySet[AuditEvent]:
    """The rows ``filters`` select, newest first (not yet bounded: page or slice it)."""
    rows = AuditEvent.objects.all()
    if filters.actor:
        rows = rows.filter(actor=filters.actor)
    if filters.action:
        if filters.action.endswith("."):
            rows = rows.filter(action__startswith=filters.action)
        else:
            rows = rows.filter(action=filters.action)
    if filters.object_type:
        rows = rows.filter(object_type=filters.object_type)
    if filters.object_id:
        rows = rows.filter(object_id=filters.object_id)
    if filters.text:
        tail = AuditEvent.objects.order_by("-seq").values_list("seq", flat=True).first() or 0
        rows = rows.filter(seq__gt=tail - TEXT_SEARCH_WINDOW, data__icontains=filters.text)
    return rows.order_by("-seq")


@dataclass(frozen=True)
class Page:
    rows: list[AuditEvent]  # newest first
    newer: int | None  # pass as ``after`` for the page of newer rows
    older: int | None  # pass as ``before`` for the page of older rows


def page(
    rows: QuerySet[AuditEvent],
    *,
    before: int | None = None,
    after: int | None = None,
    size: int = PAGE_SIZE,
) -> Page:
    """One keyset page of ``rows`` (newest first): the newest rows below ``before``, or
    the oldest rows above ``after``, or the newest rows. One query."""
    if after is not None:
        found = list(rows.filter(seq__gt=after).order_by("seq")[: size + 1])
        more_newer = len(found) > size
        found = list(reversed(found[:size]))
        return Page(
            rows=found,
            newer=found[0].seq if found and more_newer else None,
            older=found[-1].seq if found else after + 1,
        )
    if before is not None:
        rows = rows.filter(seq__lt=before)
    found = list(rows[: size + 1])
    more_older = len(found) > size
    found = found[:size]
    return Page(
        rows=found,
        newer=found[0].seq if found and before is not None else None,
        older=found[-1].seq if found and more_older else None,
    )


class Change(NamedTuple):
    field: str
    before: str
    after: str


def _text(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def describe(data: dict[str, Any]) -> tuple[list[Change], list[tuple[str, str]]]:
    """A row's data as (changes with their before and after, the other fields).

    The services write a change in one of these shapes: ``changes: {field: {from, to}}``
    (organizations, incidents), ``from_<x>`` / ``to_<x>`` pairs (release transitions),
    ``from`` / ``to`` (effective tiers), ``before`` / ``after`` objects. Anything else
    is shown as a field and its value."""
    if not isinstance(data, dict):
        return [], [("data", _text(data))]
    changes: list[Change] = []
    used: set[str] = set()
    nested = data.get("changes")
    if isinstance(nested, dict) and all(
        isinstance(change, dict) and {"from", "to"} <= change.keys() for change in nested.values()
    ):
        changes += [
            Change(str(name), _text(change["from"]), _text(change["to"]))
            for name, change in nested.items()
        ]
        used.add("changes")
    for key in data:
        if key.startswith("from_") and f"to_{key[5:]}" in data:
            changes.append(Change(key[5:], _text(data[key]), _text(data[f"to_{key[5:]}"])))
            used |= {key, f"to_{key[5:]}"}
    if "from" in data and "to" in data:
        changes.append(Change("value", _text(data["from"]), _text(data["to"])))
        used |= {"from", "to"}
    before, after = data.get("before"), data.get("after")
    if isinstance(before, dict) and isinstance(after, dict):
        for name in sorted(before.keys() | after.keys()):
            if before.get(name) != after.get(name):
                changes.append(Change(name, _text(before.get(name)), _text(after.get(name))))
        used |= {"before", "after"}
    fields = [(str(key), _text(value)) for key, value in sorted(data.items()) if key not in used]
    return changes, fields


EXPORT_FIELDS = ("seq", "created_at", "actor", "action", "object_type", "object_id", "data", "hash")


def export_rows(rows: QuerySet[AuditEvent], *, limit: int = EXPORT_MAX_ROWS) -> Iterator[dict]:
    """The rows as plain dicts, newest first, at most ``limit``, read in chunks."""
    for event in rows[:limit].iterator(chunk_size=2000):
        yield {
            "seq": event.seq,
            "created_at": event.created_at.isoformat(),
            "actor": event.actor,
            "action": event.action,
            "object_type": event.object_type,
            "object_id": event.object_id,
            "data": event.data,
            "hash": event.hash,
        }


# --- the chain's verification status -----------------------------------------------------


@dataclass(frozen=True)
class Verification:
    at: datetime
    checked: int
    tail_seq: int  # the chain's last row when the verification began
    break_seq: int | None
    break_reason: str
    checkpoint: str  # "seq:hash" of the published checkpoint it also checked, or ""

    @property
    def intact(self) -> bool:
        return self.break_seq is None


def last_verification() -> Verification | None:
    """The result of the last ``run_verification`` (any worker's), or None."""
    stored = cache.get(VERIFICATION_CACHE_KEY)
    if not isinstance(stored, dict):
        return None
    try:
        return Verification(**{**stored, "at": datetime.fromisoformat(stored["at"])})
    except (TypeError, ValueError, KeyError):
        return None


def run_verification() -> Verification:
    """Walk the whole chain (and the last published checkpoint) now; keep the result."""
    tail = AuditEvent.objects.order_by("-seq").values_list("seq", flat=True).first() or 0
    published = last_published()
    if published is not None:
        checked, broken = verify_against([published[0]])
    else:
        checked, broken = verify_chain()
    result = Verification(
        at=timezone.now(),
        checked=checked,
        tail_seq=tail,
        break_seq=None if broken is None else broken.seq,
        break_reason="" if broken is None else broken.reason,
        checkpoint="" if published is None else str(published[0]),
    )
    cache.set(
        VERIFICATION_CACHE_KEY,
        {**result.__dict__, "at": result.at.isoformat()},
        VERIFICATION_TTL,
    )
    return result
