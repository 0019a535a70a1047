"""The console's shell: sign in and out, roles, throttled sign-ins, CSP, the board."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from monitoring.rollups import rollup_pending
from monitoring.usage import write_events
from rollout.models import Release
from tests.factories import traffic

pytestmark = pytest.mark.django_db


@pytest.fixture
def browser():
    return Client()


def test_root_redirects_to_the_console(browser):
    answer = browser.get("/")
    assert (answer.status_code, answer["Location"]) == (302, "/console/")


def test_anonymous_is_sent_to_the_login_page(browser):
    answer = browser.get("/console/")
    assert answer.status_code == 302
    assert answer["Location"] == "/console/login/?next=/console/"


@pytest.mark.parametrize("who", ["ada", "rita", "vera"])
def test_every_staff_role_signs_in_and_sees_the_board(browser, who, release, request):
    user = request.getfixturevalue(who)
    answer = browser.post(
        "/console/login/", {"username": user.username, "password": f"{who}-pass-9137"}
    )
    assert (answer.status_code, answer["Location"]) == (302, "/console/")
    board = browser.get("/console/")
    assert board.status_code == 200
    assert b"atlas-2" in board.content
    assert b'aria-current="step">research_preview' in board.content


def test_an_org_admin_signs_in_but_the_board_is_for_staff(browser, oscar):
    signed_in = browser.post(
        "/console/login/", {"username": "oscar", "password": "oscar-pass-9137"}
    )
    assert signed_in.status_code == 302
    assert browser.get("/console/").status_code == 403


def test_a_user_without_any_role_is_refused_with_a_reason(browser, nobody):
    browser.force_login(nobody)
    answer = browser.get("/console/")
    assert answer.status_code == 403


def test_a_role_taken_away_takes_effect_on_the_next_request(browser, vera, release):
    browser.force_login(vera)
    assert browser.get("/console/").status_code == 200
    vera.groups.clear()
    assert browser.get("/console/").status_code == 403


def test_wrong_password_shows_an_error_beside_the_form(browser, vera):
    answer = browser.post("/console/login/", {"username": "vera", "password": "wrong"})
    assert answer.status_code == 200
    assert b"Please enter a correct username and password" in answer.content


def test_repeated_failed_sign_ins_lock_the_username(browser, vera, settings):
    for _ in range(settings.AXES_FAILURE_LIMIT):
        browser.post("/console/login/", {"username": "vera", "password": "wrong"})
    # Now even the right password is refused, from another address too.
    other = Client(REMOTE_ADDR="10.9.8.7")
    answer = other.post("/console/login/", {"username": "vera", "password": "vera-pass-9137"})
    assert answer.status_code == 429
    assert b"Too many failed sign-ins" in answer.content
    assert other.get("/console/").status_code == 302  # still signed out


def test_repeated_failed_sign_ins_lock_the_address(browser, vera, rita, settings):
    for n in range(settings.AXES_FAILURE_LIMIT):
        browser.post("/console/login/", {"username": f"guess{n}", "password": "wrong"})
    answer = browser.post("/console/login/", {"username": "rita", "password": "rita-pass-9137"})
    assert answer.status_code == 429


def test_pages_carry_a_content_security_policy_without_inline_script(browser, vera, release):
    browser.force_login(vera)
    answer = browser.get("/console/")
    policy = answer["Content-Security-Policy"]
    assert "script-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert "frame-ancestors 'none'" in policy
    assert b"<script>" not in answer.content  # every script is a file of our own
    assert b"https://" not in answer.content.replace(b"http://www.w3.org", b"")


def test_sign_out_is_a_post(browser, vera):
    browser.force_login(vera)
    assert browser.get("/console/logout/").status_code == 405
    assert browser.post("/console/logout/").status_code == 302
    assert browser.get("/console/").status_code == 302


def test_password_change_needs_the_old_password(browser, vera):
    browser.force_login(vera)
    answer = browser.post(
        "/console/password/",
        {
            "old_password": "nope",
            "new_password1": "a-Longer-pass-42",
            "new_password2": "a-Longer-pass-42",
        },
    )
    assert answer.status_code == 200
    assert b"Your old password was entered incorrectly" in answer.content
    answer = browser.post(
        "/console/password/",
        {
            "old_password": "vera-pass-9137",
            "new_password1": "a-Longer-pass-42",
            "new_password2": "a-Longer-pass-42",
        },
    )
    assert answer.status_code == 302
    vera.refresh_from_db()
    assert vera.check_password("a-Longer-pass-42")


def test_the_board_refreshes_itself_as_a_partial(browser, vera, release):
    browser.force_login(vera)
    answer = browser.get("/console/", headers={"HX-Request": "true"})
    assert answer.status_code == 200
    assert b"<html" not in answer.content
    assert b"atlas-2" in answer.content


def test_the_board_names_what_blocks_the_next_gate(browser, vera, release):
    browser.force_login(vera)
    answer = browser.get("/console/").content.decode()
    assert "Next gate" in answer
    assert "min_requests" in answer  # no traffic yet: the minimum is not met


def test_swagger_ui_and_redoc_load_nothing_from_a_cdn(browser):
    for url in ("/api/docs/", "/api/redoc/"):
        page = browser.get(url)
        assert page.status_code == 200
        assert b"cdn" not in page.content.lower()
        assert b"/static/drf_spectacular_sidecar/" in page.content


def test_the_release_page_shows_criteria_and_tripwires(browser, vera, release):
    browser.force_login(vera)
    page = browser.get("/console/releases/atlas-2/").content.decode()
    assert "Exit criteria of research_preview" in page
    assert "Tripwires" in page
    assert browser.get("/console/releases/no-such/").status_code == 404


def test_cookies_are_http_only(browser, vera):
    page = browser.get("/console/login/")
    assert page.cookies["csrftoken"]["httponly"] is True
    signed_in = browser.post("/console/login/", {"username": "vera", "password": "vera-pass-9137"})
    assert signed_in.cookies["sessionid"]["httponly"] is True


def _board_queries(browser) -> CaptureQueriesContext:
    with CaptureQueriesContext(connection) as queries:
        assert browser.get("/console/").status_code == 200
    return queries


def test_the_board_reads_rollups_only_and_its_queries_do_not_grow_with_traffic(
    browser, vera, release
):
    now = timezone.now()
    Release.objects.filter(pk=release.pk).update(stage_entered_at=now - timedelta(days=2))
    browser.force_login(vera)
    before = len(_board_queries(browser))
    write_events(
        traffic(
            release="atlas-2",
            stage="research_preview",
            orgs={"northwind-research": "research_partner", "meridian": "research_partner"},
            count=3000,
            start=now - timedelta(hours=30),
            end=now - timedelta(minutes=2),  # reviews count whole minutes only
            error_every=50,
        )
    )
    rollup_pending()
    queries = _board_queries(browser)
    assert len(queries) == before
    assert [q for q in queries.captured_queries if "monitoring_usageevent" in q["sql"]] == []
    page = browser.get("/console/").content.decode()
    assert "3000 admitted requests, 10000 required (7000 to go)" in page


HOSTILE = (
    "%00",
    "a%00b",
    "%3Cscript%3Ealert(1)%3C%2Fscript%3E",
    "sgk_0123456789abcdef_" + "Q" * 40,
)


@pytest.mark.parametrize("text", HOSTILE)
@pytest.mark.parametrize(
    "url",
    [
        "/console/releases/{}/",
        "/console/releases/{}/plans/",
        "/console/releases/atlas-2/plans/diff/?a={}&b=1",
        "/console/orgs/{}/",
        "/console/keys/{}/",
        "/console/reviews/{}/",
        "/console/incidents/{}/",
        "/console/incidents/?release={}&status={}",
        "/console/audit/?q={}&actor={}",
        "/console/usage/?org={}&release={}",
        "/console/access/?org={}&release={}",
        "/console/?x={}",
        "/admin/{}/",
    ],
)
def test_hostile_text_in_any_console_url_is_never_a_500(browser, ada, release, url, text):
    browser.force_login(ada)
    answer = browser.get(url.format(text, text))
    # (the admin sends ada, a rollout admin without is_staff, to its own sign-in: 302)
    assert answer.status_code in (200, 302, 400, 404), (url, text, answer.status_code)
    assert b"<script>alert(1)" not in answer.content
