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
from rollout.models import Release
from rollout.plans import apply_plan
from tests.factories import EXAMPLE_PLAN, make_org, make_user, traffic
from tests.live import DemoUpstream, ProxyServer

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
