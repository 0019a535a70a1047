from __future__ import annotations

from contextlib import contextmanager

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import DatabaseError, connection, transaction

from monitoring import audit
from monitoring.models import AuditEvent


def _write(n: int) -> list[AuditEvent]:
    events = []
    for i in range(n):
        with transaction.atomic():
            events.append(
                audit.record(
                    "test.event",
                    actor="system:test",
                    object_type="t",
                    object_id=str(i),
                    data={"i": i},
                )
            )
    return events


@contextmanager
def _triggers_off():
    """A cursor that changes the table behind the triggers' back, as an attacker with
    DDL rights could. (On SQLite the triggers stay dropped for the rest of the test.)"""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("ALTER TABLE monitoring_auditevent DISABLE TRIGGER USER")
            yield cursor
            cursor.execute("ALTER TABLE monitoring_auditevent ENABLE TRIGGER USER")
        else:
            cursor.execute("DROP TRIGGER IF EXISTS monitoring_auditevent_no_update")
            cursor.execute("DROP TRIGGER IF EXISTS monitoring_auditevent_no_delete")
            yield cursor


def _tamper(sql: str, params=()) -> None:
    with _triggers_off() as cursor:
        cursor.execute(sql, params)


def test_chain_of_untouched_rows_verifies(db):
    _write(5)
    assert audit.verify_chain() == (5, None)


def test_rows_link_to_their_predecessor(db):
    first, second = _write(2)
    assert first.prev_hash == audit.GENESIS_HASH
    assert second.prev_hash == first.hash
    assert (first.seq, second.seq) == (1, 2)


def test_database_refuses_update_of_audit_rows(db):
    _write(1)
    with pytest.raises(DatabaseError), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("UPDATE monitoring_auditevent SET actor = 'mallory'")
    assert AuditEvent.objects.get().actor == "system:test"


def test_database_refuses_delete_of_audit_rows(db):
    _write(1)
    with pytest.raises(DatabaseError), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("DELETE FROM monitoring_auditevent")
    assert AuditEvent.objects.count() == 1


def test_verify_audit_names_first_edited_row(db):
    _write(4)
    _tamper("UPDATE monitoring_auditevent SET data = %s WHERE seq = 3", ['{"i": 99}'])
    checked, broken = audit.verify_chain()
    assert (checked, broken.seq) == (2, 3)
    with pytest.raises(CommandError, match=r"broken at row #3"):
        call_command("verify_audit")


def test_verify_audit_names_removed_row(db):
    _write(4)
    _tamper("DELETE FROM monitoring_auditevent WHERE seq = 2")
    with pytest.raises(CommandError, match=r"row #2: row #2 is missing"):
        call_command("verify_audit")


def test_verify_audit_detects_rehashed_row_by_its_successor(db):
    events = _write(3)
    forged = events[1]
    forged.actor = "mallory"
    forged.hash = audit.compute_hash(forged)
    _tamper(
        "UPDATE monitoring_auditevent SET actor = %s, hash = %s WHERE seq = 2",
        [forged.actor, forged.hash],
    )
    _, broken = audit.verify_chain()
    assert broken.seq == 3
    assert broken.reason == "prev_hash does not match the row before"


def test_verify_audit_command_reports_intact_chain(db, capsys):
    _write(3)
    call_command("verify_audit")
    assert "3 rows verified" in capsys.readouterr().out


@pytest.mark.django_db(transaction=True)
def test_record_outside_a_transaction_is_refused():
    with pytest.raises(RuntimeError, match="inside the transaction"):
        audit.record("x", actor=None, object_type="t", object_id="1")
    assert AuditEvent.objects.count() == 0


def test_audit_row_rolls_back_with_its_change(db):
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        audit.record("x", actor=None, object_type="t", object_id="1")
        1 / 0  # noqa: B018
    assert AuditEvent.objects.count() == 0
