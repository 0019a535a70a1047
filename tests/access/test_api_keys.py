"""/api/keys/: issuing shows the raw key once, and only there; revoke and rotate."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.apps import apps
from django.core import serializers
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from access import keys
from access.models import ApiKey
from monitoring.models import AuditEvent
from tests.factories import make_org

KEY_FIELDS = [
    "public_id",
    "organization",
    "name",
    "prefix",
    "status",
    "created_at",
    "expires_at",
    "revoked_at",
    "revoked_reason",
    "last_used_at",
    "rotated_from",
]


def _dump_database() -> str:
    return "".join(
        serializers.serialize("json", model.objects.all()) for model in apps.get_models()
    )


def _issue(client, organization, name="ci", **extra):
    return client.post(
        "/api/keys/", {"organization": organization.public_id, "name": name, **extra}, format="json"
    )


# --- issuing ---------------------------------------------------------------------------------


def test_issue_returns_the_raw_key_once(login_as, ada, northwind):
    response = _issue(login_as(ada), northwind)

    assert response.status_code == 201
    assert response["Cache-Control"] == "no-store"
    body = response.json()
    assert list(body) == [*KEY_FIELDS, "key"]
    api_key = ApiKey.objects.get()
    assert body["public_id"] == api_key.public_id
    assert body["organization"] == northwind.public_id
    assert body["status"] == "active"
    assert body["key"].startswith(body["prefix"] + "_")
    assert keys.authenticate_key(body["key"]) == api_key


def test_raw_key_is_stored_nowhere(login_as, ada, northwind):
    client = login_as(ada)
    raw_key = _issue(client, northwind).json()["key"]
    secret = raw_key.rsplit("_", 1)[1]
    assert len(secret) == 49

    assert secret not in _dump_database()
    audit_rows = serializers.serialize("json", AuditEvent.objects.all())
    assert "key.issued" in audit_rows
    assert secret not in audit_rows
    public_id = ApiKey.objects.get().public_id
    for url in (f"/api/keys/{public_id}/", "/api/keys/", f"/api/audit/?object_id={public_id}"):
        response = client.get(url)
        assert response.status_code == 200
        assert secret not in response.content.decode()


def test_key_metadata_never_includes_key_or_digest(login_as, vera, ada, northwind):
    api_key = keys.issue_key(organization=northwind, name="ci", actor=ada).api_key

    body = login_as(vera).get(f"/api/keys/{api_key.public_id}/").json()

    assert list(body) == KEY_FIELDS
    assert api_key.digest not in str(body)


def test_org_admin_issues_a_key_for_their_org(login_as, oscar, northwind):
    response = _issue(login_as(oscar), northwind)

    assert response.status_code == 201
    assert ApiKey.objects.get().created_by == oscar


def test_issue_with_expiry_in_the_past_is_invalid(login_as, ada, northwind):
    past = (timezone.now() - timedelta(hours=1)).isoformat()

    response = _issue(login_as(ada), northwind, expires_at=past)

    assert response.status_code == 400
    assert response.json()["error"]["details"] == {"expires_at": ["must be in the future"]}
    assert ApiKey.objects.count() == 0


def test_issue_for_unknown_org_is_404(login_as, ada):
    response = login_as(ada).post(
        "/api/keys/", {"organization": "org_doesnotexist00000", "name": "ci"}, format="json"
    )

    assert response.status_code == 404


@pytest.mark.parametrize("who", ["rita", "vera"])
def test_reviewers_and_viewers_read_keys(request, login_as, ada, northwind, acme, who):
    issued = [keys.issue_key(organization=org, name="ci", actor=ada) for org in (northwind, acme)]

    response = login_as(request.getfixturevalue(who)).get("/api/keys/")

    assert response.status_code == 200
    assert [row["public_id"] for row in response.json()["results"]] == [
        i.api_key.public_id for i in reversed(issued)
    ]


def test_list_filters_by_organization(login_as, ada, northwind, acme):
    nw_key = keys.issue_key(organization=northwind, name="ci", actor=ada).api_key
    keys.issue_key(organization=acme, name="ci", actor=ada)

    response = login_as(ada).get("/api/keys/", {"organization": northwind.public_id})

    assert [row["public_id"] for row in response.json()["results"]] == [nw_key.public_id]


# --- revoking and rotating ------------------------------------------------------------------


def test_revoke_takes_effect_and_is_audited(login_as, ada, northwind):
    issued = keys.issue_key(organization=northwind, name="ci", actor=ada)

    response = login_as(ada).post(
        f"/api/keys/{issued.api_key.public_id}/revoke/", {"reason": "leaked"}, format="json"
    )

    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["revoked_reason"]) == ("revoked", "leaked")
    with pytest.raises(keys.KeyRefused) as refused:
        keys.authenticate_key(issued.raw_key)
    assert refused.value.code == "key_revoked"
    event = AuditEvent.objects.get(action="key.revoked")
    assert (event.actor, event.object_id, event.data["reason"]) == (
        "ada",
        issued.api_key.public_id,
        "leaked",
    )


def test_rotate_returns_successor_and_keeps_old_key_for_the_grace(login_as, ada, northwind):
    old = keys.issue_key(organization=northwind, name="ci", actor=ada)
    before = timezone.now()

    response = login_as(ada).post(
        f"/api/keys/{old.api_key.public_id}/rotate/", {"grace_hours": 2}, format="json"
    )

    assert response.status_code == 201
    body = response.json()
    assert body["rotated_from"] == old.api_key.public_id
    assert keys.authenticate_key(body["key"]).public_id == body["public_id"]
    assert keys.authenticate_key(old.raw_key) == old.api_key
    old.api_key.refresh_from_db()
    grace_end = old.api_key.expires_at - before
    assert timedelta(hours=2) <= grace_end < timedelta(hours=2, minutes=1)
    assert body["key"].rsplit("_", 1)[1] not in _dump_database()


def test_rotate_without_grace_uses_the_setting(login_as, ada, northwind, settings):
    settings.STAGEGATE_ROTATION_GRACE_HOURS = 5
    old = keys.issue_key(organization=northwind, name="ci", actor=ada).api_key
    before = timezone.now()

    response = login_as(ada).post(f"/api/keys/{old.public_id}/rotate/", {}, format="json")

    assert response.status_code == 201
    old.refresh_from_db()
    assert timedelta(hours=5) <= old.expires_at - before < timedelta(hours=5, minutes=1)


def test_rotate_with_zero_grace_expires_the_old_key_at_once(login_as, ada, northwind):
    old = keys.issue_key(organization=northwind, name="ci", actor=ada)

    response = login_as(ada).post(
        f"/api/keys/{old.api_key.public_id}/rotate/", {"grace_hours": 0}, format="json"
    )

    assert response.status_code == 201
    listed = login_as(ada).get(f"/api/keys/{old.api_key.public_id}/").json()
    assert listed["status"] == "expired"
    assert parse_datetime(listed["expires_at"]) <= timezone.now()


def test_rotating_twice_is_a_conflict(login_as, ada, northwind):
    old = keys.issue_key(organization=northwind, name="ci", actor=ada).api_key
    client = login_as(ada)
    client.post(f"/api/keys/{old.public_id}/rotate/", {}, format="json")
    key_rows = ApiKey.objects.count()

    response = client.post(f"/api/keys/{old.public_id}/rotate/", {}, format="json")

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "key_not_rotatable"
    assert ApiKey.objects.count() == key_rows


def test_rotate_with_negative_grace_is_invalid(login_as, ada, northwind):
    old = keys.issue_key(organization=northwind, name="ci", actor=ada).api_key

    response = login_as(ada).post(
        f"/api/keys/{old.public_id}/rotate/", {"grace_hours": -1}, format="json"
    )

    assert response.status_code == 400
    assert list(response.json()["error"]["details"]) == ["grace_hours"]


# --- 6. the list does not grow queries with rows ---------------------------------------------


@pytest.mark.parametrize("who", ["ada", "oscar"])
def test_key_list_queries_do_not_grow_with_rows(
    request, login_as, ada, northwind, django_assert_num_queries, who
):
    client = login_as(request.getfixturevalue(who))
    for i in range(3):
        keys.issue_key(organization=northwind, name=f"k{i}", actor=ada)
    with CaptureQueriesContext(connection) as three:
        assert len(client.get("/api/keys/").json()["results"]) == 3
    # 17 more keys, 10 of them rotated (a successor each, with rotated_from set): 30 in all.
    for i in range(17):
        other = make_org(f"org-{i}", "public") if who == "ada" else northwind
        api_key = keys.issue_key(organization=other, name=f"k{i}", actor=ada).api_key
        if i < 10:
            keys.rotate_key(api_key=api_key, actor=ada, grace=timedelta(hours=1))

    with django_assert_num_queries(len(three.captured_queries)):
        results = client.get("/api/keys/").json()["results"]
    assert len(results) == 30
