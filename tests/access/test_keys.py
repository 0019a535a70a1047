from __future__ import annotations

from datetime import timedelta

import pytest
from django.apps import apps
from django.core import serializers
from django.core.management import call_command
from django.utils import timezone

from access import keys
from access.keys import KeyFormatError, KeyRefused, authenticate_key, parse_key
from access.models import ApiKey
from monitoring.models import AuditEvent
from stagegate.errors import Refused


def _dump_database() -> str:
    return "".join(
        serializers.serialize("json", model.objects.all()) for model in apps.get_models()
    )


def test_generated_key_has_prefix_id_and_valid_checksum():
    raw_key, key_id = keys.generate_key()
    assert raw_key.startswith(f"sgk_{key_id}_")
    assert len(raw_key) == len("sgk_") + 16 + 1 + 43 + 6
    assert parse_key(raw_key) == key_id


def test_generated_keys_are_unique():
    generated = {keys.generate_key()[0] for _ in range(500)}
    assert len(generated) == 500


@pytest.mark.parametrize("position", [20, 30, 50, -1])
def test_mistyped_key_fails_checksum(position):
    raw_key, _ = keys.generate_key()
    char = raw_key[position]
    typo = raw_key[:position] + ("A" if char != "A" else "B") + raw_key[position:][1:]
    with pytest.raises(KeyFormatError):
        parse_key(typo)


@pytest.mark.parametrize(
    "text",
    ["", "sk-abc", "sgk_", "Bearer sgk_x", "sgk_" + "a" * 66, "sgk_0123456789abcdef_" + "x" * 49],
)
def test_malformed_key_refused_without_touching_storage(db, django_assert_num_queries, text):
    with django_assert_num_queries(0), pytest.raises(KeyRefused) as refused:
        authenticate_key(text)
    assert refused.value.code == "invalid_key"


def test_made_up_key_with_valid_checksum_is_refused(db):
    raw_key, _ = keys.generate_key()
    with pytest.raises(KeyRefused) as refused:
        authenticate_key(raw_key)
    assert refused.value.code == "invalid_key"


def test_issued_key_authenticates_and_only_its_hash_is_stored(northwind, ada):
    issued = keys.issue_key(organization=northwind, name="ci", actor=ada)
    assert authenticate_key(issued.raw_key).pk == issued.api_key.pk
    secret = issued.raw_key.split("_", 2)[2]
    dump = _dump_database()
    assert issued.raw_key not in dump
    assert secret not in dump
    assert secret[:20] not in dump
    stored = ApiKey.objects.get(pk=issued.api_key.pk)
    assert stored.digest == keys.digest(issued.raw_key)


def test_key_with_right_id_but_wrong_secret_is_refused(northwind, ada):
    issued = keys.issue_key(organization=northwind, name="ci", actor=ada)
    forged, _ = keys.generate_key()
    body = f"sgk_{issued.api_key.key_id}_{forged.split('_', 2)[2][:43]}"
    forged_with_checksum = body + keys._checksum(body)
    with pytest.raises(KeyRefused) as refused:
        authenticate_key(forged_with_checksum)
    assert refused.value.code == "invalid_key"


def test_revoked_key_is_refused_and_revocation_audited(northwind, ada):
    issued = keys.issue_key(organization=northwind, name="ci", actor=ada)
    keys.revoke_key(api_key=issued.api_key, actor=ada, reason="leaked in a notebook")
    with pytest.raises(KeyRefused) as refused:
        authenticate_key(issued.raw_key)
    assert refused.value.code == "key_revoked"
    event = AuditEvent.objects.get(action="key.revoked")
    assert event.object_id == issued.api_key.public_id
    assert event.data["reason"] == "leaked in a notebook"
    assert event.actor == "ada"


def test_revoking_twice_writes_one_audit_row(northwind, ada):
    issued = keys.issue_key(organization=northwind, name="ci", actor=ada)
    keys.revoke_key(api_key=issued.api_key, actor=ada)
    keys.revoke_key(api_key=issued.api_key, actor=ada)
    assert AuditEvent.objects.filter(action="key.revoked").count() == 1


def test_expired_key_is_refused(northwind, ada):
    issued = keys.issue_key(
        organization=northwind, name="ci", actor=ada, expires_at=timezone.now() + timedelta(hours=1)
    )
    later = timezone.now() + timedelta(hours=1, seconds=1)
    with pytest.raises(KeyRefused) as refused:
        authenticate_key(issued.raw_key, now=later)
    assert refused.value.code == "key_expired"


