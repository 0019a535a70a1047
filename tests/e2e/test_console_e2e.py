"""The console end to end: people in headless Chromium (tests/e2e/conftest.py) doing
their jobs on a live Stagegate server, and the proxy checked with the official
``openai`` client.

Cast: atlas-2 on the example plan (docs/examples/atlas-2.yaml) with the demo model as
its upstream, in its first stage (research_preview: the research partners only); four
organizations, one per tier, each with a key; ada the rollout admin, reviewers rita
and ruth, olga the org admin of acme-commercial.

Every page the browser loads is checked for console errors and CSP violations (the
``console`` fixture fails the test on any).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

import openai
import pytest
from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from access.keys import issue_key
from access.models import Organization
from monitoring.usage import write_events
from rollout.models import Approval, Release
from rollout.plans import apply_plan
from rollout.reviews import create_review
from tests.factories import EXAMPLE_PLAN, make_org, make_user, traffic, usage_event
from tests.live import DemoUpstream, ProxyServer, wait_until

pytestmark = pytest.mark.usefixtures("live_db")

ORGS = {
    "northwind-research": "research_partner",
    "meridian-safety-lab": "research_partner",
    "oxbridge-alignment": "research_partner",
    "acme-commercial": "verified_commercial",
    "tartu-university": "credentialed_academic",
    "public-dev": "public",
}
PARTNERS = {slug: tier for slug, tier in ORGS.items() if tier == "research_partner"}
HELLO = [{"role": "user", "content": "Say hello to the staged rollout."}]
# How long a change made in the console may take to reach the proxy.
PROXY_BOUND = 2.0


@dataclass
class Cast:
    server: ProxyServer
    upstream: DemoUpstream
    release: Release
    keys: dict[str, str]

    def client(self, org: str, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.server.url}/v1", api_key=key or self.keys[org], max_retries=0
        )

    def chat(self, org: str, key: str | None = None) -> str:
        """One chat completion on atlas-2; the answer's text."""
        reply = self.client(org, key).chat.completions.create(
            model="atlas-2", messages=HELLO, max_tokens=16
        )
        return reply.choices[0].message.content

    def refused(self, org: str, key: str | None = None) -> openai.APIStatusError | None:
        """The proxy's refusal of one call, or None when it admits it."""
        try:
            self.chat(org, key)
        except openai.APIStatusError as refusal:
            return refusal
        return None


def plan_text(base_url: str) -> str:
    """The example plan with the demo model as its upstream."""
    return EXAMPLE_PLAN.read_text().replace("http://127.0.0.1:8001/v1", base_url)


def set_browser_password(user) -> None:
    """Give ``user`` a password hash the server can check.

    The test settings hash with MD5 for speed, which the server (default hashers) does
    not accept. PBKDF2 with few iterations is checked by the server, which upgrades it
    to full strength on the first sign-in."""
    from django.contrib.auth.hashers import PBKDF2PasswordHasher

    password = f"{user.username}-pass-9137"
    user.password = PBKDF2PasswordHasher().encode(password, f"salt{user.pk}e2e", iterations=1000)
    user.save(update_fields=["password"])


def people(*users):
    for user in users:
        set_browser_password(user)
    return users


@pytest.fixture
def cast(proxy_server, demo_upstream) -> Cast:
    for slug, tier in ORGS.items():
        make_org(slug, tier)
    ada = make_user("ada", roles=("rollout_admin",))
    apply_plan(plan_text(demo_upstream.base_url), actor=ada)
    keys = {
        org.slug: issue_key(organization=org, name="e2e", actor=None).raw_key
        for org in Organization.objects.all()
    }
    proxy_server.wait_synced()
    return Cast(proxy_server, demo_upstream, Release.objects.get(name="atlas-2"), keys)


