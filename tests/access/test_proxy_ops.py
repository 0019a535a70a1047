"""The proxy in operation (access/proxy/ops.py and the worker's lifecycle in
access/proxy/app.py): /healthz, /metrics, several workers, and the usage events a
crash or a shutdown leaves (the cast: tests/access/proxy_cast.py)."""

from __future__ import annotations

import re
import signal
import time

import httpx
import pytest

from access.keys import revoke_key
from access.models import ApiKey
from tests.access.proxy_cast import HELLO, usage_events
from tests.live import METRICS_TOKEN, ProxyServer, wait_until

pytestmark = pytest.mark.usefixtures("live_db")


# --- usage events survive -------------------------------------------------------------------


def test_usage_events_lost_on_a_crash_are_bounded_and_none_on_shutdown(cast):
    env = {"STAGEGATE_USAGE_FLUSH_SECONDS": "3600", "STAGEGATE_USAGE_BATCH_SIZE": "10"}
    crashing = ProxyServer(env=env)
    client = cast.client(server=crashing)
    for _ in range(25):
        client.chat.completions.create(model="atlas-2", messages=HELLO, max_tokens=2)

    def settled() -> tuple[int, int] | None:
        """(written, pending) once the writer has taken every full batch and written it
        (it wakes only for a full batch: a busy machine can find it mid-way)."""
        pending = crashing.health()["usage_pending"]
        written = len(usage_events(0))
        return (written, pending) if pending < 10 and written + pending == 25 else None

    written, pending = wait_until(settled, timeout=10, what="the full batches to be written")
    crashing.stop(signal.SIGKILL)
    assert written > 0  # what a crash loses (pending): less than one batch
    assert len(usage_events(0)) == written == 25 - pending

    graceful = ProxyServer(env=env)
    client = cast.client(server=graceful)
    for _ in range(5):
        client.chat.completions.create(model="atlas-2", messages=HELLO, max_tokens=2)
    assert graceful.health()["usage_pending"] == 5
    graceful.stop(signal.SIGTERM)
    assert len(usage_events(written + 5)) == written + 5


# --- health and metrics ---------------------------------------------------------------------


def test_metrics_need_the_token_and_count_decisions(cast):
    cast.client().chat.completions.create(model="atlas-2", messages=HELLO)
    assert httpx.get(f"{cast.server.url}/metrics").status_code == 401
    scraped = httpx.get(
        f"{cast.server.url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
    )
    assert scraped.status_code == 200
    assert re.search(
        r'stagegate_proxy_requests_total\{endpoint="chat.completions",reason="ok",'
        r'release="atlas-2",stage="research_preview",tier="research_partner"\} [1-9]',
        scraped.text,
    )


@pytest.mark.skipif(
    "not __import__('os').environ.get('REDIS_URL')",
    reason="several workers share limits through Redis (the CI run with REDIS_URL)",
)
def test_two_workers_share_metrics_and_both_refuse_a_revoked_key_within_one_second(cast):
    server = ProxyServer(workers=2)
    try:
        workers: dict[str, int] = {}  # request id prefix (one per worker) -> requests served
        while len(workers) < 2 or sum(workers.values()) < 12:  # new connection each time
            response = httpx.post(
                f"{server.url}/v1/chat/completions",
                json={"model": "atlas-2", "messages": HELLO, "max_tokens": 2},
                headers={"Authorization": f"Bearer {cast.keys['northwind-research']}"},
            )
            assert response.status_code == 200
            prefix = response.headers["x-request-id"][4:16]
            workers[prefix] = workers.get(prefix, 0) + 1
            assert sum(workers.values()) < 200, "one worker served every request"
        served = sum(workers.values())
        pids = set()
        for _ in range(200):  # the kernel picks the worker; ask until both have answered
            pids.add(httpx.get(f"{server.url}/healthz").json()["pid"])
            if len(pids) == 2:
                break
        scrapes = {
            re.search(
                r'stagegate_proxy_requests_total\{endpoint="chat.completions",reason="ok",'
                r'release="atlas-2",stage="research_preview",tier="research_partner"\} (\S+)',
                httpx.get(
                    f"{server.url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
                ).text,
            ).group(1)
            for _ in range(6)
        }
        revoke_key(
            api_key=ApiKey.objects.get(organization__slug="northwind-research"),
            actor=None,
            reason="test",
        )
        time.sleep(1.0)  # the guarantee: within a second, on every worker
        refusals = []
        for _ in range(200):  # until both workers (request id prefixes) have answered
            refusals.append(
                httpx.post(
                    f"{server.url}/v1/chat/completions",
                    json={"model": "atlas-2", "messages": HELLO},
                    headers={"Authorization": f"Bearer {cast.keys['northwind-research']}"},
                )
            )
            served_by = {r.headers["x-request-id"][4:16] for r in refusals}
            if len(served_by) == 2 and len(refusals) >= 20:
                break
    finally:
        server.stop()
    assert len(pids) == 2
    # Neither worker served them all, yet every scrape, whichever worker answers it,
    # counts every request.
    assert scrapes == {f"{served}.0"}
    assert len(served_by) == 2
    assert {(r.status_code, r.json()["error"]["code"]) for r in refusals} == {(401, "key_revoked")}