def test_rotation_keeps_old_key_working_for_grace_period(northwind, ada):
    old = keys.issue_key(organization=northwind, name="ci", actor=ada)
    new = keys.rotate_key(api_key=old.api_key, actor=ada, grace=timedelta(hours=24))
    now = timezone.now()
    assert authenticate_key(old.raw_key, now=now + timedelta(hours=23)).pk == old.api_key.pk
    assert authenticate_key(new.raw_key, now=now + timedelta(hours=25)).pk == new.api_key.pk
    with pytest.raises(KeyRefused) as refused:
        authenticate_key(old.raw_key, now=now + timedelta(hours=24, seconds=1))
    assert refused.value.code == "key_expired"
    assert new.api_key.rotated_from_id == old.api_key.pk
    assert (
        AuditEvent.objects.filter(action="key.rotated", object_id=old.api_key.public_id).count()
        == 1
    )


def test_rotation_grace_never_extends_an_earlier_expiry(northwind, ada):
    soon = timezone.now() + timedelta(hours=1)
    old = keys.issue_key(organization=northwind, name="ci", actor=ada, expires_at=soon)
    keys.rotate_key(api_key=old.api_key, actor=ada, grace=timedelta(days=7))
    old.api_key.refresh_from_db()
    assert old.api_key.expires_at == soon


def test_revoked_key_cannot_be_rotated(northwind, ada):
    issued = keys.issue_key(organization=northwind, name="ci", actor=ada)
    keys.revoke_key(api_key=issued.api_key, actor=ada)
    with pytest.raises(Refused, match="revoked") as refused:
        keys.rotate_key(api_key=issued.api_key, actor=ada, grace=timedelta(hours=1))
    assert (refused.value.code, refused.value.status) == ("key_not_rotatable", 409)


def test_last_used_written_at_most_once_per_interval(northwind, ada):
    issued = keys.issue_key(organization=northwind, name="ci", actor=ada)
    now = timezone.now()
    assert keys.touch_last_used(issued.api_key, now=now, interval_seconds=60)
    stale_copy = ApiKey.objects.get(pk=issued.api_key.pk)
    stale_copy.last_used_at = None  # another worker's cached copy, read before the write
    assert not keys.touch_last_used(
        stale_copy, now=now + timedelta(seconds=30), interval_seconds=60
    )
    assert keys.touch_last_used(
        issued.api_key, now=now + timedelta(seconds=61), interval_seconds=60
    )
    issued.api_key.refresh_from_db()
    assert issued.api_key.last_used_at == now + timedelta(seconds=61)


def test_issue_key_command_prints_key_once_and_stores_hash(northwind, capsys):
    call_command("issue_key", "northwind-research", "--name", "batch")
    out, err = capsys.readouterr()
    raw_key = out.strip()
    assert authenticate_key(raw_key).organization == northwind
    assert "only time" in err
    assert raw_key not in _dump_database()


def test_revoke_and_rotate_commands_by_prefix(northwind, capsys):
    call_command("issue_key", "northwind-research")
    first = capsys.readouterr().out.strip()
    prefix = first[: len("sgk_") + 16]
    call_command("rotate_key", prefix, "--grace-hours", "0")
    second = capsys.readouterr().out.strip()
    with pytest.raises(KeyRefused) as refused:
        authenticate_key(first, now=timezone.now() + timedelta(seconds=1))
    assert refused.value.code == "key_expired"
    call_command("revoke_key", second[: len("sgk_") + 16], "--reason", "done")
    with pytest.raises(KeyRefused) as refused:
        authenticate_key(second)
    assert refused.value.code == "key_revoked"


def test_key_commands_reject_unknown_references(db):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="no organization"):
        call_command("issue_key", "no-such-org")
    with pytest.raises(CommandError, match="no API key"):
        call_command("revoke_key", "key_0000000000000000")


@pytest.mark.parametrize("name", ["", "   ", "x" * 101])
def test_issue_key_command_refuses_bad_name_and_issues_nothing(northwind, name):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="1 to 100 characters"):
        call_command("issue_key", "northwind-research", "--name", name)
    assert not ApiKey.objects.exists()