def ready_to_advance(release: Release, *, requests: int = 12_000) -> None:
    """Make the research preview pass its exit criteria: 15 days in the stage and clean
    traffic from the three partners, rolled up as the minute job would."""
    from monitoring.rollups import rollup_pending

    with transaction.atomic():
        Release.objects.filter(pk=release.pk).update(
            stage_entered_at=timezone.now() - timedelta(days=15)
        )
    now = timezone.now()
    write_events(
        traffic(
            release=release.name,
            stage="research_preview",
            orgs=PARTNERS,
            count=requests,
            start=now - timedelta(days=2),
            end=now - timedelta(minutes=10),
        )
    )
    rollup_pending()
    release.refresh_from_db()


# --- the shell ------------------------------------------------------------------------------


def test_a_rollout_admin_signs_in_and_sees_the_board(cast, console):
    people(User.objects.get(username="ada"))

    console.sign_in("ada")

    assert console.page.url == console.url("/console/")
    assert console.page.get_by_role("link", name="atlas-2").first.is_visible()


def test_the_harness_sees_a_csp_violation(cast, console):
    """The "no errors" check of every test is not vacuous: an inline script slipped into
    a console page is blocked by the CSP, and the harness reports it."""
    people(User.objects.get(username="ada"))
    console.sign_in("ada")
    console.page.evaluate(
        """() => { const s = document.createElement("script");
        s.textContent = "window.injected = true"; document.body.appendChild(s); }"""
    )
    wait_until(console.problems, timeout=5, what="the violation to be reported")

    problems = console.problems()
    assert any("script-src" in problem for problem in problems), problems
    assert console.page.evaluate("window.injected === undefined")
    console.errors.clear()
    console.page.evaluate("window.__cspViolations = []")


def time_until(check, *, bound: float, what: str) -> float:
    """Seconds until ``check()`` holds, polled every 20 ms; fails past ``bound`` seconds
    (counted from the call: the caller adds what it did before)."""
    started = time.monotonic()
    wait_until(check, timeout=bound, what=what)
    return time.monotonic() - started


def current_stage(console, *, scope: str = "") -> str:
    """The highlighted stage of the (first) stage ladder on the page."""
    return console.page.locator(f'{scope} .ladder [aria-current="step"]').first.inner_text()


def advance_review(cast: Cast):
    """A scheduled review of atlas-2 that recommends advancing to commercial."""
    ready_to_advance(cast.release)
    review = create_review(cast.release, trigger="schedule")
    assert review.recommendation == "advance", review.summary
    return review


# --- reviewers ------------------------------------------------------------------------------


def test_two_reviewers_approve_an_advance_and_the_proxy_admits_the_next_tier(
    cast, console, record_property
):
    people(make_user("rita", roles=("reviewer",)), make_user("ruth", roles=("reviewer",)))
    advance_review(cast)
    refusal = cast.refused("acme-commercial")
    assert refusal is not None and refusal.status_code == 404, refusal
    page = console.page

    console.sign_in("rita")
    console.goto("/console/releases/atlas-2/")
    page.get_by_role("button", name="Approve").click()
    page.get_by_text("1 of 2 approvals counted").wait_for()
    console.sign_out()

    console.sign_in("ruth")
    console.goto("/console/releases/atlas-2/")
    with page.expect_navigation():
        page.get_by_role("button", name="Approve").click()
    approved = time.monotonic()
    assert current_stage(console) == "commercial"

    console.goto("/console/")
    assert current_stage(console, scope=".release-card") == "commercial"
    # The proxy follows the console within a second or two: acme (verified commercial,
    # in the commercial stage's 50% cohort) is admitted, the research partners still are.
    time_until(
        lambda: cast.refused("acme-commercial") is None,
        bound=PROXY_BOUND,
        what="the proxy to admit acme-commercial at commercial",
    )
    record_property("proxy_admits_after_approval_s", round(time.monotonic() - approved, 3))
    assert cast.chat("northwind-research")
    refusal = cast.refused("tartu-university")
    assert refusal is not None and refusal.status_code == 404


