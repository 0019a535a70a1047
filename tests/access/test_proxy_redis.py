"""The proxy's rate limits in Redis under load and across a Redis restart (issue 13,
defects 4 and 9): a real server on a free port, over HTTP, with a private
``redis-server`` each test starts, restarts and stops (skipped without the binary).

On PostgreSQL the server runs in production mode, as it would be deployed; on SQLite
it runs embedded with ``REDIS_URL`` set, which uses the same limiter.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from django.db import connection

from access.keys import issue_key
from access.ratelimits import LEASE_MAX_REQUESTS
from rollout.plans import apply_plan
from tests.access.proxy_cast import HELLO, plan_text, usage_events
from tests.factories import make_org
from tests.live import METRICS_TOKEN, ProxyServer, RedisServer

pytestmark = pytest.mark.usefixtures("live_db")

# Smaller than the callers, so callers wait for a pooled connection.
POOL = 16


@dataclass
class Limited:
    server: ProxyServer
    redis: RedisServer
    key: str

    def metric(self, name: str) -> float:
        scraped = httpx.get(
            f"{self.server.url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
        ).text
        found = re.search(rf"^{name} (\S+)$", scraped, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def burst(self, callers: int) -> list[httpx.Response]:
        """``callers`` chat calls at once, each on its own connection."""

        async def main():
            limits = httpx.Limits(max_connections=callers, max_keepalive_connections=0)
            async with httpx.AsyncClient(limits=limits, timeout=60) as client:
                return await asyncio.gather(
                    *(
                        client.post(
                            f"{self.server.url}/v1/chat/completions",
                            headers={"Authorization": f"Bearer {self.key}"},
                            json={"model": "atlas-2", "messages": HELLO, "max_tokens": 4},
                        )
                        for _ in range(callers)
                    )
                )

        return asyncio.run(main())


def _server_env(redis_url: str) -> dict[str, str]:
    env = {"REDIS_URL": redis_url, "STAGEGATE_REDIS_MAX_CONNECTIONS": str(POOL)}
    if connection.vendor == "postgresql":
        env |= {
            "STAGEGATE_MODE": "production",
            "SECRET_KEY": "x" * 60,
            "ALLOWED_HOSTS": "127.0.0.1",
        }
    return env


@pytest.fixture
def limited(demo_upstream) -> Iterator[Limited]:
    redis_server = RedisServer()
    org = make_org("northwind-research", "research_partner")
    apply_plan(plan_text(demo_upstream.base_url, rpm=100_000), actor=None)
    key = issue_key(organization=org, name="test", actor=None).raw_key
    try:
        server = ProxyServer(env=_server_env(redis_server.url))
    except BaseException:
        redis_server.stop()
        raise
    server.wait_synced()
    yield Limited(server, redis_server, key)
    server.stop()
    redis_server.stop()


def test_256_concurrent_callers_on_one_worker_get_no_errors(limited):
    answers = limited.burst(256)
    assert Counter(answer.status_code for answer in answers) == {200: 256}
    assert len(usage_events(256, endpoint="chat.completions", status=200)) == 256
    assert limited.metric('stagegate_proxy_unavailable_total{store="limits"}') == 0
    assert limited.metric("stagegate_proxy_reservations_unsettled_total") == 0


def test_a_redis_restart_refuses_no_request_with_503(limited):
    """After a restart without persistence every pooled connection is dead (each is
    retried on a new one) and the counters are gone: the worker spends what its lease
    held from before, then the rest of that minute is refused with 429 (fail closed),
    never 503."""
    assert Counter(answer.status_code for answer in limited.burst(64)) == {200: 64}
    if time.time() % 60 > 45:  # the bursts after the restart inside one minute
        time.sleep(61 - time.time() % 60)
    limited.redis.restart()
    first = Counter(answer.status_code for answer in limited.burst(LEASE_MAX_REQUESTS + 8))
    assert set(first) <= {200, 429} and first[429] >= 8
    answers = limited.burst(50)  # the lease is spent: every one asks Redis
    assert Counter(answer.status_code for answer in answers) == {429: 50}
    assert {answer.json()["error"]["code"] for answer in answers} == {"rate_limited"}
    assert {answer.headers["x-ratelimit-remaining-requests"] for answer in answers} == {"0"}
    assert all(1 <= int(answer.headers["retry-after"]) <= 60 for answer in answers)
    assert limited.metric("stagegate_proxy_limit_counters_lost_total") == 1
    assert limited.metric('stagegate_proxy_unavailable_total{store="limits"}') == 0
