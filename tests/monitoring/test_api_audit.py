"""/api/audit/: the audit log, read-only, for staff."""

from __future__ import annotations

import pytest

from access import keys
from monitoring.audit import GENESIS_HASH
from monitoring.models import AuditEvent


@pytest.fixture
def events(ada, northwind):
    """key.issued then key.revoked for one key."""
    api_key = keys.issue_key(organization=northwind, name="ci", actor=ada).api_key
    keys.revoke_key(api_key=api_key, actor=ada, reason="test")
    return api_key


@pytest.mark.parametrize("who", ["ada", "rita", "vera"])
def test_staff_read_the_log_newest_first(request, login_as, events, who):
    response = login_as(request.getfixturevalue(who)).get("/api/audit/")

    assert response.status_code == 200
    rows = response.json()["results"]
    assert [r["action"] for r in rows] == ["key.revoked", "key.issued"]
    assert [r["seq"] for r in rows] == [2, 1]
    assert rows[1]["prev_hash"] == GENESIS_HASH
    assert rows[0]["prev_hash"] == rows[1]["hash"]


def test_audit_row_shows_the_whole_record(login_as, ada, events):
    event = AuditEvent.objects.get(seq=1)

    response = login_as(ada).get("/api/audit/1/")

    assert response.status_code == 200
    body = response.json()
    assert {k: v for k, v in body.items() if k != "created_at"} == {
        "seq": 1,
        "actor": "ada",
        "action": "key.issued",
        "object_type": "api_key",
        "object_id": events.public_id,
        "data": event.data,
        "hash": event.hash,
        "prev_hash": GENESIS_HASH,
    }


def test_filters_by_action_and_object(login_as, ada, acme, events):
    keys.issue_key(organization=acme, name="other", actor=ada)
    client = login_as(ada)

    by_action = client.get("/api/audit/", {"action": "key.issued"}).json()["results"]
    by_object = client.get("/api/audit/", {"object_id": events.public_id}).json()["results"]

    assert [r["seq"] for r in by_action] == [3, 1]
    assert [r["action"] for r in by_object] == ["key.revoked", "key.issued"]


@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_the_log_cannot_be_written_through_the_api(login_as, ada, events, method):
    url = "/api/audit/" if method == "post" else "/api/audit/1/"

    response = getattr(login_as(ada), method)(url, {"action": "forged"}, format="json")

    assert response.status_code == 405
    assert AuditEvent.objects.count() == 2


@pytest.mark.parametrize("who", ["oscar", "nobody"])
def test_org_admins_and_others_cannot_read_the_log(request, login_as, events, who):
    response = login_as(request.getfixturevalue(who)).get("/api/audit/")

    assert response.status_code == 403
