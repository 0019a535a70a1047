"""The proxy's in-memory copy of keys, organizations and releases.

Every change to a key, an organization, a verification, a plan or a release's
stage or state is written in one transaction with its audit row (the house rule),
so the tail of the audit chain, ``(seq, hash)``, changes exactly when something the
proxy depends on may have changed. The hash makes the marker unique even if a test
database is flushed and its sequence starts again.

``SnapshotStore`` polls that marker from a background thread every
``poll_interval`` seconds (one indexed query). When it moves, the audit rows since
the last marker name what changed, and only those keys, organizations (with their
verifications) or releases are read again (``update_snapshot``); the new snapshot
is swapped in with one assignment. Requests read whichever snapshot is current and
never wait for the database. Everything is loaded again every
``full_reload_interval`` seconds, and whenever the audit rows name a kind of change
the store does not know, as a safety net.

Each release's entry carries its current stage's policy and compiled screening
(``access.screening.Screen``), validated and compiled once per plan content and stage
(``stage_policy``) and reused by every reload while the plan is unchanged.

Fail closed: when the marker cannot be read for ``max_staleness`` seconds, the
snapshot is no longer trusted and ``current()`` returns None (the proxy answers
503) until the database answers again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from django.db import close_old_connections, connection

from access.decisions import KeyEntry, OrgEntry, ReleaseEntry
from access.models import ApiKey, Organization, Verification, VerificationStatus
from access.screening import Screen, compile_screen
from monitoring.audit import ObjectType
from monitoring.models import AuditEvent
from rollout.models import Release, ReleaseState, RolloutPlan
from rollout.plan_schema import StagePolicy
from rollout.plans import plan_doc
from tuning.models import TunedModel, TunedModelStatus

log = logging.getLogger(__name__)

Marker = tuple[int, str] | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    marker: Marker
    keys: dict[str, KeyEntry]  # by key_id (the non-secret part of a key)
    orgs: dict[int, OrgEntry]  # by primary key
    releases: dict[str, ReleaseEntry]  # by release name (the model clients call)
    loaded_at: float = field(default_factory=time.time)
    changed_at: float | None = None  # when the change that caused this load was made


def read_marker() -> tuple[Marker, float | None]:
    """The audit chain's tail (seq, hash) and the time it was written."""
    row = AuditEvent.objects.order_by("-seq").values_list("seq", "hash", "created_at").first()
    if row is None:
        return None, None
    return (row[0], row[1]), row[2].timestamp()


def _ts(value) -> float | None:
    return None if value is None else value.timestamp()


def _load_orgs(**filters) -> dict[int, OrgEntry]:
    verifications: dict[int, list[tuple[str, float | None]]] = {}
    valid = Verification.objects.filter(status=VerificationStatus.VALID)
    if filters:
        valid = valid.filter(**{f"organization__{name}": value for name, value in filters.items()})
    for org_id, kind, expires_at in valid.values_list("organization_id", "kind", "expires_at"):
        verifications.setdefault(org_id, []).append((kind, _ts(expires_at)))
    return {
        pk: OrgEntry(
            public_id=public_id,
            slug=slug,
            tier=tier,
            verifications=tuple(verifications.get(pk, ())),
        )
        for pk, public_id, slug, tier in Organization.objects.filter(**filters).values_list(
            "pk", "public_id", "slug", "tier"
        )
    }


def _load_keys(**filters) -> dict[str, KeyEntry]:
    return {
        key_id: KeyEntry(
            key_id=key_id,
            public_id=public_id,
            digest=digest,
            org_id=org_id,
            expires_at=_ts(expires_at),
            revoked=revoked_at is not None,
        )
        for key_id, public_id, digest, org_id, expires_at, revoked_at in (
            ApiKey.objects.filter(**filters).values_list(
                "key_id", "public_id", "digest", "organization_id", "expires_at", "revoked_at"
            )
        )
    }


