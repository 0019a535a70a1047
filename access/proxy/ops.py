"""Operations: ``GET /healthz`` (open) and ``GET /metrics`` (bearer token)."""

from __future__ import annotations

import asyncio
import hmac
import os
from typing import TYPE_CHECKING

import orjson

from access.proxy.common import error_body, respond
from monitoring import metrics

if TYPE_CHECKING:
    from access.proxy.app import Proxy


async def health(proxy: Proxy, send) -> None:
    """200 while the snapshot is fresh enough to decide from, else 503; with what is
    loaded and how many usage events wait to be written."""
    store = proxy.store
    snapshot = store.current()
    loaded = store.snapshot
    report = {
        "status": "ok" if snapshot is not None else "unavailable",
        "marker": list(loaded.marker) if loaded and loaded.marker else None,
        "loaded_at": loaded.loaded_at if loaded else None,
        "releases": len(loaded.releases) if loaded else 0,
        "keys": len(loaded.keys) if loaded else 0,
        "usage_pending": proxy.recorder.pending(),
        "pid": os.getpid(),
    }
    await respond(send, 200 if snapshot is not None else 503, orjson.dumps(report))


async def serve_metrics(proxy: Proxy, scope, send) -> None:
    """Every worker's Prometheus series, for a scraper with ``STAGEGATE_METRICS_TOKEN``."""
    token = proxy.config.metrics_token
    if not token:
        await respond(
            send,
            404,
            error_body(404, "metrics_disabled", "Set STAGEGATE_METRICS_TOKEN to enable /metrics."),
        )
        return
    presented = b""
    for name, value in scope["headers"]:
        if name == b"authorization":
            presented = value.partition(b" ")[2].strip()
    if not hmac.compare_digest(presented, token.encode()):
        await respond(send, 401, error_body(401, "invalid_metrics_token", "Bearer token required."))
        return
    metrics.USAGE_PENDING.set(proxy.recorder.pending())
    body = await asyncio.to_thread(metrics.render)
    await respond(send, 200, body, content_type=(b"content-type", metrics.CONTENT_TYPE.encode()))
