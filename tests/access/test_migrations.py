"""access/migrations: the data migrations, run with ``manage.py migrate`` on rows written
before them."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.db.models.functions import Lower

from access.models import Organization
from monitoring import audit
from monitoring.models import AuditEvent

BEFORE_LOWER_CASE_SLUGS = "0002_role_groups"


@pytest.fixture
def before_lower_case_slugs(live_db):
    """The access app migrated back to before slugs were lower case; forward again after
    the test, whatever it did, so the rest of the session has the current schema."""
    call_command("migrate", "access", BEFORE_LOWER_CASE_SLUGS, verbosity=0)
    yield
    # What a test left behind, deleted without the ORM's cascade: the apps that depend on
    # access (tuning) were migrated back with it, so their tables are gone until the
    # migrate below brings every app forward again.
    leftovers = Organization.objects.exclude(slug=Lower("slug"))
    leftovers._raw_delete(leftovers.db)
    call_command("migrate", verbosity=0)


def _org(slug: str) -> Organization:
    # The model's validators do not run on create(), and the old schema has no constraint.
    return Organization.objects.create(slug=slug, name=slug, tier="public")


def test_migration_lower_cases_org_slugs_audited(before_lower_case_slugs):
    acme = _org("Acme-Labs")
    _org("globex")

    call_command("migrate", "access", verbosity=0)

    assert list(Organization.objects.values_list("slug", flat=True)) == ["acme-labs", "globex"]
    assert [
        (e.actor, e.object_id, e.data) for e in AuditEvent.objects.filter(action="org.updated")
    ] == [
        (
            "system:migration",
            acme.public_id,
            {"slug": "acme-labs", "changes": {"slug": {"from": "Acme-Labs", "to": "acme-labs"}}},
        )
    ]
    assert audit.verify_chain()[1] is None


def test_migration_stops_when_lower_case_slugs_would_collide(before_lower_case_slugs):
    _org("Acme-Labs")
    _org("acme-labs")

    with pytest.raises(RuntimeError) as refused:
        call_command("migrate", "access", verbosity=0)

    assert str(refused.value) == (
        "cannot lower-case organization slugs: 'Acme-Labs' and 'acme-labs' differ only in"
        " case. Rename all but one of each (for example with the Django shell), update the"
        " rollout plans that name them, and run the migration again."
    )
    assert sorted(Organization.objects.values_list("slug", flat=True)) == [
        "Acme-Labs",
        "acme-labs",
    ]
    assert not AuditEvent.objects.filter(action="org.updated").exists()