# Stages validated and their screening compiled, by the plan's digest (its canonical
# content) and the stage's name: a reload finds them here unless the plan changed, so a
# stage with a thousand rules is validated and compiled once, not at every reload (each
# takes tens of ms, with the GIL). Least recently used first out.
_STAGES: OrderedDict[tuple[str, str], tuple[StagePolicy | None, Screen | None]] = OrderedDict()
_STAGES_LOCK = threading.Lock()
MAX_CACHED_STAGES = 256


def stage_policy(plan: RolloutPlan, name: str) -> tuple[StagePolicy | None, Screen | None]:
    """Stage ``name`` of ``plan`` (None when the plan has none) and its compiled screen
    (None when it screens nothing), validated and compiled once per plan content."""
    key = (plan.digest, name)
    with _STAGES_LOCK:
        found = _STAGES.get(key)
        if found is not None:
            _STAGES.move_to_end(key)
            return found
    policy = plan_doc(plan).stage(name)
    found = (policy, None if policy is None else compile_screen(policy.screening))
    if plan.digest:
        with _STAGES_LOCK:
            _STAGES[key] = found
            while len(_STAGES) > MAX_CACHED_STAGES:
                _STAGES.popitem(last=False)
    return found


def release_entry(
    release: Release, *, stage: str | None = None, state: str | None = None
) -> ReleaseEntry | None:
    """``release`` as the proxy serves it (with ``active_plan`` loaded), or None when it
    is not served: retired, or no plan stage of that name. ``stage`` and ``state``
    default to the release's own; the access explainer passes the next stage to show
    what it would change."""
    if release.state == ReleaseState.RETIRED:
        return None
    plan = release.active_plan
    name = stage or release.current_stage
    policy, screen = (None, None) if plan is None else stage_policy(plan, name)
    if policy is None:
        return None
    return ReleaseEntry(
        name=release.name,
        public_id=release.public_id,
        state=state or release.state,
        stage=policy,
        upstream_base_url=release.upstream_base_url.rstrip("/"),
        upstream_model=release.upstream_model,
        plan_version=plan.version,
        created=int(release.created_at.timestamp()),
        screen=screen,
    )


def load_key(key_id: str) -> KeyEntry | None:
    """One key as the snapshot holds it, by its key id; None when no key has it."""
    return _load_keys(key_id=key_id).get(key_id)


def load_org(pk: int) -> OrgEntry | None:
    """One organization as the snapshot holds it, with its valid verifications."""
    return _load_orgs(pk=pk).get(pk)


def load_orgs(pks: list[int]) -> dict[int, OrgEntry]:
    """Several organizations as the snapshot holds them, by primary key (two queries)."""
    return _load_orgs(pk__in=pks)


def load_releases() -> dict[str, ReleaseEntry]:
    """Every served release as the snapshot holds it, by name (one query)."""
    return _load_releases()


def _load_releases() -> dict[str, ReleaseEntry]:
    releases = {}
    for release in Release.objects.exclude(state=ReleaseState.RETIRED).select_related(
        "active_plan"
    ):
        entry = release_entry(release)
        if entry is None:
            log.error("release %s has no plan stage %r", release.name, release.current_stage)
            continue  # not served: fail closed rather than guess a policy
        releases[release.name] = entry
    for name, parent, org_slug, upstream_model, status, reason, created in (
        TunedModel.objects.exclude(status=TunedModelStatus.REJECTED)
        .filter(parent__name__in=list(releases))
        .values_list(
            "name",
            "parent__name",
            "organization__slug",
            "upstream_model",
            "status",
            "held_reason",
            "created_at",
        )
    ):
        releases[name] = tuned_entry(
            releases[parent],
            name=name,
            org_slug=org_slug,
            upstream_model=upstream_model,
            held=held_message(name, parent, status, reason),
            created=int(created.timestamp()),
        )
    return releases


def held_message(name: str, parent: str, status: str, reason: str) -> str:
    """Why the tuned model ``name`` may not be called yet; "" when it may."""
    if status == TunedModelStatus.ACTIVE:
        return ""
    if status == TunedModelStatus.ASSESSING:
        return (
            f"'{name}' is being assessed against '{parent}' before its first use;"
            " try again shortly."
        )
    return (
        f"'{name}' is held for review: its safety assessment against '{parent}' failed"
        f" ({reason or 'no reason recorded'}). It can be called once a reviewer releases it."
    )


