"""The cast of the proxy's end-to-end tests (tests/access/test_proxy_*.py): a real
server on a free port, the official openai client, the demo upstream, and the test
database underneath. The ``cast`` fixture is in tests/access/conftest.py.

Cast: atlas-2 in its first stage (research_preview: northwind-research only) and
atlas-lite, the same plan at its last stage (general: every tier).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import openai
import yaml
from django.db import transaction

from access.models import Organization
from monitoring import audit
from monitoring.models import UsageEvent
from rollout.models import Release
from rollout.plans import apply_plan
from tests.factories import EXAMPLE_PLAN
from tests.live import DemoUpstream, ProxyServer, wait_until

ORGS = {
    "northwind-research": "research_partner",
    "acme-commercial": "verified_commercial",
    "tartu-university": "credentialed_academic",
    "public-dev": "public",
}


HELLO = [{"role": "user", "content": "Say hello to the staged rollout."}]


def plan_text(base_url: str, *, release: str = "atlas-2", model: str = "atlas-2-2026-11", rpm=None):
    text = EXAMPLE_PLAN.read_text()
    text = text.replace("release: atlas-2", f"release: {release}")
    text = text.replace("http://127.0.0.1:8001/v1", base_url)  # the upstream and classifier
    text = text.replace("model: atlas-2-2026-11", f"model: {model}")
    if rpm is not None:
        text = re.sub(r"requests_per_minute: \d+", f"requests_per_minute: {rpm}", text)
    return text


def unscreened(text: str) -> str:
    """The plan without any stage's screening (what a gateway can authorize)."""
    document = yaml.safe_load(text)
    for stage in document["stages"]:
        stage.pop("screening", None)
    return yaml.safe_dump(document, sort_keys=False)


def set_release(name: str, **fields) -> None:
    """Change a release's stage or state, audited (as the transition service will)."""
    with transaction.atomic():
        release = Release.objects.select_for_update().get(name=name)
        for field, value in fields.items():
            setattr(release, field, value)
        release.save()
        audit.record(
            "release.changed",
            actor=None,
            object_type="release",
            object_id=release.public_id,
            data=fields,
        )


@dataclass
class Cast:
    server: ProxyServer
    upstream: DemoUpstream
    keys: dict[str, str]

    def client(self, org: str = "northwind-research", server: ProxyServer | None = None):
        """The official client for ``org``'s key, on this module's server or ``server``."""
        return openai.OpenAI(
            base_url=f"{(server or self.server).url}/v1", api_key=self.keys[org], max_retries=0
        )

    def apply(self, **kwargs) -> None:
        apply_plan(plan_text(self.upstream.base_url, **kwargs), actor=None)
        self.server.wait_synced()


def usage_events(count: int, **filters) -> list[UsageEvent]:
    """Wait for ``count`` usage events of this test's organizations matching ``filters``.

    (A server shared by the module may still write the previous test's last events.)"""
    orgs = list(Organization.objects.values_list("public_id", flat=True))
    query = UsageEvent.objects.filter(org__in=orgs, **filters).order_by("id")
    return wait_until(
        lambda: rows if len(rows := list(query.all())) >= count else None,
        timeout=10,
        what=f"{count} usage events {filters}",
    )
