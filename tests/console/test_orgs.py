"""The organizations pages: who sees which organization, effective tiers as the proxy
decides them, verifications with their expiry warning, members; and hostile input."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from access.models import Membership, Verification, VerificationStatus
from tests.factories import make_org, make_user, make_verification

pytestmark = pytest.mark.django_db

KEY_SHAPED = "sgk_0123456789abcdef_" + "A" * 40
NORTHWIND = "/console/orgs/northwind-research/"
ACME = "/console/orgs/acme-commercial/"


@pytest.fixture
def browser():
    return Client()


@pytest.fixture
def cast(northwind, acme, tartu, publicdev, ada, rita, vera, oscar, olga, release):
    return {"ada": ada, "rita": rita, "vera": vera, "oscar": oscar, "olga": olga}


def signed_in(browser, user):
    browser.force_login(user)
    return browser


def future(days: float) -> str:
    return (timezone.now() + timedelta(days=days)).strftime("%Y-%m-%dT%H:%M")


# --- who sees what ---------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["/console/orgs/", NORTHWIND])
def test_orgs_pages_send_anonymous_to_login(browser, cast, url):
    answer = browser.get(url)
    assert (answer.status_code, answer["Location"]) == (302, f"/console/login/?next={url}")


def test_orgs_page_refuses_a_user_without_a_role(browser, cast, nobody):
    assert signed_in(browser, nobody).get("/console/orgs/").status_code == 403
    assert browser.get(NORTHWIND).status_code == 403


@pytest.mark.parametrize("who", ["vera", "rita", "ada"])
def test_orgs_page_shows_staff_every_organization(browser, cast, who):
    answer = signed_in(browser, cast[who]).get("/console/orgs/")
    assert answer.status_code == 200
    for slug in ("northwind-research", "acme-commercial", "tartu-university", "public-dev"):
        assert f'href="/console/orgs/{slug}/"'.encode() in answer.content


@pytest.mark.parametrize("who", ["vera", "rita"])
def test_org_page_shows_readers_no_forms(browser, cast, who):
    answer = signed_in(browser, cast[who]).get(NORTHWIND)
    assert answer.status_code == 200
    assert b"oscar" in answer.content  # members are shown
    for action in (b"/verifications/", b"/members/", b"/keys/new/"):
        assert action not in answer.content


@pytest.mark.parametrize("who", ["vera", "rita"])
def test_org_actions_refuse_readers(browser, cast, who):
    signed_in(browser, cast[who])
    verification = Verification.objects.get(organization__slug="northwind-research")
    posts = [
        (f"{NORTHWIND}verifications/", {"kind": "business_kyc", "expires_at": future(30)}),
        (f"{NORTHWIND}verifications/{verification.public_id}/revoke/", {"reason": "x"}),
        (f"{NORTHWIND}verifications/{verification.public_id}/validate/", {}),
        (f"{NORTHWIND}members/", {"username": "nick", "role": "member"}),
        (f"{NORTHWIND}keys/new/", {"name": "k"}),
    ]
    for url, data in posts:
        assert (url, browser.post(url, data).status_code) == (url, 403)
    assert Verification.objects.get(pk=verification.pk).status == VerificationStatus.VALID
    assert Verification.objects.count() == 3


def test_orgs_page_shows_an_org_admin_only_their_own(browser, cast):
    answer = signed_in(browser, cast["oscar"]).get("/console/orgs/")
    assert answer.status_code == 200
    assert b'href="/console/orgs/northwind-research/"' in answer.content
    assert b"acme" not in answer.content
    assert b"tartu" not in answer.content


@pytest.mark.parametrize(
    "url",
    [
        ACME,
        "/console/orgs/no-such-org/",
        "/console/orgs/" + "a" * 10_000 + "/",
        "/console/orgs/northwind%00research/",
    ],
)
def test_org_page_is_404_for_an_org_admin_elsewhere(browser, cast, url):
    assert signed_in(browser, cast["oscar"]).get(url).status_code == 404


def test_org_actions_are_404_for_an_org_admin_elsewhere(browser, cast, acme):
    signed_in(browser, cast["oscar"])
    verification = Verification.objects.get(organization=acme)
    olga_membership = Membership.objects.get(organization=acme)
    assert browser.post(f"{ACME}members/", {"username": "nick"}).status_code == 404
    assert browser.post(f"{ACME}members/{olga_membership.public_id}/remove/").status_code == 404
    assert browser.post(f"{ACME}keys/new/", {"name": "mine now"}).status_code == 404
    # A membership of another organization named under one's own: 404 as well.
    forged = f"{NORTHWIND}members/{olga_membership.public_id}/remove/"
    assert browser.post(forged).status_code == 404
    assert Membership.objects.filter(pk=olga_membership.pk).exists()
    # Verifications are for rollout admins: refused before anything is looked up.
    revoke = f"{ACME}verifications/{verification.public_id}/revoke/"
    assert browser.post(revoke, {"reason": "x"}).status_code == 403
    assert acme.keys.count() == 0


# --- effective tiers -------------------------------------------------------------------------


def test_org_page_shows_the_tier_the_proxy_serves(browser, cast):
    signed_in(browser, cast["vera"])
    served = browser.get(NORTHWIND).content.decode()
    assert "<td>research_partner</td>" in served
    assert "<code>ok</code>" in served
    refused = browser.get(ACME).content.decode()
    assert "not served" in refused
    assert "<code>model_not_available</code>" in refused


def test_org_page_shows_public_when_evidence_is_revoked(browser, cast, northwind):
    Verification.objects.filter(organization=northwind).update(status=VerificationStatus.REVOKED)
    answer = signed_in(browser, cast["vera"]).get(NORTHWIND).content.decode()
    assert "<td>public</td>" in answer
    assert "<code>verification_required</code>" in answer


# --- verifications ---------------------------------------------------------------------------


def test_verification_expiring_within_14_days_is_warned(browser, cast, northwind):
    make_verification(northwind, "business_kyc", expires_at=timezone.now() + timedelta(days=5))
    signed_in(browser, cast["vera"])
    assert b"expiring within 14 days" in browser.get("/console/orgs/").content
    page = browser.get(NORTHWIND).content
    assert b"1 verification expiring within 14 days" in page
    assert b"expires in 4\xc2\xa0days" in page or b"expires in 5\xc2\xa0days" in page


def test_verification_expiring_later_is_not_warned(browser, cast):
    signed_in(browser, cast["vera"])  # every cast verification runs a year
    assert b"within 14 days" not in browser.get("/console/orgs/").content
    assert b"within 14 days" not in browser.get(NORTHWIND).content


def test_rollout_admin_records_a_verification(browser, cast, acme):
    signed_in(browser, cast["ada"])
    answer = browser.post(
        f"{ACME}verifications/",
        {
            "kind": "academic_credential",
            "status": "valid",
            "expires_at": future(60),
            "evidence_note": "checked <b>register</b>",
        },
    )
    assert (answer.status_code, answer["Location"]) == (302, ACME)
    recorded = Verification.objects.get(organization=acme, kind="academic_credential")
    assert recorded.status == VerificationStatus.VALID
    page = browser.get(ACME).content
    assert b"checked &lt;b&gt;register&lt;/b&gt;" in page


def test_rollout_admin_revokes_a_verification_with_a_reason(browser, cast, northwind):
    signed_in(browser, cast["ada"])
    verification = Verification.objects.get(organization=northwind)
    url = f"{NORTHWIND}verifications/{verification.public_id}/revoke/"
    assert browser.post(url, {"reason": ""}).status_code == 400
    assert Verification.objects.get(pk=verification.pk).status == VerificationStatus.VALID
    answer = browser.post(url, {"reason": "agreement ended"})
    assert (answer.status_code, answer["Location"]) == (302, NORTHWIND)
    verification.refresh_from_db()
    assert verification.status == VerificationStatus.REVOKED
    assert "agreement ended" in verification.evidence_note
    # Revoked once more: nothing changes, no error.
    assert browser.post(url, {"reason": "again"}).status_code == 302


def test_rollout_admin_validates_a_pending_verification(browser, cast, acme):
    pending = make_verification(
        acme,
        "academic_credential",
        expires_at=timezone.now() + timedelta(days=90),
        status=VerificationStatus.PENDING,
    )
    signed_in(browser, cast["ada"])
    answer = browser.post(f"{ACME}verifications/{pending.public_id}/validate/")
    assert answer.status_code == 302
    pending.refresh_from_db()
    assert pending.status == VerificationStatus.VALID


def test_org_admin_may_not_record_verifications(browser, cast):
    signed_in(browser, cast["oscar"])
    answer = browser.post(
        f"{NORTHWIND}verifications/", {"kind": "business_kyc", "expires_at": future(30)}
    )
    assert answer.status_code == 403
    assert b"/verifications/" not in browser.get(NORTHWIND).content


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("evidence_note", "nul\x00byte"),
        ("evidence_note", "x" * 10_000),
        ("expires_at", "not a date"),
        ("expires_at", "2001-01-01T00:00"),
        ("kind", "<script>alert(1)</script>"),
        ("kind", "\x00"),
    ],
)
def test_verification_form_refuses_hostile_input(browser, cast, acme, field, value):
    signed_in(browser, cast["ada"])
    data = {
        "kind": "business_kyc",
        "status": "pending",
        "expires_at": future(30),
        "evidence_note": "",
        field: value,
    }
    answer = browser.post(f"{ACME}verifications/", data)
    assert answer.status_code == 400
    assert b'class="error"' in answer.content
    assert b"<script>alert" not in answer.content
    assert Verification.objects.filter(organization=acme).count() == 1


def test_verification_note_holding_a_key_is_stored_redacted(browser, cast, acme):
    signed_in(browser, cast["ada"])
    browser.post(
        f"{ACME}verifications/",
        {
            "kind": "academic_credential",
            "status": "pending",
            "expires_at": future(30),
            "evidence_note": f"pasted {KEY_SHAPED}",
        },
    )
    recorded = Verification.objects.get(organization=acme, kind="academic_credential")
    assert recorded.evidence_note == "pasted sgk_0123456789abcdef_[redacted]"
    assert KEY_SHAPED.encode() not in browser.get(ACME).content


# --- members ---------------------------------------------------------------------------------


def test_org_admin_adds_and_removes_their_own_people(browser, cast, northwind):
    make_user("nick")
    signed_in(browser, cast["oscar"])
    answer = browser.post(f"{NORTHWIND}members/", {"username": "nick", "role": "member"})
    assert (answer.status_code, answer["Location"]) == (302, NORTHWIND)
    membership = Membership.objects.get(organization=northwind, user__username="nick")
    assert b"nick" in browser.get(NORTHWIND).content
    answer = browser.post(f"{NORTHWIND}members/{membership.public_id}/remove/")
    assert answer.status_code == 302
    assert not Membership.objects.filter(pk=membership.pk).exists()


def test_org_admin_who_removes_themselves_lands_on_the_list(browser, cast, northwind, olga):
    Membership.objects.create(user=olga, organization=northwind, role="org_admin")
    own = Membership.objects.get(organization=northwind, user__username="oscar")
    answer = signed_in(browser, cast["oscar"]).post(f"{NORTHWIND}members/{own.public_id}/remove/")
    assert (answer.status_code, answer["Location"]) == (302, "/console/orgs/")
    assert browser.get(NORTHWIND).status_code == 403  # no organization left: no role


@pytest.mark.parametrize("username", ["rita", "olga", "no-such-user", "<script>x</script>"])
def test_org_admin_cannot_add_staff_or_others_people(browser, cast, northwind, username):
    signed_in(browser, cast["oscar"])
    answer = browser.post(f"{NORTHWIND}members/", {"username": username, "role": "member"})
    assert answer.status_code == 400
    assert b"no user you may add has this username" in answer.content
    assert b"<script>x" not in answer.content
    assert Membership.objects.filter(organization=northwind).count() == 1


def test_adding_a_member_twice_is_a_form_error(browser, cast, northwind):
    signed_in(browser, cast["ada"])
    answer = browser.post(f"{NORTHWIND}members/", {"username": "oscar", "role": "member"})
    assert answer.status_code == 400
    assert b"already a member" in answer.content


@pytest.mark.parametrize("username", ["nul\x00", "u" * 10_000, ""])
def test_member_form_refuses_hostile_input(browser, cast, username):
    signed_in(browser, cast["ada"])
    answer = browser.post(f"{NORTHWIND}members/", {"username": username, "role": "member"})
    assert answer.status_code == 400
    assert b'class="error"' in answer.content


# --- names from outside are shown escaped ----------------------------------------------------


def test_org_names_are_shown_escaped(browser, cast):
    make_org("evil-corp", "public").__class__.objects.filter(slug="evil-corp").update(
        name="<script>alert('x')</script>"
    )
    page = signed_in(browser, cast["vera"]).get("/console/orgs/").content
    assert b"<script>alert" not in page
    assert b"&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page


# --- bounded queries -------------------------------------------------------------------------


def _orgs_with_evidence(count: int, start: int) -> None:
    for n in range(start, start + count):
        org = make_org(f"bulk-{n:03d}", "verified_commercial")
        make_user(f"bulk-admin-{n:03d}", org_admin_of=(org,))


def test_orgs_page_queries_do_not_grow_with_organizations(browser, cast, django_assert_num_queries):
    signed_in(browser, cast["vera"])
    _orgs_with_evidence(2, 0)
    browser.get("/console/orgs/")  # the session and caches warm
    with CaptureQueriesContext(connection) as small:
        assert browser.get("/console/orgs/").status_code == 200
    assert len(small.captured_queries) <= 12
    _orgs_with_evidence(18, 2)
    with django_assert_num_queries(len(small.captured_queries)):
        answer = browser.get("/console/orgs/")
    assert answer.content.count(b'class="card org-card"') == 24
