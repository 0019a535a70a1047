"""Make the audit table append-only in the database itself: row UPDATE and DELETE
are refused by triggers, whatever code tries them. TRUNCATE is left to privileges
(docs/operations.md revokes it from the application's role): test databases are
emptied with it. Someone able to drop triggers can still rewrite rows; the hash
chain (``manage.py verify_audit``) is what detects that."""

from django.db import migrations

PG_FORWARD = """
CREATE OR REPLACE FUNCTION stagegate_audit_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'monitoring_auditevent is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER monitoring_auditevent_no_update_delete
    BEFORE UPDATE OR DELETE ON monitoring_auditevent
    FOR EACH ROW EXECUTE FUNCTION stagegate_audit_append_only();
"""
PG_REVERSE = """
DROP TRIGGER IF EXISTS monitoring_auditevent_no_update_delete ON monitoring_auditevent;
DROP FUNCTION IF EXISTS stagegate_audit_append_only();
"""
SQLITE_FORWARD = [
    """CREATE TRIGGER monitoring_auditevent_no_update BEFORE UPDATE ON monitoring_auditevent
       BEGIN SELECT RAISE(ABORT, 'monitoring_auditevent is append-only: UPDATE refused'); END""",
    """CREATE TRIGGER monitoring_auditevent_no_delete BEFORE DELETE ON monitoring_auditevent
       BEGIN SELECT RAISE(ABORT, 'monitoring_auditevent is append-only: DELETE refused'); END""",
]
SQLITE_REVERSE = [
    "DROP TRIGGER IF EXISTS monitoring_auditevent_no_update",
    "DROP TRIGGER IF EXISTS monitoring_auditevent_no_delete",
]


def forward(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(PG_FORWARD, params=None)
    elif schema_editor.connection.vendor == "sqlite":
        for statement in SQLITE_FORWARD:
            schema_editor.execute(statement)


def reverse(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(PG_REVERSE, params=None)
    elif schema_editor.connection.vendor == "sqlite":
        for statement in SQLITE_REVERSE:
            schema_editor.execute(statement)


class Migration(migrations.Migration):
    dependencies = [("monitoring", "0001_initial")]
    operations = [migrations.RunPython(forward, reverse)]