FOCUSED = """(() => { const e = document.activeElement;
  return e ? e.tagName + "#" + e.id + ":" + e.textContent.trim().slice(0, 40) : ""; })()"""


def tab_to(page, target: str, *, limit: int = 150) -> str:
    """Press Tab until the focused element's "TAG#id:text" starts with ``target``."""
    focused = ""
    for _ in range(limit):
        page.keyboard.press("Tab")
        focused = page.evaluate(FOCUSED)
        if focused.startswith(target):
            outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
            assert outline != "none", f"{focused} has the focus but shows no focus ring"
            return focused
    raise AssertionError(f"Tab never reached {target} (last focus: {focused})")


def test_a_reviewer_approves_by_keyboard_alone(cast, console):
    rita = make_user("rita", roles=("reviewer",))
    people(rita)
    review = advance_review(cast)
    page = console.page
    console.goto("/console/login/")

    # Sign in, open the release from the board, comment and approve: keys only.
    tab_to(page, "INPUT#id_username")
    page.keyboard.type("rita")
    tab_to(page, "INPUT#id_password")
    page.keyboard.type("rita-pass-9137")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    tab_to(page, "A#:atlas-2")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.url == console.url("/console/releases/atlas-2/")
    tab_to(page, "TEXTAREA#id_approve-comment")
    page.keyboard.type("Clean for two weeks; approved from the keyboard.")
    tab_to(page, "BUTTON#:Approve", limit=1)
    with page.expect_navigation():
        page.keyboard.press("Space")  # and the confirmation dialog is accepted

    page.get_by_text("1 of 2 approvals counted").wait_for()
    approval = Approval.objects.get(review=review, reviewer=rita)
    assert (approval.verdict, approval.comment) == (
        "approve",
        "Clean for two weeks; approved from the keyboard.",
    )


# --- the release page -----------------------------------------------------------------------


def some_usage(release: Release, *, hours: int = 72) -> None:
    """Three days of research-preview traffic that rises and falls with the working day,
    with a few flags and errors, rolled up, so the release page's charts have a shape."""
    from monitoring.rollups import rollup_pending

    now = timezone.now()
    events = []
    for hour in range(hours):
        start = now - timedelta(hours=hour + 1)
        events += traffic(
            release=release.name,
            stage="research_preview",
            orgs=PARTNERS,
            count=40 + (start.hour * 37) % 17 + (60 if 8 <= start.hour <= 18 else 0),
            start=start,
            end=start + timedelta(minutes=59),
            # traffic() marks the first request of a batch: some hours have one.
            flagged_every=500 if hour % 4 == 1 else 0,
            error_every=70 if hour % 3 == 0 else 0,
        )
        events += [  # a few requests over the rate limit
            usage_event(
                at=start + timedelta(minutes=minute),
                release=release.name,
                stage="research_preview",
                org="northwind-research",
                tier="research_partner",
                request_id=f"req-limited-{hour}-{minute}",
                decision="deny",
                reason="rate_limited",
                status=429,
                prompt_tokens=0,
                completion_tokens=0,
            )
            for minute in range(0, 60, 6 + hour % 9)
        ]
    write_events(events)
    rollup_pending()


def test_the_release_page_draws_its_charts(cast, console, artifacts_dir):
    people(User.objects.get(username="ada"))
    with transaction.atomic():
        Release.objects.filter(pk=cast.release.pk).update(
            stage_entered_at=timezone.now() - timedelta(days=3)
        )
    some_usage(cast.release)
    page = console.page
    console.sign_in("ada")

    console.goto("/console/releases/atlas-2/")

    charts = page.locator("svg.chart")
    assert charts.count() >= 4
    for index in range(charts.count()):
        chart = charts.nth(index)
        assert chart.is_visible()
        assert chart.get_attribute("role") == "img"
        assert chart.locator("title").first.text_content().strip()
    shot = page.screenshot(full_page=True)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 20_000
    if artifacts_dir is not None:  # the README's picture: the page down to its charts
        artifacts_dir.mkdir(parents=True, exist_ok=True)
        bottom = page.locator('section[aria-labelledby="charts"]').bounding_box()
        page.screenshot(
            path=str(artifacts_dir / "console-release.png"),
            full_page=True,
            clip={"x": 0, "y": 0, "width": 1366, "height": bottom["y"] + bottom["height"] + 16},
        )


