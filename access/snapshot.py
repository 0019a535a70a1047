"""The proxy's in-memory copy of keys, organizations and releases.

Every change to a key, an organization, a verification, a plan or a release's
stage or state is written in one transaction with its audit row (the house rule),
so the tail of the audit chain, ``(seq, hash)``, changes exactly when something the
proxy depends on may have changed. The hash makes the marker unique even if a test
database is flushed and its sequence starts again.

``SnapshotStore`` polls that marker from a background thread every
``poll_interval`` seconds (one indexed query) and, when it moves, loads a new
snapshot and swaps it in with one assignment; requests read whichever snapshot is
current and never wait for the database. A snapshot is also reloaded every
``full_reload_interval`` seconds whatever the marker says, as a safety net.

Fail closed: when the marker cannot be read for ``max_staleness`` seconds, the
snapshot is no longer trusted and ``current()`` returns None (the proxy answers
503) until the database answers again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from django.db import close_old_connections, connection

from access.decisions import KeyEntry, OrgEntry, ReleaseEntry
from access.models import ApiKey, Organization, Verification, VerificationStatus
from monitoring.models import AuditEvent
from rollout.models import Release, ReleaseState
from rollout.plans import plan_doc

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


def load_snapshot() -> Snapshot:
    """Read everything the proxy decides from.

    The marker is read first: a change that commits while the rest is read makes the
    data newer than the marker, never older, and the next poll loads again. (No
    transaction: on SQLite, whose transactions here take the write lock, a reader
    must not block the writers.)
    """
    marker, changed_at = read_marker()
    verifications: dict[int, list[tuple[str, float | None]]] = {}
    for org_id, kind, expires_at in Verification.objects.filter(
        status=VerificationStatus.VALID
    ).values_list("organization_id", "kind", "expires_at"):
        verifications.setdefault(org_id, []).append((kind, _ts(expires_at)))
    orgs = {
        pk: OrgEntry(
            public_id=public_id,
            slug=slug,
            tier=tier,
            verifications=tuple(verifications.get(pk, ())),
        )
        for pk, public_id, slug, tier in Organization.objects.values_list(
            "pk", "public_id", "slug", "tier"
        )
    }
    keys = {
        key_id: KeyEntry(
            key_id=key_id,
            public_id=public_id,
            digest=digest,
            org_id=org_id,
            expires_at=_ts(expires_at),
            revoked=revoked_at is not None,
        )
        for key_id, public_id, digest, org_id, expires_at, revoked_at in (
            ApiKey.objects.values_list(
                "key_id", "public_id", "digest", "organization_id", "expires_at", "revoked_at"
            )
        )
    }
    releases = {}
    for release in Release.objects.exclude(state=ReleaseState.RETIRED).select_related(
        "active_plan"
    ):
        plan = release.active_plan
        stage = None if plan is None else plan_doc(plan).stage(release.current_stage)
        if stage is None:
            log.error("release %s has no plan stage %r", release.name, release.current_stage)
            continue  # not served: fail closed rather than guess a policy
        releases[release.name] = ReleaseEntry(
            name=release.name,
            public_id=release.public_id,
            state=release.state,
            stage=stage,
            upstream_base_url=release.upstream_base_url.rstrip("/"),
            upstream_model=release.upstream_model,
            plan_version=plan.version,
            created=int(release.created_at.timestamp()),
        )
    return Snapshot(marker=marker, keys=keys, orgs=orgs, releases=releases, changed_at=changed_at)


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
                snapshot = load_snapshot()
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
