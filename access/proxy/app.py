"""The proxy's ASGI application: its per-worker resources, their lifecycle, routing.

``Proxy`` holds what every route uses (the configuration, the snapshot store, the
limiter, the usage recorder, the upstream session and the keys' last-use times),
starts and stops them on lifespan events, and sends each request to its route:
``calls`` (model calls), ``listings`` (models and access), ``authz`` and ``ops``
(health and metrics). The routes are plain functions taking the ``Proxy``.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from functools import partial

from django.conf import settings

from access.keys import touch_keys_last_used
from access.proxy.authz import authorize
from access.proxy.calls import model_call
from access.proxy.common import error_body, respond
from access.proxy.listings import access, models
from access.proxy.ops import health, serve_metrics
from access.ratelimits import LocalLimiter, RedisLimiter
from access.snapshot import Snapshot, SnapshotStore
from access.upstream import Upstream
from monitoring import metrics
from monitoring.usage import UsageRecorder

# path -> endpoint name, upstream path suffix
CALLS = {
    "/v1/chat/completions": ("chat.completions", "/chat/completions"),
    "/v1/completions": ("completions", "/completions"),
    "/v1/embeddings": ("embeddings", "/embeddings"),
}


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    max_body_bytes: int = 4 * 1024 * 1024
    connect_timeout: float = 5.0
    read_timeout: float = 120.0
    max_connections: int = 200
    upstream_api_key: str = ""
    metrics_token: str = ""
    last_used_interval: int = 60

    @classmethod
    def from_settings(cls) -> ProxyConfig:
        return cls(
            max_body_bytes=settings.STAGEGATE_PROXY_MAX_BODY_BYTES,
            connect_timeout=settings.STAGEGATE_UPSTREAM_CONNECT_TIMEOUT,
            read_timeout=settings.STAGEGATE_UPSTREAM_READ_TIMEOUT,
            max_connections=settings.STAGEGATE_UPSTREAM_MAX_CONNECTIONS,
            upstream_api_key=settings.STAGEGATE_UPSTREAM_API_KEY or "",
            metrics_token=settings.STAGEGATE_METRICS_TOKEN or "",
            last_used_interval=settings.STAGEGATE_KEY_LAST_USED_INTERVAL,
        )


class Proxy:
    """The ASGI application for the proxy routes, with its per-worker resources."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        store: SnapshotStore,
        limiter: LocalLimiter | RedisLimiter,
        recorder: UsageRecorder,
    ) -> None:
        self.config = config
        self.store = store
        self.limiter = limiter
        self.recorder = recorder
        self.upstream = Upstream(
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
            max_connections=config.max_connections,
            api_key=config.upstream_api_key,
        )
        self.last_touch: dict[str, float] = {}  # key id -> when its use was last noted
        self._started = False

    @classmethod
    def from_settings(cls) -> Proxy:
        def on_reload(snapshot: Snapshot, seconds: float, changed: bool) -> None:
            metrics.SNAPSHOT_RELOADS.inc()
            metrics.SNAPSHOT_LOAD_SECONDS.observe(seconds)
            if changed and snapshot.changed_at is not None:  # from commit to serving
                metrics.INVALIDATION_LAG.observe(max(0.0, time.time() - snapshot.changed_at))

        limiter = RedisLimiter.from_settings() if settings.REDIS_URL else LocalLimiter()
        recorder = UsageRecorder(
            flush_interval=settings.STAGEGATE_USAGE_FLUSH_SECONDS,
            batch_size=settings.STAGEGATE_USAGE_BATCH_SIZE,
            max_buffer=settings.STAGEGATE_USAGE_MAX_BUFFER,
            on_drop=metrics.USAGE_DROPPED.inc,
            on_reject=metrics.USAGE_REJECTED.inc,
            on_write=lambda count, _seconds: metrics.USAGE_WRITTEN.inc(count),
            on_keys_used=partial(
                touch_keys_last_used, interval_seconds=settings.STAGEGATE_KEY_LAST_USED_INTERVAL
            ),
        )
        store = SnapshotStore(
            poll_interval=settings.STAGEGATE_PROXY_POLL_INTERVAL,
            full_reload_interval=settings.STAGEGATE_PROXY_FULL_RELOAD,
            max_staleness=settings.STAGEGATE_PROXY_MAX_STALENESS,
            on_reload=on_reload,
        )
        return cls(ProxyConfig.from_settings(), store=store, limiter=limiter, recorder=recorder)

    # --- lifecycle --------------------------------------------------------------------------

    async def startup(self) -> None:
        if self._started:
            return
        self._started = True
        self.upstream.open()
        self.store.start()
        self.recorder.start()
        await asyncio.to_thread(self.store.wait_first_load, 10.0)

    async def shutdown(self) -> None:
        if not self._started:
            return
        self._started = False
        await self.upstream.close()
        await self.limiter.close()
        await asyncio.to_thread(self.recorder.stop)
        await asyncio.to_thread(self.store.stop)
        metrics.mark_process_dead(os.getpid())

    async def lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # --- routing ----------------------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        if not self._started:  # served without lifespan events (e.g. --lifespan off)
            await self.startup()
        path = scope["path"]
        method = scope["method"]
        call = CALLS.get(path)
        if call is not None:
            if method != "POST":
                await respond(send, 405, error_body(405, "method_not_allowed", "Use POST."))
                return
            await model_call(self, scope, receive, send, *call)
        elif path == "/v1/models" or path.startswith("/v1/models/"):
            await models(self, scope, send, path[len("/v1/models/") :] if len(path) > 10 else None)
        elif path == "/v1/access":
            await access(self, scope, send)
        elif path == "/authz" or path.startswith("/authz/"):
            await authorize(self, scope, send)
        elif path == "/healthz":
            await health(self, send)
        elif path == "/metrics":
            await serve_metrics(self, scope, send)
        else:
            await respond(send, 404, error_body(404, "not_found", f"No route {method} {path}."))
