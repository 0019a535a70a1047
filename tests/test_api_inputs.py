"""Bad input to the admin API gets a 4xx in the one error shape, never a 500 nor
Django's HTML page: crafted pagination cursors, NUL and control characters in
filters and path ids, NUL in a plan, a missing required field, ids with a dot, an
unknown filter value; and an anonymous caller gets 401 with ``WWW-Authenticate``.

These are the cases schemathesis and hand probing found (issue 13, defects 5 and 7);
the NUL cases matter on PostgreSQL, whose text columns refuse NUL, and pass on both.
"""

from __future__ import annotations

import base64
import copy

import pytest
import yaml

from access import keys
from access.models import ApiKey, Organization
from monitoring import audit
from monitoring.models import AuditEvent
from rollout.models import RolloutPlan
from tests.factories import EXAMPLE_PLAN, make_org


def _cursor(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def ids(release, northwind, oscar):
    return {
        "org": northwind.public_id,
        "release": release.public_id,
        "incident": "inc_x",
    }


# Every list endpoint: each is paginated by a cursor over its own ordering field.
LIST_ENDPOINTS = [
    "/api/orgs/",
    "/api/orgs/{org}/members/",
    "/api/verifications/",
    "/api/keys/",
    "/api/releases/",
    "/api/releases/{release}/plans/",
    "/api/transitions/",
    "/api/reviews/",
    "/api/approvals/",
    "/api/incidents/",
    "/api/audit/",
]

# Endpoints ordered by a text field take any text as a position; the others take only
# a value of their field's type.
TEXT_ORDERED = {"/api/orgs/", "/api/releases/"}
MISTYPED_CURSORS = {
    "word": _cursor("p=abc"),
    "impossible date": _cursor("p=2026-13-45"),
    "huge number": _cursor("p=99999999999999999999999"),
    "year 9999 with offset": _cursor("p=9999-12-31T23:59:59-05:00"),
}
BROKEN_CURSORS = {
    "nul": _cursor("p=a\x00b"),
    "control character": _cursor("p=\x1b"),
    "bad offset": _cursor("o=x"),
    "not utf-8": base64.b64encode(b"p=\xff\xfe").decode(),
}


def _assert_invalid_cursor(response) -> None:
    assert response.status_code == 400
    assert response.json() == {"error": {"code": "invalid_cursor", "message": "Invalid cursor."}}


@pytest.mark.parametrize("cursor", list(BROKEN_CURSORS.values()), ids=list(BROKEN_CURSORS))
@pytest.mark.parametrize("url", LIST_ENDPOINTS)
def test_broken_cursor_is_a_400(login_as, ada, ids, url, cursor):
    _assert_invalid_cursor(login_as(ada).get(url.format(**ids), {"cursor": cursor}))


@pytest.mark.parametrize("cursor", list(MISTYPED_CURSORS.values()), ids=list(MISTYPED_CURSORS))
@pytest.mark.parametrize("url", [url for url in LIST_ENDPOINTS if url not in TEXT_ORDERED])
def test_cursor_position_of_the_wrong_type_is_a_400(login_as, ada, ids, url, cursor):
    _assert_invalid_cursor(login_as(ada).get(url.format(**ids), {"cursor": cursor}))


@pytest.mark.parametrize("url", sorted(TEXT_ORDERED))
def test_any_word_is_a_position_in_a_text_ordering(login_as, ada, url):
    response = login_as(ada).get(url, {"cursor": MISTYPED_CURSORS["word"]})

    assert (response.status_code, response.json()["results"]) == (200, [])


def _walk(client, url: str, field: str) -> list:
    seen, page = [], client.get(url).json()
    seen += [row[field] for row in page["results"]]
    while page["next"]:
        page = client.get(page["next"]).json()
        seen += [row[field] for row in page["results"]]
    return seen


def test_the_cursors_the_api_gives_page_through_everything(login_as, ada):
    slugs = [f"org-{number:03}" for number in range(60)]
    for slug in slugs:
        make_org(slug, "public")
    for number in range(60):
        audit.record("test.paged", actor=ada, object_type="test", object_id=str(number))
    client = login_as(ada)

    assert _walk(client, "/api/orgs/", "slug") == slugs
    paged = [row for row in _walk(client, "/api/audit/", "object_id") if row.isdigit()]
    assert paged == [str(number) for number in reversed(range(60))]


# --- NUL and control characters in filters and ids --------------------------------------------

CONTROL_CHARACTERS = ["\x00", "a\x00b", "\x1f", "\x7f"]
FILTERS = [
    ("/api/keys/", "organization"),
    ("/api/verifications/", "organization"),
    ("/api/transitions/", "release"),
    ("/api/reviews/", "release"),
    ("/api/incidents/", "release"),
    ("/api/incidents/", "status"),
    ("/api/audit/", "action"),
    ("/api/audit/", "object_id"),
]


@pytest.mark.parametrize("value", CONTROL_CHARACTERS, ids=repr)
@pytest.mark.parametrize(("url", "param"), FILTERS)
def test_control_character_in_a_filter_is_a_400(login_as, ada, url, param, value):
    response = login_as(ada).get(url, {param: value})

    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["details"]) == (
        "invalid",
        {param: ["Control characters are not allowed."]},
    )


