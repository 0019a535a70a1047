"""What the organization and key pages read, in a bounded number of queries.

- ``visible_orgs``/``visible_keys``: what a user may see (staff: everything; an org
  admin: their own organizations', anything else does not exist for them).
- ``managed_org_ids``: the organizations whose keys and members a user may change
  (a rollout admin: all; an org admin: their own; reviewers and viewers: none).
- ``org_summaries``: per organization, the tier the proxy serves it under at each
  release's current stage, its verifications with their expiry warning, its members.
  The tier comes from ``access.decisions.decide`` over the same entries the proxy's
  snapshot holds (``access.snapshot``), so the page and the proxy cannot disagree.
- ``org_usage``/``key_usage``: each organization's, or each API key's, requests per
  hour over the last days, read from the hour rollups (``UsageRollup``, keyed by org
  and by key among others), never from raw usage events; one query each.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from django.db.models import Prefetch, QuerySet, Sum, prefetch_related_objects

from access.decisions import KeyEntry, RequestInfo, decide
from access.models import ApiKey, Membership, Organization, Verification, VerificationStatus
from access.snapshot import load_orgs, load_releases
from console.guards import scoped
from monitoring.models import UsageRollup
from stagegate.roles import admin_org_ids, is_rollout_admin

EXPIRY_WARNING = timedelta(days=14)
USAGE_DAYS = 7


@dataclass(frozen=True)
class ReleaseStanding:
    """How the proxy serves one organization one release now."""

    release: str
    stage: str
    state: str
    tier: str | None  # the tier it is served under; None when the model is invisible to it
    reason: str  # the decision's reason code (ok, model_not_available, ...)
    message: str


@dataclass(frozen=True)
class VerificationRow:
    verification: Verification
    valid_now: bool
    expiring_soon: bool  # valid or pending, and expiring within EXPIRY_WARNING


@dataclass(frozen=True)
class OrgSummary:
    organization: Organization
    standings: list[ReleaseStanding]
    verifications: list[VerificationRow]
    members: list[Membership]
    manageable: bool  # the viewer of the page may change its keys and members

    @property
    def expiring(self) -> list[VerificationRow]:
        return [row for row in self.verifications if row.expiring_soon]


def visible_orgs(user) -> QuerySet[Organization]:
    return scoped(Organization.objects.all(), user, "pk").order_by("slug")


def visible_keys(user) -> QuerySet[ApiKey]:
    return (
        scoped(ApiKey.objects.all(), user)
        .select_related("organization", "rotated_from")
        .order_by("organization__slug", "-created_at", "-id")
    )


def managed_org_ids(user) -> frozenset[int] | None:
    """None when the user manages every organization's keys and members (rollout
    admin); else the ids of the organizations they administer (empty for reviewers
    and viewers)."""
    if is_rollout_admin(user):
        return None
    return frozenset(admin_org_ids(user).values_list("organization_id", flat=True))


def may_manage(managed: frozenset[int] | None, organization_id: int) -> bool:
    return managed is None or organization_id in managed


def _standing(org_entry, release) -> ReleaseStanding:
    # An active key of the organization asking to list the model: the question the
    # proxy answers for /v1/models, which is the tier it serves the release under.
    key = KeyEntry(key_id="", public_id="", digest="", org_id=0, expires_at=None, revoked=False)
    decision = decide(
        key=key,
        org=org_entry,
        release=release,
        model=release.name,
        request=RequestInfo(endpoint="models"),
        now=datetime.now(UTC).timestamp(),
    )
    return ReleaseStanding(
        release=release.name,
        stage=release.stage_name,
        state=release.state,
        tier=decision.tier,
        reason=str(decision.reason),
        message=decision.message,
    )


def org_summaries(
    organizations: Iterable[Organization], *, user, now: datetime
) -> list[OrgSummary]:
    """Summaries of ``organizations`` (already read, and narrowed to what ``user`` may
    see), in six queries whatever their number: their verifications and members, the
    releases, the entries the proxy decides from, and the user's managed organizations."""
    orgs = list(organizations)
    if not orgs:
        return []
    prefetch_related_objects(
        orgs,
        Prefetch(
            "verifications",
            queryset=Verification.objects.order_by("kind", "-expires_at", "-id"),
        ),
        Prefetch(
            "memberships",
            queryset=Membership.objects.select_related("user").order_by("user__username"),
        ),
    )
    releases = load_releases()
    entries = load_orgs([o.pk for o in orgs])
    managed = managed_org_ids(user)
    summaries = []
    for org in orgs:
        entry = entries.get(org.pk)
        standings = (
            [_standing(entry, release) for _name, release in sorted(releases.items())]
            if entry is not None
            else []
        )
        rows = [
            VerificationRow(
                verification=v,
                valid_now=v.is_valid_at(now),
                expiring_soon=v.status in (VerificationStatus.VALID, VerificationStatus.PENDING)
                and now < v.expires_at <= now + EXPIRY_WARNING,
            )
            for v in org.verifications.all()
        ]
        summaries.append(
            OrgSummary(
                organization=org,
                standings=standings,
                verifications=rows,
                members=list(org.memberships.all()),
                manageable=may_manage(managed, org.pk),
            )
        )
    return summaries


@dataclass(frozen=True)
class KeyRow:
    key: ApiKey
    status: str  # active | expired | revoked
    usage_svg: str = ""  # the key's sparkline, drawn by the view from ``key_usage``

    @property
    def rotated(self) -> bool:
        return self.key.rotated_from_id is not None


def key_rows(api_keys: Iterable[ApiKey], *, now: datetime) -> list[KeyRow]:
    return [KeyRow(key=api_key, status=api_key.status_at(now)) for api_key in api_keys]


def org_usage(
    public_ids: Iterable[str], *, now: datetime, days: int = USAGE_DAYS
) -> dict[str, list[float]]:
    """Requests per hour of each organization over the last ``days`` days (oldest
    first, one value per hour, zero where there was none), from the hour rollups in
    one query. The current hour's row is rewritten by every rollup run, so it counts
    what has been rolled up so far."""
    return _hourly_requests("org", public_ids, now=now, days=days)


def key_usage(
    public_ids: Iterable[str], *, now: datetime, days: int = USAGE_DAYS
) -> dict[str, list[float]]:
    """Requests per hour of each API key (by public id) over the last ``days`` days, as
    ``org_usage``: one query over the hour rollups, grouped by key and hour. Calls
    without a valid key count for no key; hours rolled up before rollups were keyed by
    key (migration ``monitoring.0006``) count for none until rolled up again."""
    return _hourly_requests("key", public_ids, now=now, days=days)


def _hourly_requests(
    column: Literal["org", "key"], public_ids: Iterable[str], *, now: datetime, days: int
) -> dict[str, list[float]]:
    ids = sorted(set(public_ids) - {""})  # "" stands for no org or key in particular
    end = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    start = end - timedelta(days=days)
    hours = days * 24
    series = {public_id: [0.0] * hours for public_id in ids}
    if not ids:
        return series
    rows = (
        UsageRollup.objects.filter(
            bucket_seconds=UsageRollup.HOUR,
            bucket_start__gte=start,
            bucket_start__lt=end,
            **{f"{column}__in": ids},
        )
        .values(column, "bucket_start")
        .annotate(total=Sum("requests"))
        .order_by()
    )
    for row in rows:
        index = int((row["bucket_start"] - start).total_seconds() // 3600)
        if 0 <= index < hours:
            series[row[column]][index] += float(row["total"])
    return series
