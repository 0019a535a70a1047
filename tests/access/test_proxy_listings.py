"""What a key may see through the proxy (access/proxy/listings.py): /v1/models,
/v1/models/{id} and /v1/access over HTTP against a real server (the cast:
tests/access/proxy_cast.py)."""

from __future__ import annotations

import httpx
import pytest

from tests.access.proxy_cast import ORGS

pytestmark = pytest.mark.usefixtures("live_db")


# --- who sees what --------------------------------------------------------------------------


def test_each_tier_sees_exactly_the_models_its_stage_admits(cast):
    expected = {
        "northwind-research": ["atlas-2", "atlas-lite"],
        "acme-commercial": ["atlas-lite"],
        "tartu-university": ["atlas-lite"],
        "public-dev": ["atlas-lite"],
    }
    seen = {org: sorted(m.id for m in cast.client(org).models.list()) for org in ORGS}
    assert seen == expected
    assert cast.client().models.retrieve("atlas-2").id == "atlas-2"


def test_access_report_explains_refusals_without_revealing_hidden_models(cast):
    response = httpx.get(
        f"{cast.server.url}/v1/access",
        headers={"Authorization": f"Bearer {cast.keys['acme-commercial']}"},
    )
    assert response.status_code == 200
    report = response.json()
    assert [(m["id"], m["allowed"], m["tier"]) for m in report["models"]] == [
        ("atlas-lite", True, "verified_commercial")
    ]
    assert report["models"][0]["limits"]["requests_per_minute"] == 300
