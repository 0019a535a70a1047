"""The access explainer: the proxy's own decision for an organization or a key id and a
release, now and at the next stage; a pasted secret is refused and never shown."""

from __future__ import annotations

import time

import pytest
from django.test import Client

from access.decisions import RequestInfo, decide
from access.keys import issue_key, revoke_key
from access.snapshot import load_snapshot

pytestmark = pytest.mark.django_db

URL = "/console/access/"


@pytest.fixture
def browser():
    return Client()


def proxy_decision(org_slug: str, release: str = "atlas-2"):
    """What the proxy decides for a usable key of ``org_slug``, from its own snapshot."""
    snapshot = load_snapshot()
    org_pk, org = next((pk, o) for pk, o in snapshot.orgs.items() if o.slug == org_slug)
    key = next(k for k in snapshot.keys.values() if k.org_id == org_pk)
    return decide(
        key=key,
        org=org,
        release=snapshot.releases.get(release),
        model=release,
        request=RequestInfo("access"),
        now=time.time(),
    )


def test_anonymous_is_sent_to_the_login_page(browser):
    answer = browser.get(URL)
    assert (answer.status_code, answer["Location"]) == (302, f"/console/login/?next={URL}")


@pytest.mark.parametrize("who", ["oscar", "olga", "nobody"])
def test_the_explainer_is_for_staff(browser, who, request):
    browser.force_login(request.getfixturevalue(who))
    assert browser.get(URL).status_code == 403
    assert browser.post(URL, {"organization": "northwind-research"}).status_code == 403


@pytest.mark.parametrize("who", ["ada", "rita", "vera"])
def test_every_staff_role_sees_the_form(browser, who, request, release):
    browser.force_login(request.getfixturevalue(who))
    page = browser.get(URL)
    assert page.status_code == 200
    assert b'name="organization"' in page.content
    assert page["Cache-Control"].startswith("max-age=0")


def test_northwind_is_allowed_now_as_the_proxy_decides(browser, vera, release, northwind, ada):
    issue_key(organization=northwind, name="main", actor=ada)
    browser.force_login(vera)
    page = browser.get(URL, {"organization": "northwind-research", "release": "atlas-2"})
    text = page.content.decode()
    proxy = proxy_decision("northwind-research")
    assert (proxy.reason, proxy.limits.requests_per_minute) == ("ok", 60)
    assert "Now: northwind-research → atlas-2 at research_preview" in text
    assert "reason <code>ok</code>" in text
    assert '<th scope="row">requests_per_minute</th><td>60</td>' in text
    # At commercial the research tier keeps its limits.
    assert "At the next stage: commercial" in text
    assert "Nothing: the same decision and limits." in text


def test_acme_is_refused_now_and_allowed_at_commercial(browser, vera, release, acme, ada):
    issue_key(organization=acme, name="main", actor=ada)
    browser.force_login(vera)
    text = browser.post(URL, {"organization": "acme-commercial", "release": "atlas-2"}).content
    text = text.decode()
    assert proxy_decision("acme-commercial").reason == "model_not_available"
    now, later = text.split("At the next stage")
    assert "reason <code>model_not_available</code>" in now
    assert "the caller is told <code>unknown_model</code>" in now
    assert "reason <code>ok</code>" in later
    assert "decision: model_not_available → ok" in later
    assert "tier: — → verified_commercial" in later
    assert '<th scope="row">requests_per_minute</th><td>120</td>' in later


def test_a_key_id_is_judged_as_the_proxy_judges_that_key(browser, vera, release, northwind, ada):
    issued = issue_key(organization=northwind, name="main", actor=ada)
    browser.force_login(vera)
    prefix = issued.api_key.prefix
    text = browser.post(URL, {"key": prefix, "release": "atlas-2"}).content.decode()
    assert f"Now: {prefix} → atlas-2" in text
    assert "reason <code>ok</code>" in text
    revoke_key(api_key=issued.api_key, actor=ada, reason="test")
    text = browser.post(URL, {"key": prefix.upper()[4:], "release": "atlas-2"}).content.decode()
    assert "reason <code>key_revoked</code>" in text


def test_an_unknown_key_id_is_an_invalid_key(browser, vera, release):
    browser.force_login(vera)
    text = browser.post(URL, {"key": "sgk_0123456789abcdef", "release": "atlas-2"}).content
    assert b"reason <code>invalid_key</code>" in text


def test_a_paused_release_is_refused_now_and_judged_active_at_the_next_stage(
    browser, vera, release, northwind, ada
):
    from rollout.transitions import pause

    pause(release, actor=ada, reason="drill")
    browser.force_login(vera)
    text = browser.get(URL, {"organization": "northwind-research", "release": "atlas-2"})
    text = text.content.decode()
    assert "reason <code>release_paused</code>" in text
    assert "judged as if it were active" in text


def test_a_pasted_secret_is_refused_and_not_echoed(browser, vera, release, northwind, ada):
    raw = issue_key(organization=northwind, name="main", actor=ada).raw_key
    browser.force_login(vera)
    for text in (raw, f"my key is {raw}", raw[:26], raw.upper()):
        page = browser.post(URL, {"key": text, "release": "atlas-2"})
        assert page.status_code == 200
        body = page.content.decode()
        assert "looks like a whole API key" in body
        assert raw[21:] not in body
        assert raw[21:31].upper() not in body.upper()
        assert "Now:" not in body


@pytest.mark.parametrize(
    "data",
    [
        {"organization": "northwind-research"},  # no release
        {"release": "atlas-2"},  # neither org nor key
        {"organization": "northwind-research", "key": "sgk_0123456789abcdef", "release": "atlas-2"},
        {"organization": "no\x00pe", "release": "atlas-2"},
        {"organization": "x" * 10_000, "release": "atlas-2"},
        {"organization": "<script>alert(1)</script>", "release": "atlas-2"},
        {"key": "\x00", "release": "atlas-2"},
        {"key": "k" * 10_000, "release": "atlas-2"},
        {"key": "<script>alert(1)</script>", "release": "atlas-2"},
        {"key": "sgk_0123456789abcdef", "release": "99999999999999999999999"},
        {"key": "sgk_0123456789abcdef", "release": "atlas-2\x00"},
    ],
)
def test_hostile_input_is_a_form_error(browser, vera, release, northwind, data):
    browser.force_login(vera)
    for method in (browser.get, browser.post):
        page = method(URL, data)
        assert page.status_code == 200
        body = page.content.decode()
        assert 'role="alert"' in body
        assert "Now:" not in body
        assert "<script>alert" not in body
