"""Fixtures of the proxy's end-to-end tests (the cast: tests/access/proxy_cast.py)."""

from __future__ import annotations

import pytest

from access.keys import issue_key
from access.models import Organization
from rollout.plans import apply_plan
from tests.access.proxy_cast import ORGS, Cast, plan_text, set_release
from tests.factories import make_org


@pytest.fixture
def cast(proxy_server, demo_upstream) -> Cast:
    for slug, tier in ORGS.items():
        make_org(slug, tier)
    apply_plan(plan_text(demo_upstream.base_url), actor=None)
    apply_plan(plan_text(demo_upstream.base_url, release="atlas-lite"), actor=None)
    set_release("atlas-lite", current_stage="general")
    keys = {
        org.slug: issue_key(organization=org, name="test", actor=None).raw_key
        for org in Organization.objects.all()
    }
    proxy_server.wait_synced()
    return Cast(proxy_server, demo_upstream, keys)