@pytest.mark.parametrize("value", CONTROL_CHARACTERS, ids=repr)
def test_control_character_in_any_query_parameter_is_a_400(login_as, ada, value):
    response = login_as(ada).get("/api/orgs/", {"anything": value})

    assert response.status_code == 400
    assert response.json()["error"]["details"] == {
        "anything": ["Control characters are not allowed."]
    }


ID_PATHS = [
    "/api/orgs/{id}/",
    "/api/orgs/{id}/members/",
    "/api/orgs/{org}/members/{id}/",
    "/api/verifications/{id}/",
    "/api/keys/{id}/",
    "/api/keys/{id}/revoke/",
    "/api/releases/{id}/",
    "/api/releases/{id}/plans/",
    "/api/transitions/{id}/",
    "/api/reviews/{id}/",
    "/api/approvals/{id}/",
    "/api/incidents/{id}/",
    "/api/audit/{id}/",
]
BAD_IDS = ["org_%00", "%00", "org_%1F", "a.b", "org_x.y.z", "..."]


@pytest.mark.parametrize("bad_id", BAD_IDS)
@pytest.mark.parametrize("path", ID_PATHS)
def test_bad_id_in_a_path_is_a_json_404(login_as, ada, ids, path, bad_id):
    url = path.format(id=bad_id, org=ids["org"])
    method = "post" if url.endswith("/revoke/") else "get"

    response = getattr(login_as(ada), method)(url, {}, format="json")

    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"error": {"code": "not_found", "message": "Not found."}}


def test_unknown_path_under_api_is_a_json_404(login_as, ada):
    response = login_as(ada).get("/api/no-such-thing/")

    assert response.status_code == 404
    assert response.json() == {"error": {"code": "not_found", "message": "Not found."}}


def test_a_path_without_its_slash_still_redirects(login_as, ada):
    response = login_as(ada).get("/api/orgs")

    assert (response.status_code, response["Location"]) == (301, "/api/orgs/")


# --- filters that name a choice -----------------------------------------------------------------


def test_unknown_incident_status_is_a_400_naming_the_choices(login_as, ada):
    response = login_as(ada).get("/api/incidents/", {"status": "bogus"})

    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "code": "invalid",
            "message": 'invalid input: status: "bogus" is not a valid choice; '
            "choose one of: open, resolved.",
            "details": {
                "status": ['"bogus" is not a valid choice; choose one of: open, resolved.']
            },
        }
    }


@pytest.mark.parametrize("state", ["open", "resolved"])
def test_known_incident_status_filters(login_as, ada, release, state):
    response = login_as(ada).get("/api/incidents/", {"status": state})

    assert (response.status_code, response.json()["results"]) == (200, [])


# --- NUL in a plan ------------------------------------------------------------------------------


@pytest.fixture
def example() -> dict:
    return yaml.safe_load(EXAMPLE_PLAN.read_text())


@pytest.mark.parametrize(
    ("where", "path", "code"),
    [
        (("description",), "description", "control_characters"),
        (("stages", 0, "description"), "stages[0].description", "control_characters"),
        (("upstream", "model"), "upstream.model", "control_characters"),
        (("upstream", "base_url"), "upstream.base_url", "invalid_url"),
    ],
)
@pytest.mark.parametrize("endpoint", ["validate", "apply"])
@pytest.mark.parametrize("as_text", [False, True], ids=["object", "yaml-string"])
def test_nul_in_a_plan_is_plan_invalid(
    login_as, ada, example, where, path, code, endpoint, as_text
):
    document = copy.deepcopy(example)
    node = document
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = "atlas\x002"
    body = {"document": yaml.safe_dump(document) if as_text else document}
    before = (RolloutPlan.objects.count(), AuditEvent.objects.count())

    response = login_as(ada).post(f"/api/plans/{endpoint}/", body, format="json")

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "plan_invalid"
    assert [(e["path"], e["code"]) for e in error["details"]] == [(path, code)]
    assert (RolloutPlan.objects.count(), AuditEvent.objects.count()) == before


def test_nul_in_a_plan_comment_is_invalid(login_as, ada, example):
    response = login_as(ada).post(
        "/api/plans/apply/", {"document": example, "comment": "a\x00b"}, format="json"
    )

    assert response.status_code == 400
    assert response.json()["error"]["details"] == {"comment": ["Null characters are not allowed."]}


def test_nul_in_a_raw_yaml_plan_is_plan_invalid(login_as, ada, example):
    text = yaml.safe_dump(example).replace("description: ", 'description: "\\0" #', 1)

    response = login_as(ada).post(
        "/api/plans/apply/", data=text.encode(), content_type="application/yaml"
    )

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "plan_invalid"