def tuned_entry(
    parent: ReleaseEntry,
    *,
    name: str,
    org_slug: str,
    upstream_model: str,
    held: str,
    created: int,
) -> ReleaseEntry:
    """A tuned model as the proxy serves it: its parent's current stage narrowed to its
    organization and to the tiers that stage lets fine-tune (so it never opens wider
    than the parent), the parent's state (paused with it), screening and upstream."""
    stage = parent.stage
    fine_tuning = stage.fine_tuning
    tiers = {
        tier: policy
        for tier, policy in stage.tiers.items()
        if fine_tuning is not None and tier in fine_tuning.tiers
    }
    allowed = (org_slug,) if stage.allow_orgs is None or org_slug in stage.allow_orgs else ()
    narrowed = stage.model_copy(update={"tiers": tiers, "allow_orgs": allowed})
    return ReleaseEntry(
        name=name,
        public_id=parent.public_id,
        state=parent.state,
        stage=narrowed,
        upstream_base_url=parent.upstream_base_url,
        upstream_model=upstream_model,
        plan_version=parent.plan_version,
        created=created,
        screen=parent.screen,
        parent=parent.name,
        held=held,
    )


def load_snapshot() -> Snapshot:
    """Read everything the proxy decides from.

    The marker is read first: a change that commits while the rest is read makes the
    data newer than the marker, never older, and the next poll loads again. (No
    transaction: on SQLite, whose transactions here take the write lock, a reader
    must not block the writers.)
    """
    marker, changed_at = read_marker()
    return Snapshot(
        marker=marker,
        keys=_load_keys(),
        orgs=_load_orgs(),
        releases=_load_releases(),
        changed_at=changed_at,
    )


# What each kind of audited object means for the snapshot (``ObjectType.parse`` also
# reads the spellings older rows hold). Rows about anything else change no decision.
NOT_DECIDED_FROM = frozenset(
    {
        ObjectType.USER,
        ObjectType.GROUP,
        ObjectType.MEMBERSHIP,
        ObjectType.REVIEW,
        ObjectType.APPROVAL,
        ObjectType.INCIDENT,
        ObjectType.FLAGGED_SAMPLE,
        ObjectType.TRAINING_FILE,
        ObjectType.FINE_TUNING_JOB,
    }
)
MAX_INCREMENTAL_ROWS = 1000


