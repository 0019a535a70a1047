"""Who may reach which object through the admin API: organization isolation, CSRF,
deny by default, the one error shape, and the published OpenAPI schema."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone
from rest_framework.test import APIClient

from access import keys
from access.models import ApiKey, Membership, Verification, VerificationStatus
from monitoring.models import AuditEvent
from stagegate.api import exception_handler


def _future() -> str:
    return (timezone.now() + timedelta(days=90)).isoformat()


@pytest.fixture
def objects(ada, northwind, acme, oscar, olga, nobody):
    """One key, verification and membership in each of northwind and acme."""
    ids = {}
    for label, org, admin in (("nw", northwind, oscar), ("acme", acme, olga)):
        ids[f"{label}_org"] = org.public_id
        ids[f"{label}_key"] = keys.issue_key(
            organization=org, name="ci", actor=ada
        ).api_key.public_id
        ids[f"{label}_ver"] = org.verifications.get().public_id
        ids[f"{label}_mem"] = Membership.objects.get(organization=org, user=admin).public_id
    return ids


# (method, url, body): every endpoint that reaches one organization's objects.
ORG_ENDPOINTS = {
    "key retrieve": ("get", "/api/keys/{key}/", None),
    "key revoke": ("post", "/api/keys/{key}/revoke/", {"reason": "test"}),
    "key rotate": ("post", "/api/keys/{key}/rotate/", {}),
    "key create": ("post", "/api/keys/", {"organization": "{org}", "name": "new"}),
    "verification retrieve": ("get", "/api/verifications/{ver}/", None),
    "verification revoke": ("post", "/api/verifications/{ver}/revoke/", {"reason": "test"}),
    "verification validate": ("post", "/api/verifications/{ver}/validate/", {}),
    "verification create": (
        "post",
        "/api/verifications/",
        {"organization": "{org}", "kind": "business_kyc", "expires_at": "{future}"},
    ),
    "members list": ("get", "/api/orgs/{org}/members/", None),
    "member add": ("post", "/api/orgs/{org}/members/", {"username": "nobody"}),
    "member retrieve": ("get", "/api/orgs/{org}/members/{mem}/", None),
    "member remove": ("delete", "/api/orgs/{org}/members/{mem}/", None),
    "org retrieve": ("get", "/api/orgs/{org}/", None),
    "org update": ("patch", "/api/orgs/{org}/", {"name": "Renamed"}),
}

# What olga (org admin of acme) gets on her own organization's objects: the same
# endpoints work, or refuse with 403 where the action needs a rollout admin.
OWN_ORG_STATUS = {
    "key retrieve": 200,
    "key revoke": 200,
    "key rotate": 201,
    "key create": 201,
    "verification retrieve": 200,
    "verification revoke": 403,
    "verification validate": 403,
    "verification create": 403,
    "members list": 200,
    "member add": 201,
    "member retrieve": 200,
    "member remove": 204,
    "org retrieve": 200,
    "org update": 403,
}


def _fill(value, objects: dict, org: str):
    if isinstance(value, dict):
        return {k: _fill(v, objects, org) for k, v in value.items()}
    if isinstance(value, str):
        return value.format(
            org=objects[f"{org}_org"],
            key=objects[f"{org}_key"],
            ver=objects[f"{org}_ver"],
            mem=objects[f"{org}_mem"],
            future=_future(),
        )
    return value


def _call(client, endpoint: str, objects: dict, org: str):
    method, url, body = ORG_ENDPOINTS[endpoint]
    return getattr(client, method)(
        _fill(url, objects, org), _fill(body, objects, org), format="json"
    )


# --- 1. organization isolation ------------------------------------------------------------


@pytest.mark.parametrize("endpoint", sorted(ORG_ENDPOINTS))
def test_org_admin_gets_404_on_another_orgs_objects(login_as, olga, objects, endpoint):
    audit_rows = AuditEvent.objects.count()
    key_rows = ApiKey.objects.count()
    states = list(Verification.objects.values_list("status", flat=True).order_by("pk"))
    members = Membership.objects.count()

    response = _call(login_as(olga), endpoint, objects, "nw")

    assert response.status_code == 404
    assert response.json() == {"error": {"code": "not_found", "message": "Not found."}}
    assert AuditEvent.objects.count() == audit_rows
    assert ApiKey.objects.count() == key_rows
    assert list(Verification.objects.values_list("status", flat=True).order_by("pk")) == states
    assert Membership.objects.count() == members
    nw_key = ApiKey.objects.get(public_id=objects["nw_key"])
    assert (nw_key.revoked_at, nw_key.expires_at) == (None, None)


@pytest.mark.parametrize("endpoint", sorted(ORG_ENDPOINTS))
def test_org_admin_reaches_own_orgs_objects(login_as, olga, objects, endpoint):
    response = _call(login_as(olga), endpoint, objects, "acme")

    assert response.status_code == OWN_ORG_STATUS[endpoint]


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("/api/keys/", "public_id"),
        ("/api/verifications/", "public_id"),
        ("/api/orgs/", "public_id"),
    ],
)
def test_org_admin_lists_only_own_orgs_objects(login_as, olga, objects, url, field):
    response = login_as(olga).get(url)

    assert response.status_code == 200
    expected = {
        "/api/keys/": [objects["acme_key"]],
        "/api/verifications/": [objects["acme_ver"]],
        "/api/orgs/": [objects["acme_org"]],
    }[url]
    assert [row[field] for row in response.json()["results"]] == expected


@pytest.mark.parametrize("url", ["/api/keys/", "/api/verifications/"])
def test_org_admin_filtering_by_another_org_lists_nothing(login_as, olga, objects, url):
    response = login_as(olga).get(url, {"organization": objects["nw_org"]})

    assert response.status_code == 200
    assert response.json()["results"] == []


def test_reviewer_who_administers_an_org_writes_only_to_it(login_as, rita, acme, objects):
    Membership.objects.create(user=rita, organization=acme, role="org_admin")
    client = login_as(rita)

    other = client.post(f"/api/keys/{objects['nw_key']}/revoke/", {}, format="json")
    own = client.post(f"/api/keys/{objects['acme_key']}/revoke/", {}, format="json")

    assert (other.status_code, own.status_code) == (404, 200)


# --- 3. CSRF on session-authenticated writes -------------------------------------------------


def test_session_write_without_csrf_token_is_refused(ada, northwind):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(ada)

    response = client.post(
        "/api/keys/", {"organization": northwind.public_id, "name": "ci"}, format="json"
    )

    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "permission_denied"
    assert error["message"].startswith("CSRF Failed")
    assert ApiKey.objects.count() == 0


def test_session_write_with_csrf_token_succeeds(ada, northwind):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(ada)
    client.get("/admin/login/")
    token = client.cookies["csrftoken"].value

    response = client.post(
        "/api/keys/",
        {"organization": northwind.public_id, "name": "ci"},
        format="json",
        headers={"X-CSRFToken": token},
    )

    assert response.status_code == 201
    assert ApiKey.objects.count() == 1


# --- 4. deny by default -----------------------------------------------------------------------

LIST_ENDPOINTS = [
    "/api/orgs/",
    "/api/orgs/{org}/members/",
    "/api/verifications/",
    "/api/keys/",
    "/api/releases/",
    "/api/releases/{release}/plans/",
    "/api/transitions/",
    "/api/audit/",
]

EVERY_ENDPOINT = [
    *(("get", url) for url in LIST_ENDPOINTS),
    ("get", "/api/"),
    ("get", "/api/orgs/{org}/"),
    ("patch", "/api/orgs/{org}/"),
    ("post", "/api/orgs/"),
    ("post", "/api/orgs/{org}/members/"),
    ("get", "/api/orgs/{org}/members/{mem}/"),
    ("delete", "/api/orgs/{org}/members/{mem}/"),
    ("post", "/api/verifications/"),
    ("get", "/api/verifications/{ver}/"),
    ("post", "/api/verifications/{ver}/revoke/"),
    ("post", "/api/verifications/{ver}/validate/"),
    ("post", "/api/keys/"),
    ("get", "/api/keys/{key}/"),
    ("post", "/api/keys/{key}/revoke/"),
    ("post", "/api/keys/{key}/rotate/"),
    ("get", "/api/releases/{release}/"),
    ("get", "/api/releases/{release}/plans/1/"),
    ("post", "/api/plans/validate/"),
    ("post", "/api/plans/apply/"),
    ("get", "/api/transitions/{transition}/"),
    ("get", "/api/audit/1/"),
]

WRITE_ENDPOINTS = [
    (method, url) for method, url in EVERY_ENDPOINT if method != "get" and "validate" not in url
] + [
    ("post", "/api/releases/"),
    ("post", "/api/transitions/"),
    ("post", "/api/audit/"),
    ("post", "/api/verifications/{ver}/validate/"),
]


@pytest.fixture
def ids(objects, release):
    return {
        "org": objects["nw_org"],
        "mem": objects["nw_mem"],
        "ver": objects["nw_ver"],
        "key": objects["nw_key"],
        "release": release.public_id,
        "transition": release.transitions.get().public_id,
    }


@pytest.mark.parametrize(("method", "url"), EVERY_ENDPOINT)
def test_anonymous_is_refused_everywhere(api, ids, method, url):
    response = getattr(api, method)(url.format(**ids), {}, format="json")

    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Cookie ")
    assert response.json()["error"]["code"] == "not_authenticated"


@pytest.mark.parametrize("url", LIST_ENDPOINTS)
def test_user_without_role_is_refused_every_list(login_as, nobody, ids, url):
    response = login_as(nobody).get(url.format(**ids))

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"


@pytest.mark.parametrize("who", ["rita", "vera"])
@pytest.mark.parametrize(("method", "url"), WRITE_ENDPOINTS)
def test_reviewer_and_viewer_cannot_write(request, login_as, ids, who, method, url):
    user = request.getfixturevalue(who)
    audit_rows = AuditEvent.objects.count()

    response = getattr(login_as(user), method)(url.format(**ids), {}, format="json")

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"
    assert AuditEvent.objects.count() == audit_rows


@pytest.mark.parametrize(
    "url",
    [
        "/api/releases/",
        "/api/releases/{release}/",
        "/api/releases/{release}/plans/",
        "/api/releases/{release}/plans/1/",
        "/api/transitions/",
        "/api/transitions/{transition}/",
        "/api/audit/",
        "/api/audit/1/",
    ],
)
def test_org_admin_cannot_read_releases_transitions_or_audit(login_as, oscar, ids, url):
    response = login_as(oscar).get(url.format(**ids))

    assert response.status_code == 403


def test_org_admin_cannot_validate_plans(login_as, oscar):
    response = login_as(oscar).post("/api/plans/validate/", {"document": {}}, format="json")

    assert response.status_code == 403


# --- the error shape ----------------------------------------------------------------------------


def test_validation_error_has_code_invalid_and_field_details(login_as, ada):
    response = login_as(ada).post("/api/keys/", {}, format="json")

    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "code": "invalid",
            "message": "invalid input: organization: This field is required.",
            "details": {
                "organization": ["This field is required."],
                "name": ["This field is required."],
            },
        }
    }


def test_method_not_allowed_has_the_error_shape(login_as, ada, northwind):
    response = login_as(ada).delete(f"/api/orgs/{northwind.public_id}/")

    assert response.status_code == 405
    assert response.json() == {
        "error": {"code": "method_not_allowed", "message": 'Method "DELETE" not allowed.'}
    }


def test_malformed_json_is_a_parse_error(login_as, ada):
    response = login_as(ada).post("/api/keys/", data="{not json", content_type="application/json")

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "parse_error"


def test_unknown_exceptions_are_left_to_django():
    assert exception_handler(RuntimeError("boom"), {}) is None


def test_rotating_a_revoked_key_is_a_conflict(login_as, ada, northwind):
    api_key = keys.issue_key(organization=northwind, name="ci", actor=ada).api_key
    keys.revoke_key(api_key=api_key, actor=ada)

    response = login_as(ada).post(f"/api/keys/{api_key.public_id}/rotate/", {}, format="json")

    assert response.status_code == 409
    assert response.json() == {
        "error": {
            "code": "key_not_rotatable",
            "message": f"key {api_key.prefix} is revoked and cannot be rotated",
        }
    }


# --- 7. the OpenAPI schema ---------------------------------------------------------------------


def test_schema_renders_and_lists_key_endpoints(api):
    response = api.get("/api/schema/", {"format": "json"})

    assert response.status_code == 200
    paths = response.json()["paths"]
    assert sorted(p for p in paths if p.startswith("/api/keys/")) == [
        "/api/keys/",
        "/api/keys/{public_id}/",
        "/api/keys/{public_id}/revoke/",
        "/api/keys/{public_id}/rotate/",
    ]


def test_schema_validates_without_warnings(tmp_path):
    call_command(
        "spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml")
    )

    assert "/api/plans/apply/" in (tmp_path / "schema.yaml").read_text()


def test_valid_verification_status_is_unchanged_by_refused_revoke(login_as, olga, objects):
    """An org admin's revoke of a verification of their own organization is refused."""
    login_as(olga).post(f"/api/verifications/{objects['acme_ver']}/revoke/", {}, format="json")

    assert Verification.objects.get(public_id=objects["acme_ver"]).status == (
        VerificationStatus.VALID
    )