# --- what the service requires, the serializer requires ------------------------------------------


def test_creating_an_org_without_a_tier_is_a_400(login_as, ada):
    response = login_as(ada).post("/api/orgs/", {"slug": "globex", "name": "Globex"}, format="json")

    assert response.status_code == 400
    assert response.json()["error"]["details"] == {"tier": ["This field is required."]}
    assert not Organization.objects.filter(slug="globex").exists()


@pytest.mark.parametrize("field", ["slug", "name"])
def test_creating_an_org_with_a_blank_field_is_a_400(login_as, ada, field):
    body = {"slug": "globex", "name": "Globex", "tier": "public", field: ""}

    response = login_as(ada).post("/api/orgs/", body, format="json")

    assert response.status_code == 400
    assert response.json()["error"]["details"] == {field: ["This field may not be blank."]}


# --- anonymous callers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "url"),
    [("get", "/api/"), ("get", "/api/orgs/"), ("post", "/api/keys/"), ("get", "/api/audit/1/")],
)
def test_anonymous_gets_401_with_www_authenticate(api, method, url):
    response = getattr(api, method)(url, {}, format="json")

    assert response.status_code == 401
    assert (
        response["WWW-Authenticate"]
        == 'Cookie realm="stagegate", form-action="/console/login/", cookie-name="sessionid"'
    )
    assert response.json() == {
        "error": {
            "code": "not_authenticated",
            "message": "Authentication credentials were not provided.",
        }
    }


# --- found by schemathesis: input the schema calls invalid is refused ---------------------------


def test_text_sent_as_a_number_is_a_400(login_as, ada, northwind):
    api_key = keys.issue_key(organization=northwind, name="ci", actor=ada).api_key

    response = login_as(ada).post(
        f"/api/keys/{api_key.public_id}/revoke/", {"reason": 0}, format="json"
    )

    assert response.status_code == 400
    assert response.json()["error"]["details"] == {"reason": ["Not a valid string."]}
    api_key.refresh_from_db()
    assert api_key.revoked_at is None


def test_an_unknown_body_field_is_a_400(login_as, ada, northwind):
    api_key = keys.issue_key(organization=northwind, name="ci", actor=ada).api_key

    response = login_as(ada).post(
        f"/api/keys/{api_key.public_id}/rotate/", {"grace_hour": 0}, format="json"
    )

    assert response.status_code == 400
    assert response.json()["error"]["details"] == {"grace_hour": ["Unknown field."]}
    assert ApiKey.objects.count() == 1


def test_form_data_is_refused_for_json(login_as, ada, northwind):
    response = login_as(ada).post(
        "/api/keys/", {"organization": northwind.public_id, "name": "ci"}, format="multipart"
    )

    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"


def test_blank_after_trimming_is_a_400(login_as, ada, release):
    response = login_as(ada).post(
        f"/api/releases/{release.public_id}/pause/", {"reason": "   "}, format="json"
    )

    assert response.status_code == 400
    assert response.json()["error"]["details"] == {"reason": ["This field may not be blank."]}


# --- the schema says what the API does ----------------------------------------------------------


@pytest.fixture
def schema(api):
    return api.get("/api/schema/", {"format": "json"}).json()


@pytest.mark.parametrize(
    ("component", "field"),
    [
        ("ApiKey", "rotated_from"),
        ("Transition", "actor"),
        ("Transition", "review"),
        ("Verification", "verified_by"),
        ("Incident", "resolved_by"),
        ("Incident", "opened_by"),
        ("Review", "requested_by"),
        ("PlanVersion", "created_by"),
    ],
)
def test_schema_marks_nullable_relations(schema, component, field):
    assert schema["components"]["schemas"][component]["properties"][field]["nullable"] is True


def test_schema_documents_the_error_statuses_of_every_operation(schema):
    missing = {
        f"{method.upper()} {path}": sorted(
            {"400", "401", "403", "404"} - set(operation["responses"])
        )
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
    }

    assert {operation: codes for operation, codes in missing.items() if codes} == {}


def test_schema_says_what_a_request_may_not_be(schema):
    components = schema["components"]["schemas"]

    assert components["ReasonRequest"]["properties"]["reason"]["minLength"] == 1
    assert components["ReasonRequest"]["properties"]["reason"]["pattern"] == r"\S"
    assert components["ReasonRequest"]["additionalProperties"] is False
    status = next(
        p for p in schema["paths"]["/api/incidents/"]["get"]["parameters"] if p["name"] == "status"
    )
    assert status["schema"]["enum"] == ["open", "resolved", ""]
    organization = next(
        p for p in schema["paths"]["/api/keys/"]["get"]["parameters"] if p["name"] == "organization"
    )
    assert organization["schema"]["pattern"] == r"^[^\x00-\x1f\x7f]*$"
    assert schema["components"]["securitySchemes"] == {
        "cookieAuth": {"type": "apiKey", "in": "cookie", "name": "sessionid"}
    }