def update_snapshot(snapshot: Snapshot) -> Snapshot | None:
    """The snapshot with the changes audited since its marker applied, reading only
    the objects they name; None when a full load is needed instead (too many
    changes, a kind of change it does not know, a chain that does not continue
    from the marker, a deleted organization)."""
    if snapshot.marker is None:
        return None
    rows = list(
        AuditEvent.objects.filter(seq__gt=snapshot.marker[0])
        .order_by("seq")
        .values_list("seq", "prev_hash", "hash", "object_type", "object_id", "created_at")[
            : MAX_INCREMENTAL_ROWS + 1
        ]
    )
    if not rows or len(rows) > MAX_INCREMENTAL_ROWS or rows[0][1] != snapshot.marker[1]:
        return None
    keys: set[str] = set()
    orgs: set[str] = set()
    verifications: set[str] = set()
    releases = False
    for _seq, _prev, _hash, stored_type, object_id, _at in rows:
        object_type = ObjectType.parse(stored_type)
        if object_type is ObjectType.API_KEY:
            keys.add(object_id)
        elif object_type is ObjectType.ORGANIZATION:
            orgs.add(object_id)
        elif object_type is ObjectType.VERIFICATION:
            verifications.add(object_id)
        elif object_type in (ObjectType.RELEASE, ObjectType.TUNED_MODEL):
            releases = True
        elif object_type not in NOT_DECIDED_FROM:
            return None  # something new (or None, unknown): be safe
    if verifications:
        orgs |= set(
            Verification.objects.filter(public_id__in=verifications).values_list(
                "organization__public_id", flat=True
            )
        )
    new_keys = snapshot.keys
    if keys:
        loaded_keys = _load_keys(public_id__in=keys)
        new_keys = {**snapshot.keys, **loaded_keys}
        gone = keys - {entry.public_id for entry in loaded_keys.values()}
        if gone:  # deleted keys (rare): drop them, found by their public id
            for key_id in [k for k, entry in new_keys.items() if entry.public_id in gone]:
                del new_keys[key_id]
    new_orgs = snapshot.orgs
    if orgs:
        loaded = _load_orgs(public_id__in=orgs)
        if len(loaded) != len(orgs):
            return None  # an organization was deleted: its keys went with it
        new_orgs = {**snapshot.orgs, **loaded}
    if keys:  # a new key's organization may be one no audit row named (a data import)
        unseen = {entry.org_id for entry in loaded_keys.values()} - new_orgs.keys()
        if unseen:
            new_orgs = {**new_orgs, **_load_orgs(pk__in=unseen)}
    last = rows[-1]
    return Snapshot(
        marker=(last[0], last[2]),
        keys=new_keys,
        orgs=new_orgs,
        releases=_load_releases() if releases else snapshot.releases,
        loaded_at=snapshot.loaded_at,  # the full reload's clock keeps running
        changed_at=last[5].timestamp(),
    )


class SnapshotStore:
    """Holds the current snapshot and keeps it fresh from a daemon thread."""

    def __init__(
        self,
        *,
        poll_interval: float = 0.25,
        full_reload_interval: float = 60.0,
        max_staleness: float = 10.0,
        on_reload: Callable[[Snapshot, float, bool], None] | None = None,
    ) -> None:
        self.poll_interval = poll_interval
        self.full_reload_interval = full_reload_interval
        self.max_staleness = max_staleness
        self.on_reload = on_reload
        self._snapshot: Snapshot | None = None
        self._confirmed_at = 0.0  # monotonic time the marker was last read successfully
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._first_attempt = threading.Event()
        self.last_error: str | None = None

    def current(self) -> Snapshot | None:
        """The snapshot to decide from, or None when none is trustworthy (fail closed)."""
        if time.monotonic() - self._confirmed_at > self.max_staleness:
            return None
        return self._snapshot

    @property
    def snapshot(self) -> Snapshot | None:
        """The last snapshot loaded, trusted or not (for health reports)."""
        return self._snapshot

    def refresh(self) -> bool:
        """Poll the marker once and reload if it moved. True when a new snapshot loaded."""
        try:
            marker, _ = read_marker()
            current = self._snapshot
            stale = current is None or time.time() - current.loaded_at > self.full_reload_interval
            reloaded = False
            moved = current is not None and marker != current.marker
            if stale or moved:
                started = time.perf_counter()
                snapshot = (not stale and update_snapshot(current)) or load_snapshot()
                self._snapshot = snapshot
                reloaded = True
                if self.on_reload is not None:
                    self.on_reload(snapshot, time.perf_counter() - started, moved)
            self._confirmed_at = time.monotonic()
            self.last_error = None
            return reloaded
        except Exception as exc:
            # Keep the last snapshot; current() stops trusting it after max_staleness.
            if self.last_error != repr(exc):
                log.warning("policy store unreachable: %s", exc)
            self.last_error = repr(exc)
            connection.close()
            return False

    def start(self) -> None:
        """Start polling from a daemon thread (the ORM is synchronous; requests are not)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="stagegate-snapshot", daemon=True)
        self._thread.start()

    def wait_first_load(self, timeout: float) -> bool:
        """Block until the first load was tried; True if a snapshot is usable."""
        self._first_attempt.wait(timeout)
        return self.current() is not None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        self.refresh()
        self._first_attempt.set()
        while not self._stop.wait(self.poll_interval):
            close_old_connections()
            self.refresh()
        connection.close()
