"""/api/orgs/, their members, and /api/verifications/."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from hypothesis import given
from hypothesis import strategies as st

from access.models import (
    ORG_SLUG_PATTERN,
    Membership,
    Organization,
    Verification,
    VerificationStatus,
)
from monitoring.models import AuditEvent
from rollout.plan_schema import SLUG_PATTERN
from tests.factories import make_org, make_user

CAST_SLUGS = ["acme-commercial", "northwind-research", "public-dev", "tartu-university"]


@pytest.fixture
def cast_orgs(northwind, acme, tartu, publicdev):
    return [northwind, acme, tartu, publicdev]


def _audit(action: str) -> list[tuple[str, str, dict]]:
    return [(e.actor, e.object_id, e.data) for e in AuditEvent.objects.filter(action=action)]


# --- organizations ---------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["ada", "rita", "vera"])
def test_staff_list_every_org(request, login_as, cast_orgs, who):
    response = login_as(request.getfixturevalue(who)).get("/api/orgs/")

    assert response.status_code == 200
    assert [row["slug"] for row in response.json()["results"]] == CAST_SLUGS


def test_org_admin_lists_only_the_orgs_they_administer(login_as, oscar, cast_orgs):
    response = login_as(oscar).get("/api/orgs/")

    assert [row["slug"] for row in response.json()["results"]] == ["northwind-research"]


def test_org_shows_effective_tier_per_release(login_as, ada, northwind, release):
    response = login_as(ada).get(f"/api/orgs/{northwind.public_id}/")

    assert response.status_code == 200
    body = response.json()
    assert {k: v for k, v in body.items() if k != "created_at"} == {
        "public_id": northwind.public_id,
        "slug": "northwind-research",
        "name": "Northwind Research",
        "tier": "research_partner",
        "effective_tiers": {"atlas-2": "research_partner"},
    }


def test_revoked_evidence_drops_the_effective_tier(login_as, ada, northwind, release):
    client = login_as(ada)
    verification = northwind.verifications.get()

    client.post(f"/api/verifications/{verification.public_id}/revoke/", {}, format="json")

    body = client.get(f"/api/orgs/{northwind.public_id}/").json()
    assert body["effective_tiers"] == {"atlas-2": "public"}
    assert _audit("org.tier_downgraded") == [
        (
            "ada",
            northwind.public_id,
            {
                "release": "atlas-2",
                "from": "research_partner",
                "to": "public",
                "cause": f"verification {verification.public_id} revoked",
            },
        )
    ]


def test_rollout_admin_creates_an_org_audited(login_as, ada):
    response = login_as(ada).post(
        "/api/orgs/",
        {"slug": "globex", "name": "Globex", "tier": "verified_commercial"},
        format="json",
    )

    assert response.status_code == 201
    org = Organization.objects.get(slug="globex")
    assert response.json()["public_id"] == org.public_id
    assert _audit("org.created") == [
        ("ada", org.public_id, {"slug": "globex", "name": "Globex", "tier": "verified_commercial"})
    ]


def test_rollout_admin_changes_a_tier_audited(login_as, ada, tartu):
    response = login_as(ada).patch(
        f"/api/orgs/{tartu.public_id}/", {"tier": "public"}, format="json"
    )

    assert response.status_code == 200
    assert response.json()["tier"] == "public"
    assert _audit("org.updated") == [
        (
            "ada",
            tartu.public_id,
            {
                "slug": "tartu-university",
                "changes": {"tier": {"from": "credentialed_academic", "to": "public"}},
            },
        )
    ]


def test_unchanged_update_writes_no_audit_row(login_as, ada, tartu):
    response = login_as(ada).patch(
        f"/api/orgs/{tartu.public_id}/", {"name": tartu.name}, format="json"
    )

    assert response.status_code == 200
    assert _audit("org.updated") == []


def test_duplicate_slug_is_a_conflict(login_as, ada, northwind):
    response = login_as(ada).post(
        "/api/orgs/", {"slug": northwind.slug, "name": "Again", "tier": "public"}, format="json"
    )

    assert response.status_code == 409
    error = response.json()["error"]
    assert (error["code"], list(error["details"])) == ("already_exists", ["slug"])


@pytest.mark.parametrize("slug", ["Globex", "GLOBEX", "-globex", "_globex", "globex.io"])
def test_org_slug_must_be_a_lower_case_slug_plans_can_name(login_as, ada, slug):
    response = login_as(ada).post(
        "/api/orgs/", {"slug": slug, "name": "Globex", "tier": "public"}, format="json"
    )

    assert response.status_code == 400
    assert list(response.json()["error"]["details"]) == ["slug"]
    assert not Organization.objects.exists()
    assert _audit("org.created") == []


@given(st.from_regex(ORG_SLUG_PATTERN, fullmatch=True))
def test_every_org_slug_is_one_a_plan_can_name(slug):
    assert re.fullmatch(SLUG_PATTERN, slug)


def test_upper_case_slug_is_refused_with_the_rule(login_as, ada):
    response = login_as(ada).post(
        "/api/orgs/", {"slug": "Globex", "name": "Globex", "tier": "public"}, format="json"
    )

    assert response.json()["error"]["details"] == {
        "slug": [
            "must be lower-case letters, digits, hyphens and underscores, starting with a"
            " letter or digit"
        ]
    }


@pytest.mark.parametrize("method", ["patch", "put"])
def test_org_slug_cannot_be_renamed(login_as, ada, northwind, method):
    body = {"slug": "northwind", "name": "Northwind", "tier": "research_partner"}

    response = getattr(login_as(ada), method)(
        f"/api/orgs/{northwind.public_id}/", body, format="json"
    )

    assert (response.status_code, response.json()) == (
        400,
        {
            "error": {
                "code": "slug_immutable",
                "message": "the slug of northwind-research cannot change: rollout plans name"
                " organizations by slug",
            }
        },
    )
    northwind.refresh_from_db()
    assert (northwind.slug, northwind.name) == ("northwind-research", "Northwind Research")
    assert _audit("org.updated") == []


def test_org_update_may_restate_the_slug(login_as, ada, northwind):
    body = {"slug": "northwind-research", "name": "Northwind", "tier": "research_partner"}

    response = login_as(ada).put(f"/api/orgs/{northwind.public_id}/", body, format="json")

    assert response.status_code == 200
    assert _audit("org.updated") == [
        (
            "ada",
            northwind.public_id,
            {
                "slug": "northwind-research",
                "changes": {"name": {"from": "Northwind Research", "to": "Northwind"}},
            },
        )
    ]


def test_org_admin_cannot_change_their_orgs_tier(login_as, oscar, northwind):
    response = login_as(oscar).patch(
        f"/api/orgs/{northwind.public_id}/", {"tier": "verified_commercial"}, format="json"
    )

    assert response.status_code == 403
    northwind.refresh_from_db()
    assert northwind.tier == "research_partner"


def test_org_admin_cannot_create_orgs(login_as, oscar):
    response = login_as(oscar).post(
        "/api/orgs/", {"slug": "mine", "name": "Mine", "tier": "research_partner"}, format="json"
    )

    assert response.status_code == 403
    assert not Organization.objects.filter(slug="mine").exists()


def test_orgs_cannot_be_deleted(login_as, ada, northwind):
    response = login_as(ada).delete(f"/api/orgs/{northwind.public_id}/")

    assert response.status_code == 405
    assert Organization.objects.filter(pk=northwind.pk).exists()


@pytest.mark.parametrize("who", ["ada", "oscar"])
def test_org_list_queries_do_not_grow_with_rows(
    db, request, login_as, django_assert_num_queries, who
):
    user = request.getfixturevalue(who)  # oscar comes with northwind
    client = login_as(user)

    def add_orgs(count: int) -> None:
        for _ in range(count):
            org = make_org(f"org-{Organization.objects.count():02}", "verified_commercial")
            if who == "oscar":
                Membership.objects.create(user=user, organization=org, role="org_admin")

    add_orgs(3 - Organization.objects.count())
    with CaptureQueriesContext(connection) as three:
        assert len(client.get("/api/orgs/").json()["results"]) == 3
    add_orgs(27)

    with django_assert_num_queries(len(three.captured_queries)):
        results = client.get("/api/orgs/").json()["results"]
    assert len(results) == 30


# --- members -----------------------------------------------------------------------------------


def test_org_admin_lists_their_orgs_members(login_as, oscar, northwind, nobody):
    Membership.objects.create(user=nobody, organization=northwind, role="member")

    response = login_as(oscar).get(f"/api/orgs/{northwind.public_id}/members/")

    assert response.status_code == 200
    assert [(m["username"], m["role"]) for m in response.json()["results"]] == [
        ("oscar", "org_admin"),
        ("nobody", "member"),
    ]


def test_org_admin_adds_and_removes_a_member_audited(login_as, oscar, northwind, nobody):
    client = login_as(oscar)
    url = f"/api/orgs/{northwind.public_id}/members/"

    added = client.post(url, {"username": "nobody", "role": "member"}, format="json")
    assert added.status_code == 201
    membership = Membership.objects.get(user=nobody)
    assert added.json()["public_id"] == membership.public_id

    removed = client.delete(f"{url}{membership.public_id}/")
    assert removed.status_code == 204
    assert not Membership.objects.filter(user=nobody).exists()
    expected = {"organization": northwind.public_id, "user": "nobody", "role": "member"}
    assert _audit("membership.added") == [("oscar", membership.public_id, expected)]
    assert _audit("membership.removed") == [("oscar", membership.public_id, expected)]


NOT_ADDABLE = {
    "error": {
        "code": "invalid",
        "message": "invalid input: username: no user you may add has this username",
        "details": {"username": ["no user you may add has this username"]},
    }
}


def test_adding_an_unknown_user_is_invalid(login_as, ada, northwind):
    response = login_as(ada).post(
        f"/api/orgs/{northwind.public_id}/members/", {"username": "ghost"}, format="json"
    )

    assert (response.status_code, response.json()) == (400, NOT_ADDABLE)


@pytest.fixture
def strangers(ada, rita, vera, olga, acme) -> list[str]:
    """Users an org admin of northwind may not add, and a username nobody has: staff of
    every kind, an inactive user, and the org admin and a member of acme."""
    User = get_user_model()
    User.objects.create_superuser("root", "root@example.org", "root-pass-5521")
    flags = {
        "sudo": {"is_superuser": True},
        "djstaff": {"is_staff": True},
        "gone": {"is_active": False},
    }
    for username, flag in flags.items():
        make_user(username)
        User.objects.filter(username=username).update(**flag)
    Membership.objects.create(user=make_user("mia"), organization=acme, role="member")
    return ["ghost", "ada", "rita", "vera", "root", "sudo", "djstaff", "gone", "olga", "mia"]


def test_org_admin_cannot_add_staff_or_other_orgs_people_nor_tell_them_from_unknown_names(
    login_as, oscar, northwind, strangers
):
    client = login_as(oscar)
    url = f"/api/orgs/{northwind.public_id}/members/"

    answers = [client.post(url, {"username": name}, format="json") for name in strangers]

    assert [(a.status_code, a.json()) for a in answers] == [(400, NOT_ADDABLE)] * len(strangers)
    assert list(northwind.memberships.values_list("user__username", flat=True)) == ["oscar"]
    assert _audit("membership.added") == []


def test_org_admins_refusal_is_logged_without_the_username(login_as, oscar, northwind, caplog):
    login_as(oscar).post(
        f"/api/orgs/{northwind.public_id}/members/", {"username": "ghost-7"}, format="json"
    )

    assert [r.getMessage() for r in caplog.records if r.name == "access.organizations"] == [
        "oscar was refused adding a user to northwind-research"
    ]


def test_org_admin_adds_a_member_of_another_org_they_administer(login_as, oscar, northwind):
    sister = make_org("northwind-labs", "public")
    Membership.objects.create(user=oscar, organization=sister, role="org_admin")
    Membership.objects.create(user=make_user("mia"), organization=sister, role="member")

    response = login_as(oscar).post(
        f"/api/orgs/{northwind.public_id}/members/", {"username": "mia"}, format="json"
    )

    assert response.status_code == 201
    assert [data["user"] for _, _, data in _audit("membership.added")] == ["mia"]


def test_rollout_admin_adds_staff_and_other_orgs_people_audited(
    login_as, ada, northwind, strangers
):
    client = login_as(ada)
    url = f"/api/orgs/{northwind.public_id}/members/"

    answers = [
        client.post(url, {"username": name, "role": "member"}, format="json").status_code
        for name in ("rita", "root", "olga", "mia")
    ]

    assert answers == [201] * 4
    assert [(actor, data["user"]) for actor, _, data in _audit("membership.added")] == [
        ("ada", "rita"),
        ("ada", "root"),
        ("ada", "olga"),
        ("ada", "mia"),
    ]


def test_adding_an_existing_member_is_a_conflict(login_as, ada, northwind, oscar):
    response = login_as(ada).post(
        f"/api/orgs/{northwind.public_id}/members/", {"username": "oscar"}, format="json"
    )

    assert response.status_code == 409
    assert response.json()["error"] == {
        "code": "already_member",
        "message": "oscar is already a member of northwind-research",
    }
    assert _audit("membership.added") == []


def test_plain_member_cannot_manage_members(login_as, northwind):
    member = make_user("mia")
    Membership.objects.create(user=member, organization=northwind, role="member")

    response = login_as(member).get(f"/api/orgs/{northwind.public_id}/members/")

    assert response.status_code == 403


# --- verifications ---------------------------------------------------------------------------


def _future(days: int = 90) -> str:
    return (timezone.now() + timedelta(days=days)).isoformat()


def test_rollout_admin_records_a_verification_audited(login_as, ada, acme):
    response = login_as(ada).post(
        "/api/verifications/",
        {"organization": acme.public_id, "kind": "monitoring_agreement", "expires_at": _future()},
        format="json",
    )

    assert response.status_code == 201
    body = response.json()
    verification = Verification.objects.get(public_id=body["public_id"])
    assert (body["organization"], body["status"], body["verified_by"]) == (
        acme.public_id,
        "pending",
        None,
    )
    assert [(a, o, d["kind"], d["status"]) for a, o, d in _audit("verification.created")] == [
        ("ada", verification.public_id, "monitoring_agreement", "pending")
    ]


def test_validate_marks_pending_verification_valid(login_as, ada, acme):
    client = login_as(ada)
    created = client.post(
        "/api/verifications/",
        {"organization": acme.public_id, "kind": "business_kyc", "expires_at": _future()},
        format="json",
    ).json()

    response = client.post(
        f"/api/verifications/{created['public_id']}/validate/", {}, format="json"
    )

    assert response.status_code == 200
    assert (response.json()["status"], response.json()["verified_by"]) == ("valid", "ada")
    assert [o for _, o, _ in _audit("verification.valid")] == [created["public_id"]]


def test_revoked_verification_cannot_be_validated_again(login_as, ada, acme):
    client = login_as(ada)
    verification = acme.verifications.get()
    client.post(f"/api/verifications/{verification.public_id}/revoke/", {}, format="json")

    response = client.post(
        f"/api/verifications/{verification.public_id}/validate/", {}, format="json"
    )

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "verification_not_pending"
    verification.refresh_from_db()
    assert verification.status == VerificationStatus.REVOKED


def test_new_verification_must_expire_in_the_future(login_as, ada, acme):
    response = login_as(ada).post(
        "/api/verifications/",
        {"organization": acme.public_id, "kind": "business_kyc", "expires_at": _future(-1)},
        format="json",
    )

    assert response.status_code == 400
    assert response.json()["error"]["details"] == {"expires_at": ["must be in the future"]}


def test_new_verification_cannot_start_revoked(login_as, ada, acme):
    response = login_as(ada).post(
        "/api/verifications/",
        {
            "organization": acme.public_id,
            "kind": "business_kyc",
            "expires_at": _future(),
            "status": "revoked",
        },
        format="json",
    )

    assert response.status_code == 400
    assert list(response.json()["error"]["details"]) == ["status"]


def test_org_admin_reads_own_verifications(login_as, olga, acme, northwind):
    response = login_as(olga).get("/api/verifications/")

    assert [v["organization"] for v in response.json()["results"]] == [acme.public_id]
