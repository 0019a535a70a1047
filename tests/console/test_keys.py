"""The key pages: who sees and manages which keys, the secret shown exactly once and
never cached, rotation with a grace period, revocation the proxy's check refuses, the
each key's usage sparkline from the rollups, and hostile input."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from access.keys import KeyRefused, authenticate_key, issue_key
from access.models import ApiKey
from monitoring.models import UsageRollup
from tests.factories import make_org

pytestmark = pytest.mark.django_db

KEY_SHAPED = "sgk_0123456789abcdef_" + "A" * 40
RAW_KEY = re.compile(rb"sgk_[0-9a-z]{16}_[0-9A-Za-z]{49}")


@pytest.fixture
def browser():
    return Client()


@pytest.fixture
def cast(northwind, acme, ada, rita, vera, oscar, olga, release):
    return {"ada": ada, "rita": rita, "vera": vera, "oscar": oscar, "olga": olga}


@pytest.fixture
def northwind_key(northwind, ada):
    return issue_key(organization=northwind, name="research-batch", actor=ada)


@pytest.fixture
def acme_key(acme, ada):
    return issue_key(organization=acme, name="acme-prod", actor=ada)


def signed_in(browser, user):
    browser.force_login(user)
    return browser


def create(browser, slug="northwind-research", **data):
    """Fill in the form as the page serves it (its one-time token included) and send it."""
    form = browser.get(f"/console/orgs/{slug}/keys/new/").content.decode()
    once = re.search(r'name="once" value="([^"]+)"', form)
    fields = {"once": once.group(1) if once else "", "name": "ci-runner", **data}
    return browser.post(f"/console/orgs/{slug}/keys/new/", fields)


def raw_keys(answer) -> list[bytes]:
    return RAW_KEY.findall(answer.content)


# --- who sees what ---------------------------------------------------------------------------


def test_keys_pages_send_anonymous_to_login(browser, cast, northwind_key):
    for url in ("/console/keys/", f"/console/keys/{northwind_key.api_key.public_id}/"):
        answer = browser.get(url)
        assert (answer.status_code, answer["Location"]) == (302, f"/console/login/?next={url}")


@pytest.mark.parametrize("who", ["vera", "rita", "ada"])
def test_keys_page_shows_staff_every_key(browser, cast, who, northwind_key, acme_key):
    answer = signed_in(browser, cast[who]).get("/console/keys/")
    assert answer.status_code == 200
    assert northwind_key.api_key.prefix.encode() in answer.content
    assert acme_key.api_key.prefix.encode() in answer.content
    assert raw_keys(answer) == []


@pytest.mark.parametrize("who", ["vera", "rita"])
def test_key_pages_show_readers_no_forms(browser, cast, who, northwind_key):
    signed_in(browser, cast[who])
    page = browser.get(f"/console/keys/{northwind_key.api_key.public_id}/")
    assert page.status_code == 200
    assert b"/rotate/" not in page.content
    assert b"/revoke/" not in page.content
    assert b"/keys/new/" not in browser.get("/console/keys/").content
    assert browser.get("/console/orgs/northwind-research/keys/new/").status_code == 403


@pytest.mark.parametrize("who", ["vera", "rita"])
def test_key_actions_refuse_readers(browser, cast, who, northwind_key):
    signed_in(browser, cast[who])
    url = f"/console/keys/{northwind_key.api_key.public_id}/"
    assert browser.post(f"{url}rotate/", {"grace_hours": 1}).status_code == 403
    assert browser.post(f"{url}revoke/", {"reason": "no"}).status_code == 403
    assert create(browser).status_code == 403
    assert ApiKey.objects.count() == 1
    assert authenticate_key(northwind_key.raw_key).pk == northwind_key.api_key.pk


def test_keys_page_shows_an_org_admin_only_their_own(browser, cast, northwind_key, acme_key):
    answer = signed_in(browser, cast["oscar"]).get("/console/keys/")
    assert answer.status_code == 200
    assert northwind_key.api_key.prefix.encode() in answer.content
    assert acme_key.api_key.prefix.encode() not in answer.content
    assert b"acme" not in answer.content
    assert b'href="/console/orgs/northwind-research/keys/new/"' in answer.content


def test_another_orgs_key_is_404_for_an_org_admin(browser, cast, acme_key):
    signed_in(browser, cast["oscar"])
    url = f"/console/keys/{acme_key.api_key.public_id}/"
    assert browser.get(url).status_code == 404
    assert browser.post(f"{url}rotate/", {"grace_hours": 0}).status_code == 404
    assert browser.post(f"{url}revoke/", {"reason": "mine now"}).status_code == 404
    assert create(browser, "acme-commercial").status_code == 404
    assert authenticate_key(acme_key.raw_key).pk == acme_key.api_key.pk
    assert ApiKey.objects.count() == 1


@pytest.mark.parametrize(
    "public_id",
    ["key_nosuchkey0000000", "x" * 10_000, "key_%00abc", "%3Cscript%3E", KEY_SHAPED],
)
def test_forged_key_ids_are_404(browser, cast, public_id):
    signed_in(browser, cast["ada"])
    assert browser.get(f"/console/keys/{public_id}/").status_code == 404
    assert browser.post(f"/console/keys/{public_id}/revoke/", {"reason": "r"}).status_code == 404


# --- the secret, shown once ------------------------------------------------------------------


@pytest.mark.parametrize("who", ["oscar", "ada"])
def test_created_key_is_shown_once_and_works(browser, cast, who):
    signed_in(browser, cast[who])
    answer = create(browser, expires_at="")
    assert answer.status_code == 200
    assert "no-store" in answer["Cache-Control"]
    shown = raw_keys(answer)
    assert len(shown) == 1
    raw = shown[0].decode()
    assert answer.content.count(raw.encode()) == 1
    assert b'data-copy="secret"' in answer.content
    api_key = authenticate_key(raw)
    assert (api_key.name, api_key.organization.slug) == ("ci-runner", "northwind-research")
    # Never rendered again: not on the list, the key's page, the org page, nor a reload.
    for url in (
        "/console/keys/",
        f"/console/keys/{api_key.public_id}/",
        "/console/orgs/northwind-research/",
        "/console/orgs/northwind-research/keys/new/",
    ):
        again = browser.get(url)
        assert (url, again.status_code, raw_keys(again)) == (url, 200, [])
        assert raw.encode() not in again.content


def test_sending_the_same_key_form_twice_issues_one_key(browser, cast):
    signed_in(browser, cast["oscar"])
    form = browser.get("/console/orgs/northwind-research/keys/new/").content.decode()
    once = re.search(r'name="once" value="([^"]+)"', form).group(1)
    fields = {"once": once, "name": "reloaded"}
    first = browser.post("/console/orgs/northwind-research/keys/new/", fields)
    assert len(raw_keys(first)) == 1
    again = browser.post("/console/orgs/northwind-research/keys/new/", fields, follow=True)
    assert raw_keys(again) == []
    assert "no second key was made" in again.content.decode()
    assert ApiKey.objects.filter(name="reloaded").count() == 1


def test_created_key_with_an_expiry_expires(browser, cast):
    signed_in(browser, cast["oscar"])
    when = timezone.now() + timedelta(days=30)
    answer = create(browser, expires_at=when.strftime("%Y-%m-%dT%H:%M"))
    raw = raw_keys(answer)[0].decode()
    api_key = authenticate_key(raw)
    assert api_key.expires_at.date() == when.date()
    with pytest.raises(KeyRefused) as refused:
        authenticate_key(raw, now=when + timedelta(days=1))
    assert refused.value.code == "key_expired"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", ""),
        ("name", "nul\x00byte"),
        ("name", "n" * 10_000),
        ("expires_at", "2001-01-01T00:00"),
        ("expires_at", "tomorrow\x00"),
    ],
)
def test_key_form_refuses_hostile_input(browser, cast, field, value):
    signed_in(browser, cast["oscar"])
    answer = create(browser, **{field: value})
    assert answer.status_code == 400
    assert b'class="error"' in answer.content
    assert raw_keys(answer) == []
    assert ApiKey.objects.count() == 0


def test_key_names_are_shown_escaped_and_keys_redacted(browser, cast):
    signed_in(browser, cast["oscar"])
    create(browser, name="<script>alert(1)</script>")
    create(browser, name=f"copy of {KEY_SHAPED}")
    names = set(ApiKey.objects.values_list("name", flat=True))
    assert names == {"<script>alert(1)</script>", "copy of sgk_0123456789abcdef_[redacted]"}
    page = browser.get("/console/keys/").content
    assert b"<script>alert" not in page
    assert b"&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert KEY_SHAPED.encode() not in page
    assert b"sgk_0123456789abcdef_[redacted]" in page


# --- rotate and revoke -----------------------------------------------------------------------


def test_rotation_shows_the_successor_once_and_keeps_the_old_key_for_the_grace(
    browser, cast, northwind_key
):
    signed_in(browser, cast["oscar"])
    old = northwind_key.api_key
    answer = browser.post(f"/console/keys/{old.public_id}/rotate/", {"grace_hours": 2})
    assert answer.status_code == 200
    assert "no-store" in answer["Cache-Control"]
    shown = raw_keys(answer)
    assert len(shown) == 1
    successor = authenticate_key(shown[0].decode())
    assert successor.rotated_from_id == old.pk
    assert authenticate_key(northwind_key.raw_key).pk == old.pk  # within the grace
    with pytest.raises(KeyRefused) as refused:
        authenticate_key(northwind_key.raw_key, now=timezone.now() + timedelta(hours=3))
    assert refused.value.code == "key_expired"
    assert raw_keys(browser.get("/console/keys/")) == []
    old_page = browser.get(f"/console/keys/{old.public_id}/").content
    assert (
        f'Rotated to</dt><dd><a href="/console/keys/{successor.public_id}/">'.encode() in old_page
    )


def test_rotation_with_no_grace_ends_the_old_key_at_once(browser, cast, northwind_key):
    signed_in(browser, cast["ada"])
    old = northwind_key.api_key
    browser.post(f"/console/keys/{old.public_id}/rotate/", {"grace_hours": 0})
    with pytest.raises(KeyRefused) as refused:
        authenticate_key(northwind_key.raw_key)
    assert refused.value.code == "key_expired"


@pytest.mark.parametrize("grace", ["-1", "721", "two", "1\x00", "9" * 10_000])
def test_rotation_refuses_a_bad_grace(browser, cast, northwind_key, grace):
    signed_in(browser, cast["oscar"])
    url = f"/console/keys/{northwind_key.api_key.public_id}/rotate/"
    answer = browser.post(url, {"grace_hours": grace})
    assert answer.status_code == 400
    assert b'class="error"' in answer.content
    assert ApiKey.objects.count() == 1


def test_rotating_twice_is_refused_with_the_reason(browser, cast, northwind_key):
    signed_in(browser, cast["oscar"])
    url = f"/console/keys/{northwind_key.api_key.public_id}/rotate/"
    assert browser.post(url, {"grace_hours": 5}).status_code == 200
    answer = browser.post(url, {"grace_hours": 5})
    assert answer.status_code == 409
    assert b"already rotated" in answer.content
    assert raw_keys(answer) == []


def test_revoked_key_is_refused(browser, cast, northwind_key):
    signed_in(browser, cast["oscar"])
    url = f"/console/keys/{northwind_key.api_key.public_id}/"
    answer = browser.post(f"{url}revoke/", {"reason": f"leaked as {KEY_SHAPED}"})
    assert (answer.status_code, answer["Location"]) == (302, url)
    with pytest.raises(KeyRefused) as refused:
        authenticate_key(northwind_key.raw_key)
    assert refused.value.code == "key_revoked"
    page = browser.get(url).content
    assert b"leaked as sgk_0123456789abcdef_[redacted]" in page
    assert b"/rotate/" not in page  # a revoked key has no actions left
    # A revoked key cannot be rotated back to life.
    assert browser.post(f"{url}rotate/", {"grace_hours": 1}).status_code == 409


@pytest.mark.parametrize("reason", ["", "nul\x00", "r" * 10_000])
def test_revoke_needs_a_reason(browser, cast, northwind_key, reason):
    signed_in(browser, cast["oscar"])
    url = f"/console/keys/{northwind_key.api_key.public_id}/revoke/"
    answer = browser.post(url, {"reason": reason})
    assert answer.status_code == 400
    assert b'class="error"' in answer.content
    assert authenticate_key(northwind_key.raw_key).pk == northwind_key.api_key.pk


# --- usage sparkline -------------------------------------------------------------------------


def _hour_rows(org, key: str, requests_by_hours_back: dict[int, int], reason="ok") -> None:
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    for back, requests in requests_by_hours_back.items():
        UsageRollup.objects.create(
            bucket_seconds=UsageRollup.HOUR,
            bucket_start=hour - timedelta(hours=back),
            release="atlas-2",
            stage="research_preview",
            tier="research_partner",
            org=org.public_id,
            reason=reason,
            key=key,
            requests=requests,
        )


def test_each_key_has_its_own_sparkline_on_the_keys_key_and_org_pages(
    browser, cast, ada, northwind, northwind_key
):
    busy = northwind_key.api_key
    idle = issue_key(organization=northwind, name="idle-<b>key</b>", actor=ada).api_key
    _hour_rows(northwind, busy.public_id, {1: 40, 30: 7})
    _hour_rows(northwind, busy.public_id, {30: 3}, reason="rate_limited")  # same hour
    _hour_rows(northwind, busy.public_id, {24 * 8: 1000})  # older than 7 days: not drawn
    _hour_rows(northwind, "", {2: 500})  # calls without a valid key: no key's
    UsageRollup.objects.create(  # minute rows are not read (the hour row holds them)
        bucket_seconds=UsageRollup.MINUTE,
        bucket_start=timezone.now().replace(second=0, microsecond=0) - timedelta(hours=3),
        org=northwind.public_id,
        key=busy.public_id,
        requests=900,
    )
    busy_title = (
        f"<title>research-batch ({busy.prefix}…): requests per hour over 7 days:"
        " 50 in all, peak 40</title>"
    )
    idle_title = (
        f"<title>idle-&lt;b&gt;key&lt;/b&gt; ({idle.prefix}…): requests per hour over 7 days:"
        " no traffic</title>"
    )
    signed_in(browser, cast["vera"])
    key_page = browser.get(f"/console/keys/{busy.public_id}/").content.decode()
    assert busy_title in key_page
    assert "this key's requests per hour" in key_page
    assert "all keys" not in key_page
    assert idle_title in browser.get(f"/console/keys/{idle.public_id}/").content.decode()
    for url in ("/console/keys/", "/console/orgs/northwind-research/"):
        page = browser.get(url).content.decode()
        assert busy_title in page, url
        assert idle_title in page, url
        assert "<b>key</b>" not in page
    org_page = browser.get("/console/orgs/northwind-research/").content.decode()
    # The organization's own line stays on its page, keyless calls included: 550.
    assert "northwind-research: requests per hour over 7 days, all keys: 550 in all" in org_page


def test_a_key_sparkline_shows_only_that_keys_traffic(browser, cast, northwind, acme, acme_key):
    _hour_rows(northwind, "key_someoneelse00", {1: 11})
    _hour_rows(acme, acme_key.api_key.public_id, {5: 2})
    signed_in(browser, cast["olga"])
    page = browser.get("/console/keys/").content.decode()
    assert "acme-prod" in page and "2 in all, peak 2" in page
    assert "11 in all" not in page


# --- bounded queries -------------------------------------------------------------------------


def _keys(count: int, start: int, ada) -> None:
    for n in range(start, start + count):
        org = make_org(f"bulk-{n:03d}", "public")
        issue_key(organization=org, name=f"k{n}", actor=ada)
        issue_key(organization=org, name=f"j{n}", actor=ada)


@pytest.mark.parametrize("who", ["vera", "oscar"])
def test_keys_page_queries_do_not_grow_with_keys(
    browser, cast, ada, who, northwind_key, django_assert_num_queries
):
    signed_in(browser, cast[who])
    _keys(2, 0, ada)
    browser.get("/console/keys/")
    with CaptureQueriesContext(connection) as small:
        assert browser.get("/console/keys/").status_code == 200
    assert len(small.captured_queries) <= 12
    _keys(20, 2, ada)
    with django_assert_num_queries(len(small.captured_queries)):
        browser.get("/console/keys/")


def test_key_and_org_pages_queries_do_not_grow_with_keys(
    browser, cast, ada, northwind, northwind_key, django_assert_num_queries
):
    signed_in(browser, cast["oscar"])
    key_url = f"/console/keys/{northwind_key.api_key.public_id}/"
    for n in range(2):
        issue_key(organization=northwind, name=f"few-{n}", actor=ada)
    browser.get("/console/orgs/northwind-research/")
    counts = {}
    for url in ("/console/orgs/northwind-research/", key_url):
        with CaptureQueriesContext(connection) as small:
            assert browser.get(url).status_code == 200
        counts[url] = len(small.captured_queries)
    for n in range(20):
        key = issue_key(organization=northwind, name=f"many-{n}", actor=ada).api_key
        _hour_rows(northwind, key.public_id, {n: n + 1})
    for url, count in counts.items():
        with django_assert_num_queries(count):
            answer = browser.get(url)
        assert answer.status_code == 200
    assert answer.content.count(b'class="sparkline"') == 1  # the key page: its key only
