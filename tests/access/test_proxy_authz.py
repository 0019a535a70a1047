"""The proxy's /authz for nginx auth_request and Envoy ext_authz
(access/proxy/authz.py) over HTTP against a real server (the cast:
tests/access/proxy_cast.py); nginx itself in front: tests/test_gateways.py."""

from __future__ import annotations

import httpx
import pytest

from rollout.plans import apply_plan
from tests.access.proxy_cast import plan_text, unscreened

pytestmark = pytest.mark.usefixtures("live_db")


def _authz(cast, model: str = "atlas-2") -> httpx.Response:
    return httpx.get(
        f"{cast.server.url}/authz",
        headers={
            "Authorization": f"Bearer {cast.keys['northwind-research']}",
            "X-Stagegate-Model": model,
        },
    )


def test_authz_refuses_a_stage_that_screens(cast):
    """The example plan screens at every stage: a gateway cannot, so it is refused,
    and admitted again once the stage no longer screens."""
    screened = _authz(cast)
    assert (screened.status_code, screened.headers["x-stagegate-reason"]) == (
        403,
        "screening_requires_proxy",
    )
    assert "through Stagegate's proxy" in screened.json()["error"]["message"]
    apply_plan(unscreened(plan_text(cast.upstream.base_url)), actor=None)
    cast.server.wait_synced()
    assert _authz(cast).status_code == 200


def test_authz_endpoint_answers_nginx_and_envoy(cast):
    apply_plan(unscreened(plan_text(cast.upstream.base_url)), actor=None)
    cast.server.wait_synced()
    url = cast.server.url
    key = cast.keys["northwind-research"]
    nginx = httpx.get(
        f"{url}/authz",
        headers={
            "Authorization": f"Bearer {key}",
            "X-Original-URI": "/v1/chat/completions",
            "X-Original-Method": "POST",
            "X-Stagegate-Model": "atlas-2",
        },
    )
    assert nginx.status_code == 200
    assert [nginx.headers[f"x-stagegate-{h}"] for h in ("org", "tier", "stage")] == [
        "northwind-research",
        "research_partner",
        "research_preview",
    ]
    envoy = httpx.post(f"{url}/authz/v1/models/atlas-2", headers={"x-api-key": key})
    assert envoy.status_code == 200
    assert envoy.headers["x-stagegate-release"] == "atlas-2"

    hidden = httpx.get(
        f"{url}/authz",
        headers={
            "Authorization": f"Bearer {cast.keys['acme-commercial']}",
            "X-Stagegate-Model": "atlas-2",
        },
    )
    assert (hidden.status_code, hidden.headers["x-stagegate-reason"]) == (403, "unknown_model")
    bad = httpx.get(
        f"{url}/authz", headers={"Authorization": "Bearer sk-nope", "X-Stagegate-Model": "atlas-2"}
    )
    assert (bad.status_code, bad.headers["x-stagegate-reason"]) == (401, "invalid_key")
