"""Flagged samples: the human review of what screening flagged, and their retention.

The proxy keeps a redacted excerpt of a request (or answer) that screening flagged,
blocked or routed when the stage's plan says ``retain_flagged`` (``monitoring.usage``
writes it as a ``FlaggedSample``). Here:

- ``review_queue``: the samples a reviewer works through, newest first, filtered;
- ``decide_sample``: a reviewer confirms or dismisses one pending sample, once (a
  conditional UPDATE, so two reviewers deciding the same sample cannot both win), in
  one transaction with its audit row (``flag_confirmed`` / ``flag_dismissed``);
- ``sample_counts``: what a stage review reports of one release and stage over its
  period, and what ``max_confirmed_flag_rate`` judges;
- ``delete_expired_samples``: the periodic retention sweep (``stagegate.schedule``),
  deleting every sample past its ``expires_at``, whatever its status, and auditing how
  many it deleted.

Samples are deleted when they expire, so a review counts only the samples still kept:
a stage's confirmed rate covers the whole stage only if ``retain_flagged.days`` is at
least as long as the stage (each stored review keeps the counts it saw).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from django.db import transaction
from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from monitoring import audit
from monitoring.models import FlaggedSample
from stagegate.errors import Refused
from stagegate.roles import REVIEWER, staff_roles

log = logging.getLogger(__name__)

Status = FlaggedSample.Status
DECISIONS = {Status.CONFIRMED: "flag_confirmed", Status.DISMISSED: "flag_dismissed"}
# The samples of admitted requests: what a confirmed flag rate counts (a request blocked
# before the model was never admitted; an answer blocked was never received).
ADMITTED_ACTIONS = (FlaggedSample.Action.FLAG, FlaggedSample.Action.ROUTE)
NOTE_MAX = 500


@dataclass(frozen=True)
class SampleCounts:
    """The kept samples of one release and stage over a period, by status.

    ``pending``, ``confirmed`` and ``dismissed`` count samples (a request flagged in its
    prompt and in its answer has two). ``confirmed_requests`` and ``pending_requests``
    count the distinct admitted requests (samples of action flag or route) with a
    confirmed, or a pending, sample: the numerator of the confirmed flag rate, and
    what could still move it."""

    pending: int = 0
    confirmed: int = 0
    dismissed: int = 0
    confirmed_requests: int = 0
    pending_requests: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "pending": self.pending,
            "confirmed": self.confirmed,
            "dismissed": self.dismissed,
            "confirmed_requests": self.confirmed_requests,
            "pending_requests": self.pending_requests,
        }


def review_queue(
    *,
    releases: Iterable[str] | None = None,
    release: str = "",
    category: str = "",
    status: str = Status.PENDING,
) -> QuerySet[FlaggedSample]:
    """Samples newest first: of ``releases`` (None: every release), narrowed to one
    ``release``, one ``category`` (among a sample's categories) and one ``status``
    ("" for any)."""
    samples = FlaggedSample.objects.select_related("decided_by")
    if releases is not None:
        samples = samples.filter(release__in=list(releases))
    if release:
        samples = samples.filter(release=release)
    if status:
        samples = samples.filter(status=status)
    if category:
        # Whole names in the comma-joined text: "cyber" must not find "cyber/intrusion".
        samples = samples.filter(
            Q(categories=category)
            | Q(categories__startswith=f"{category},")
            | Q(categories__endswith=f",{category}")
            | Q(categories__contains=f",{category},")
        )
    return samples


def decide_sample(
    sample: FlaggedSample | int, *, decision: str, actor, note: str = ""
) -> FlaggedSample:
    """Record ``actor``'s decision (confirmed or dismissed) on a pending sample, with
    its audit row. Refused: ``not_a_reviewer`` (403) unless ``actor`` has the reviewer
    role, ``sample_not_found`` (404), ``sample_decided`` (409) when it is no longer
    pending. ValueError for a decision that is neither."""
    status = Status(decision)
    if status not in DECISIONS:
        raise ValueError(f"a sample is confirmed or dismissed, not {decision!r}")
    if REVIEWER not in staff_roles(actor):
        raise Refused("not_a_reviewer", "only reviewers decide flagged samples", status=403)
    pk = sample.pk if isinstance(sample, FlaggedSample) else int(sample)
    with transaction.atomic():
        decided = FlaggedSample.objects.filter(pk=pk, status=Status.PENDING).update(
            status=status, decided_by=actor, decided_at=timezone.now(), note=note[:NOTE_MAX]
        )
        found = FlaggedSample.objects.select_related("decided_by").filter(pk=pk).first()
        if found is None:
            raise Refused("sample_not_found", "no such flagged sample", status=404)
        if not decided:
            raise Refused("sample_decided", f"this sample was already {found.status}")
        audit.record(
            DECISIONS[status],
            actor=actor,
            object_type=audit.ObjectType.FLAGGED_SAMPLE,
            object_id=str(found.pk),
            data={
                "release": found.release,
                "stage": found.stage,
                "categories": found.categories,
                "action": found.action,
                "source": found.source,
                "request_id": found.request_id,
                "org": found.org,
                "note": found.note,
            },
        )
    return found


def sample_counts(*, release: str, stage: str, since: datetime, until: datetime) -> SampleCounts:
    """The kept samples of ``release`` in ``stage`` made in [since, until), by status
    (one query)."""
    admitted = Q(action__in=ADMITTED_ACTIONS)
    counts = (
        FlaggedSample.objects.filter(
            release=release, stage=stage, created_at__gte=since, created_at__lt=until
        )
        .order_by()
        .aggregate(
            pending=Count("id", filter=Q(status=Status.PENDING)),
            confirmed=Count("id", filter=Q(status=Status.CONFIRMED)),
            dismissed=Count("id", filter=Q(status=Status.DISMISSED)),
            confirmed_requests=Count(
                "request_id", filter=admitted & Q(status=Status.CONFIRMED), distinct=True
            ),
            pending_requests=Count(
                "request_id", filter=admitted & Q(status=Status.PENDING), distinct=True
            ),
        )
    )
    return SampleCounts(**counts)


def delete_expired_samples(*, now: datetime | None = None) -> int:
    """Delete every sample whose ``expires_at`` is at or before ``now``, in one
    transaction with one audit row saying how many (none when there were none).
    Returns the number deleted."""
    now = now or timezone.now()
    with transaction.atomic():
        expired = FlaggedSample.objects.filter(expires_at__lte=now)
        by_status = dict(
            expired.order_by()
            .values_list("status")
            .annotate(n=Count("id"))
            .values_list("status", "n")
        )
        deleted, _ = expired.delete()
        if deleted:
            audit.record(
                "flag_samples_expired",
                actor="system:retention",
                object_type=audit.ObjectType.FLAGGED_SAMPLE,
                object_id="expired",
                data={"deleted": deleted, "by_status": by_status, "until": now.isoformat()},
            )
    if deleted:
        log.info("deleted %d expired flagged samples", deleted)
    return deleted