# --- org admins and their keys --------------------------------------------------------------


def test_an_org_admin_creates_a_key_calls_the_proxy_and_revokes_it(cast, console, record_property):
    northwind = Organization.objects.get(slug="northwind-research")
    people(make_user("oscar", org_admin_of=(northwind,)))
    page = console.page
    console.sign_in("oscar")

    assert page.url == console.url("/console/orgs/")  # the board is for staff
    page.get_by_role("link", name="Northwind Research").click()
    create = page.locator('form[action$="/keys/new/"]')
    create.get_by_label("Name").fill("e2e-batch-jobs")
    create.get_by_role("button", name="Create key").click()
    page.get_by_text("This is the only time the secret is shown").wait_for()
    secret = page.locator("#secret").inner_text().strip()
    assert secret.startswith("sgk_")

    # The new key works once the proxy has loaded it.
    admitted = time_until(
        lambda: cast.refused("northwind-research", secret) is None,
        bound=PROXY_BOUND,
        what="the proxy to admit the new key",
    )
    record_property("new_key_admitted_after_s", round(admitted, 3))

    page.get_by_role("link", name="Done: go to the key").click()
    revoke = page.locator('form[action$="/revoke/"]')
    revoke.get_by_label("Reason").fill("e2e: the batch job moved to another key")
    with page.expect_navigation():
        revoke.get_by_role("button", name="Revoke").click()
    revoked = time.monotonic()
    page.get_by_text("revoked; it is refused from now on").wait_for()

    # The next call is refused within a second; the organization's other key still works.
    time_until(
        lambda: (
            (refusal := cast.refused("northwind-research", secret)) is not None
            and refusal.status_code == 401
        ),
        bound=1.0,
        what="the proxy to refuse the revoked key",
    )
    record_property("revoked_key_refused_after_s", round(time.monotonic() - revoked, 3))
    assert cast.chat("northwind-research")


# --- incidents ------------------------------------------------------------------------------


def test_an_incident_filed_in_the_console_pauses_the_release_through_its_tripwire(
    cast, console, record_property
):
    # research_preview's "serious-incident" tripwire pauses on an open incident of
    # severity high or above (docs/examples/atlas-2.yaml).
    people(User.objects.get(username="ada"))
    assert cast.chat("northwind-research")
    page = console.page
    console.sign_in("ada")

    console.goto("/console/incidents/")
    page.locator("#id_file-release").select_option("atlas-2")
    page.locator("#id_file-severity").select_option("high")
    page.locator("#id_file-title").fill("e2e: the model gives unsafe chemistry advice")
    with page.expect_navigation():
        page.get_by_role("button", name="File incident").click()
    filed = time.monotonic()
    page.get_by_text("filed.").wait_for()

    console.goto("/console/releases/atlas-2/")
    assert page.locator("h1 .badge").inner_text().strip() == "paused"
    assert page.get_by_text("serious-incident").first.is_visible()
    time_until(
        lambda: (
            (refusal := cast.refused("northwind-research")) is not None
            and refusal.code == "release_paused"
        ),
        bound=PROXY_BOUND,
        what="the proxy to refuse the paused release",
    )
    record_property("proxy_refuses_after_incident_s", round(time.monotonic() - filed, 3))
    cast.release.refresh_from_db()
    assert cast.release.state == "paused"
