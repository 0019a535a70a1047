"""The proxy's in-memory snapshot: what ``load_snapshot`` reads, and how ``SnapshotStore``
reloads on a moved audit marker, keeps its snapshot through a failing database and stops
trusting it after ``max_staleness`` (fail closed)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

import pytest
import yaml
from django.utils import timezone

import access.snapshot
from access.decisions import KeyEntry, OrgEntry, ReleaseEntry
from access.keys import digest, issue_key, revoke_key
from access.models import Organization, VerificationStatus
from access.screening import ALLOW, Verdict
from access.snapshot import SnapshotStore, load_snapshot, read_marker, stage_policy
from monitoring.models import AuditEvent
from rollout.models import Release, ReleaseState
from rollout.plan_schema import parse_plan
from rollout.plans import apply_plan
from tests.factories import EXAMPLE_PLAN, make_verification

pytestmark = pytest.mark.django_db

PLAN = parse_plan(EXAMPLE_PLAN.read_text())


def _wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout} s")
        time.sleep(0.005)


def _tail() -> AuditEvent:
    return AuditEvent.objects.order_by("-seq").first()


# --- load_snapshot ---------------------------------------------------------------------


def test_load_snapshot_holds_every_key(northwind, acme):
    expires = timezone.now() + timedelta(days=30)
    plain = issue_key(organization=northwind, name="plain", actor=None).api_key
    expiring = issue_key(organization=acme, name="expiring", actor=None, expires_at=expires)
    revoked = issue_key(organization=northwind, name="revoked", actor=None).api_key
    revoke_key(api_key=revoked, actor=None, reason="leaked")

    keys = load_snapshot().keys

    assert keys == {
        plain.key_id: KeyEntry(
            key_id=plain.key_id,
            public_id=plain.public_id,
            digest=plain.digest,
            org_id=northwind.pk,
            expires_at=None,
            revoked=False,
        ),
        expiring.api_key.key_id: KeyEntry(
            key_id=expiring.api_key.key_id,
            public_id=expiring.api_key.public_id,
            digest=digest(expiring.raw_key),
            org_id=acme.pk,
            expires_at=expires.timestamp(),
            revoked=False,
        ),
        revoked.key_id: KeyEntry(
            key_id=revoked.key_id,
            public_id=revoked.public_id,
            digest=revoked.digest,
            org_id=northwind.pk,
            expires_at=None,
            revoked=True,
        ),
    }


def test_load_snapshot_holds_orgs_with_only_valid_verifications(northwind, acme, publicdev):
    now = timezone.now()
    kyc = acme.verifications.get()
    lapsed = now - timedelta(days=1)  # still status valid: decide() checks the expiry
    make_verification(acme, "monitoring_agreement", expires_at=lapsed)
    for status in (
        VerificationStatus.PENDING,
        VerificationStatus.REVOKED,
        VerificationStatus.REJECTED,
        VerificationStatus.EXPIRED,
    ):
        make_verification(
            acme, "academic_credential", expires_at=now + timedelta(days=9), status=status
        )

    orgs = load_snapshot().orgs

    assert sorted(orgs) == sorted([northwind.pk, acme.pk, publicdev.pk])
    assert orgs[publicdev.pk] == OrgEntry(
        public_id=publicdev.public_id, slug="public-dev", tier="public", verifications=()
    )
    assert orgs[northwind.pk] == OrgEntry(
        public_id=northwind.public_id,
        slug="northwind-research",
        tier="research_partner",
        verifications=(
            ("monitoring_agreement", northwind.verifications.get().expires_at.timestamp()),
        ),
    )
    acme_entry = orgs[acme.pk]
    assert (acme_entry.public_id, acme_entry.slug, acme_entry.tier) == (
        acme.public_id,
        "acme-commercial",
        "verified_commercial",
    )
    assert sorted(acme_entry.verifications) == [
        ("business_kyc", kyc.expires_at.timestamp()),
        ("monitoring_agreement", lapsed.timestamp()),
    ]
    assert acme_entry.valid_kinds(now.timestamp()) == frozenset({"business_kyc"})


def test_load_snapshot_holds_release_at_its_current_stage(release):
    _, screen = stage_policy(release.active_plan, "research_preview")

    assert load_snapshot().releases == {
        "atlas-2": ReleaseEntry(
            name="atlas-2",
            public_id=release.public_id,
            state="active",
            stage=PLAN.stage("research_preview"),
            upstream_base_url="http://127.0.0.1:8001/v1",
            upstream_model="atlas-2-2026-11",
            plan_version=1,
            created=int(release.created_at.timestamp()),
            screen=screen,
        )
    }


def test_load_snapshot_follows_stage_and_state(release):
    Release.objects.filter(pk=release.pk).update(
        current_stage="commercial", state=ReleaseState.PAUSED
    )
    entry = load_snapshot().releases["atlas-2"]
    assert (entry.stage, entry.state, entry.stage_name) == (
        PLAN.stage("commercial"),
        "paused",
        "commercial",
    )


def test_load_snapshot_leaves_out_retired_release(release):
    Release.objects.filter(pk=release.pk).update(state=ReleaseState.RETIRED)
    assert load_snapshot().releases == {}


def test_load_snapshot_leaves_out_release_whose_stage_is_not_in_its_plan(release):
    # Not served rather than served under a guessed policy.
    Release.objects.filter(pk=release.pk).update(current_stage="no_such_stage")
    assert load_snapshot().releases == {}


def _apply_screening(actor, screening: dict | None, *, max_tokens: int = 4096) -> None:
    """Apply the example plan with ``screening`` on its first stage (None: none)."""
    document = yaml.safe_load(EXAMPLE_PLAN.read_text())
    stage = document["stages"][0]
    stage.pop("screening", None)
    if screening is not None:
        stage["screening"] = screening
    stage["tiers"]["research_partner"]["limits"]["max_tokens"] = max_tokens
    apply_plan(yaml.safe_dump(document), actor=actor)


SARIN = {"rules": [{"category": "weapons", "action": "block", "keywords": ["sarin"]}]}


def test_load_snapshot_compiles_the_stages_screening(release, ada):
    _apply_screening(ada, {**SARIN, "responses": "buffer", "retain_flagged": {"days": 7}})

    screen = load_snapshot().releases["atlas-2"].screen

    assert screen is not None
    assert screen.check("What is SARIN?") == Verdict("block", ("weapons",), "weapons", None)
    assert (screen.responses, screen.retain_days) == ("buffer", 7)


def test_load_snapshot_stage_without_screening_has_no_screen(release, ada):
    _apply_screening(ada, None)

    assert load_snapshot().releases["atlas-2"].screen is None


def test_reloads_reuse_the_compiled_screen_until_the_plan_changes(release, ada):
    _apply_screening(ada, SARIN)
    first = load_snapshot().releases["atlas-2"].screen

    again = load_snapshot().releases["atlas-2"].screen
    _apply_screening(ada, SARIN, max_tokens=2048)  # a new version, the same screening
    limits_changed = load_snapshot().releases["atlas-2"]
    _apply_screening(
        ada, {"rules": [{"category": "cyber", "action": "flag", "keywords": ["rootkit"]}]}
    )
    screening_changed = load_snapshot().releases["atlas-2"].screen

    assert again is first
    assert limits_changed.stage.tiers["research_partner"].limits.max_tokens == 2048
    assert limits_changed.screen.check("sarin") == first.check("sarin")
    assert screening_changed.check("sarin") == ALLOW
    assert screening_changed.check("a rootkit").categories == ("cyber",)


def test_load_snapshot_marker_is_the_audit_chain_tail(release):
    snapshot = load_snapshot()
    tail = _tail()
    assert snapshot.marker == (tail.seq, tail.hash)
    assert snapshot.changed_at == tail.created_at.timestamp()
    assert read_marker() == (snapshot.marker, snapshot.changed_at)


def test_read_marker_on_empty_audit_log_is_none():
    assert read_marker() == (None, None)


# --- SnapshotStore ---------------------------------------------------------------------


def test_store_before_first_refresh_has_no_snapshot():
    store = SnapshotStore()
    assert (store.current(), store.snapshot) == (None, None)


def test_store_refresh_loads_first_snapshot(release, northwind):
    reloads = []
    store = SnapshotStore(
        on_reload=lambda snapshot, seconds, changed: reloads.append((snapshot, changed))
    )
    assert store.refresh() is True
    assert store.current() is store.snapshot
    assert reloads == [(store.snapshot, False)]  # a first load is no change to time
    assert sorted(store.snapshot.releases) == ["atlas-2"]
    assert store.last_error is None


def test_store_refresh_without_change_keeps_snapshot(release, northwind):
    store = SnapshotStore()
    store.refresh()
    first = store.snapshot
    assert store.refresh() is False
    assert store.snapshot is first
    assert store.current() is first


def test_store_refresh_reloads_when_marker_moves(release, northwind):
    api_key = issue_key(organization=northwind, name="t", actor=None).api_key
    changes = []
    store = SnapshotStore(on_reload=lambda snapshot, seconds, changed: changes.append(changed))
    store.refresh()
    first = store.snapshot
    assert first.keys[api_key.key_id].revoked is False

    revoke_key(api_key=api_key, actor=None)

    assert store.refresh() is True
    assert store.snapshot is not first
    assert store.snapshot.keys[api_key.key_id].revoked is True
    assert store.snapshot.marker == (_tail().seq, _tail().hash)
    assert store.refresh() is False
    assert changes == [False, True]  # only the reload a change caused measures its lag


def test_store_refresh_reloads_after_full_reload_interval(release):
    store = SnapshotStore(full_reload_interval=0)
    store.refresh()
    first = store.snapshot
    assert store.refresh() is True
    assert store.snapshot is not first
    assert store.snapshot.releases == first.releases


def test_store_current_is_none_after_max_staleness(release):
    store = SnapshotStore(max_staleness=0.05)
    store.refresh()
    snapshot = store.current()
    assert snapshot is not None
    _wait_until(lambda: store.current() is None)
    assert store.snapshot is snapshot  # kept for health reports, no longer trusted


def test_store_failing_read_keeps_trusting_snapshot_within_max_staleness(release, monkeypatch):
    store = SnapshotStore(max_staleness=60)
    store.refresh()
    snapshot = store.snapshot

    def database_down():
        raise ConnectionError("database is down")

    monkeypatch.setattr(access.snapshot, "read_marker", database_down)
    assert store.refresh() is False
    assert store.current() is snapshot


def test_store_failing_read_keeps_snapshot_but_lets_it_go_stale(release, monkeypatch):
    store = SnapshotStore(max_staleness=0.05)
    store.refresh()
    snapshot = store.snapshot

    def database_down():
        raise ConnectionError("database is down")

    monkeypatch.setattr(access.snapshot, "read_marker", database_down)
    assert store.refresh() is False
    assert store.snapshot is snapshot
    assert store.last_error == "ConnectionError('database is down')"
    _wait_until(lambda: store.current() is None)
    assert store.refresh() is False
    assert store.current() is None  # failed refreshes never restore trust
    assert store.snapshot is snapshot


# --- incremental updates ------------------------------------------------------------------


def _same(a, b) -> bool:
    return (a.marker, a.keys, a.orgs, a.releases) == (b.marker, b.keys, b.orgs, b.releases)


def test_update_snapshot_applies_each_kind_of_change_like_a_full_load(release, northwind, acme):
    from access.organizations import update_organization
    from access.verifications import revoke_verification
    from rollout.plans import apply_plan

    key = issue_key(organization=northwind, name="a", actor=None).api_key
    snapshot = load_snapshot()
    changes = [
        lambda: issue_key(organization=acme, name="b", actor=None),
        lambda: revoke_key(api_key=key, actor=None),
        lambda: update_organization(acme, actor=None, tier="public"),
        lambda: revoke_verification(northwind.verifications.get(), actor=None),
        lambda: apply_plan(
            EXAMPLE_PLAN.read_text().replace("requests_per_minute: 60", "requests_per_minute: 7"),
            actor=None,
        ),
    ]
    for change in changes:
        change()
        updated = access.snapshot.update_snapshot(snapshot)
        assert updated is not None
        assert _same(updated, load_snapshot())
        snapshot = updated
    assert snapshot.keys[key.key_id].revoked is True
    assert (
        snapshot.releases["atlas-2"].stage.tiers["research_partner"].limits.requests_per_minute == 7
    )


def test_update_snapshot_reads_only_what_changed(release, northwind, django_assert_max_num_queries):
    keys = [issue_key(organization=northwind, name=f"k{n}", actor=None).api_key for n in range(30)]
    snapshot = load_snapshot()
    revoke_key(api_key=keys[0], actor=None)
    with django_assert_max_num_queries(2):  # the audit rows since the marker, one key
        updated = access.snapshot.update_snapshot(snapshot)
    assert updated.keys[keys[0].key_id].revoked is True
    assert updated.orgs is snapshot.orgs
    assert updated.releases is snapshot.releases


def test_update_snapshot_falls_back_to_a_full_load_for_unknown_changes(release, northwind):
    from django.db import transaction

    from monitoring import audit

    snapshot = load_snapshot()
    with transaction.atomic():
        audit.record("widget.made", actor=None, object_type="widget", object_id="wid_1")
    assert access.snapshot.update_snapshot(snapshot) is None


def test_update_snapshot_falls_back_when_the_chain_does_not_continue(release, northwind):
    snapshot = load_snapshot()
    issue_key(organization=northwind, name="a", actor=None)
    forked = access.snapshot.Snapshot(
        marker=(snapshot.marker[0], "0" * 64),
        keys=snapshot.keys,
        orgs=snapshot.orgs,
        releases=snapshot.releases,
    )
    assert access.snapshot.update_snapshot(forked) is None


def test_store_refresh_updates_incrementally_until_the_full_reload_is_due(release, northwind):
    store = SnapshotStore(full_reload_interval=3600)
    store.refresh()
    first = store.snapshot
    issue_key(organization=northwind, name="a", actor=None)
    assert store.refresh() is True
    assert store.snapshot.loaded_at == first.loaded_at  # an update, not a full load
    assert _same(store.snapshot, load_snapshot())


def test_update_snapshot_loads_the_organization_of_a_new_key(release):
    from tests.factories import make_org

    snapshot = load_snapshot()
    imported = make_org("imported-lab", "research_partner")  # no audit row of its own
    key = issue_key(organization=imported, name="a", actor=None).api_key
    updated = access.snapshot.update_snapshot(snapshot)
    assert updated.orgs[key.organization_id].slug == "imported-lab"
    assert _same(updated, load_snapshot())


# --- the object types audit rows name ----------------------------------------------------


def test_every_object_type_the_services_write_is_an_enum_member(ada):
    from django.core.management import call_command

    from access.keys import rotate_key
    from access.organizations import add_member, update_organization
    from access.tier_changes import expire_verifications
    from access.verifications import revoke_verification
    from monitoring.audit import ObjectType
    from rollout.incidents import file_incident, resolve_incident
    from rollout.reviews import create_review
    from rollout.transitions import pause, resume

    call_command("seed_demo")  # users, orgs, keys, a plan, and a history of reviews and stages
    release = Release.objects.get(name="atlas-2")
    org = Organization.objects.order_by("pk").first()
    rotate_key(api_key=org.keys.first(), actor=ada, grace=timedelta(hours=1))
    update_organization(org, actor=ada, name="Renamed Lab")
    add_member(organization=org, username=ada.username, actor=ada)
    later = timezone.now() + timedelta(days=30)
    revoke_verification(make_verification(org, "monitoring_agreement", expires_at=later), actor=ada)
    make_verification(org, "business_kyc", expires_at=timezone.now() - timedelta(days=1))
    expire_verifications()
    incident = file_incident(release, severity="low", title="odd outputs", actor=ada)
    resolve_incident(incident, actor=ada, resolution="a bad prompt template")
    pause(release, actor=ada, reason="checking the incident")
    resume(release, actor=ada, reason="checked")
    create_review(release, trigger="api", requested_by=ada)

    written = set(AuditEvent.objects.values_list("object_type", flat=True))
    assert written <= {member.value for member in ObjectType}
    assert written >= {
        ObjectType.API_KEY,
        ObjectType.ORGANIZATION,
        ObjectType.MEMBERSHIP,
        ObjectType.VERIFICATION,
        ObjectType.RELEASE,
        ObjectType.INCIDENT,
        ObjectType.USER,
        ObjectType.REVIEW,
    }


def _change_silently(spelling: str, northwind, acme, release) -> str:
    """Change what a row of this type names without an audit row of its own (as a row
    an older version wrote would have), and return the object id the row names."""
    from access.models import ApiKey, Organization, Verification
    from monitoring.audit import ObjectType

    object_type = ObjectType.parse(spelling)
    if object_type is ObjectType.API_KEY:
        key = ApiKey.objects.filter(organization=northwind).get()
        ApiKey.objects.filter(pk=key.pk).update(revoked_at=timezone.now())
        return key.public_id
    if object_type is ObjectType.ORGANIZATION:
        Organization.objects.filter(pk=acme.pk).update(tier="public")
        return acme.public_id
    if object_type is ObjectType.VERIFICATION:
        verification = northwind.verifications.get()
        Verification.objects.filter(pk=verification.pk).update(status=VerificationStatus.REVOKED)
        return verification.public_id
    if object_type in (ObjectType.RELEASE, ObjectType.TUNED_MODEL):
        # A tuned model's row reloads the releases, tuned models served with them.
        Release.objects.filter(pk=release.pk).update(state=ReleaseState.PAUSED)
        return release.public_id
    return "obj_1"  # a kind no decision reads: nothing to change


def _spellings() -> list[str]:
    from monitoring.audit import LEGACY_OBJECT_TYPES, ObjectType

    return [member.value for member in ObjectType] + sorted(LEGACY_OBJECT_TYPES)


@pytest.mark.parametrize("spelling", _spellings())
def test_update_snapshot_applies_a_row_of_every_object_type(spelling, release, northwind, acme):
    from django.db import transaction

    from monitoring import audit

    issue_key(organization=northwind, name="a", actor=None)
    snapshot = load_snapshot()
    object_id = _change_silently(spelling, northwind, acme, release)
    with transaction.atomic():
        audit.record("test.changed", actor=None, object_type=spelling, object_id=object_id)

    updated = access.snapshot.update_snapshot(snapshot)

    assert updated is not None  # applied incrementally, not left to a full load
    assert _same(updated, load_snapshot())
    if audit.ObjectType.parse(spelling) in access.snapshot.NOT_DECIDED_FROM:
        assert (updated.keys, updated.orgs, updated.releases) == (
            snapshot.keys,
            snapshot.orgs,
            snapshot.releases,
        )
    else:  # the silent change is seen only because the row named it
        assert (updated.keys, updated.orgs, updated.releases) != (
            snapshot.keys,
            snapshot.orgs,
            snapshot.releases,
        )
