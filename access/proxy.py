"""The OpenAI-compatible inference proxy: a lean ASGI application.

Routes (everything else is Django's, see ``stagegate.asgi``):

- ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``
- ``GET /v1/models``, ``/v1/models/{id}``, ``/v1/access``
- ``/authz`` and ``/authz/...``: authorization for nginx ``auth_request`` and
  Envoy ``ext_authz`` (docs/gateways.md)
- ``GET /healthz``; ``GET /metrics`` (bearer token)

One request: find the key in the in-memory snapshot (no database), decide
(``access.decisions``), take the rate-limit reservation, forward the body to the
upstream with the model name swapped, relay the answer (streams chunk by chunk),
then settle the reservation and buffer a usage event. Django's request machinery
costs more than the whole budget, so this path does not use it; it calls the same
decision code as everything else.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import logging
import os
import time
from dataclasses import dataclass

import orjson
from django.conf import settings

from access.decisions import (
    Decision,
    KeyEntry,
    OrgEntry,
    Reason,
    ReleaseEntry,
    RequestInfo,
    decide,
    key_refusal,
)
from access.keys import KeyFormatError, parse_key
from access.ratelimits import (
    LimiterUnavailable,
    LimitResult,
    LocalLimiter,
    RedisLimiter,
    Reservation,
)
from access.snapshot import Snapshot, SnapshotStore
from access.upstream import SSERelay, UpstreamFailure, Usage, make_session, translate
from monitoring import metrics
from monitoring.usage import UsageRecorder, clean_text

log = logging.getLogger(__name__)

# endpoint name, upstream path suffix
CALLS = {
    "/v1/chat/completions": ("chat.completions", "/chat/completions"),
    "/v1/completions": ("completions", "/completions"),
    "/v1/embeddings": ("embeddings", "/embeddings"),
}
# How deep a request body may nest: orjson writes at most 254 levels (objects and arrays
# together), and the proxy rewrites every body it forwards.
MAX_DEPTH = 254
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    500: "api_error",
    504: "upstream_timeout",
}
JSON = (b"content-type", b"application/json")
SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # tell nginx in front not to buffer the stream
]


def error_body(status: int, code: str, message: str, param: str | None = None) -> bytes:
    """OpenAI's error shape; the official client reads message, type and code."""
    return orjson.dumps(
        {
            "error": {
                "message": message,
                "type": ERROR_TYPES.get(status, "api_error"),
                "param": param,
                "code": code,
            }
        }
    )


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


class HTTPError(Exception):
    """A refusal answered before a decision could be made (bad body, 503, ...)."""

    def __init__(self, status: int, code: str, message: str, headers=()) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = list(headers)


# Request ids: unique per process start and worker, without a syscall per request.
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count(1)


class Call:
    """What is known about one request as it goes through; becomes a usage event."""

    __slots__ = (
        "client_disconnected",
        "code",
        "completion_tokens",
        "decision",
        "endpoint",
        "error",
        "flagged",
        "key",
        "model",
        "org",
        "prompt_tokens",
        "request_id",
        "reservation",
        "started",
        "status",
        "streamed",
        "upstream_seconds",
        "usage_reported",
        "wall",
    )

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.started = time.perf_counter()
        self.wall = time.time()
        self.request_id = f"req_{_ID_PREFIX}{next(_ID_COUNTER):x}"
        self.key: KeyEntry | None = None
        self.org: OrgEntry | None = None
        self.model = ""
        self.decision: Decision | None = None
        self.code = ""  # the refusal code when no decision was reached (503, bad body)
        self.status = 0
        self.error = ""
        self.streamed = False
        self.client_disconnected = False
        self.flagged = False
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.usage_reported = False  # the upstream said how many tokens it used
        self.reservation: Reservation | None = None  # tokens held until the call ends
        self.upstream_seconds: float | None = None


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
        self.session = None
        self._started = False
        self._last_touch: dict[str, float] = {}
        self._upstream_base_headers = {"content-type": "application/json"}
        if config.upstream_api_key:
            self._upstream_base_headers["authorization"] = f"Bearer {config.upstream_api_key}"

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
            last_used_interval=settings.STAGEGATE_KEY_LAST_USED_INTERVAL,
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
        self.session = make_session(
            connect_timeout=self.config.connect_timeout,
            read_timeout=self.config.read_timeout,
            max_connections=self.config.max_connections,
        )
        self.store.start()
        self.recorder.start()
        await asyncio.to_thread(self.store.wait_first_load, 10.0)

    async def shutdown(self) -> None:
        if not self._started:
            return
        self._started = False
        await self.session.close()
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
                await self._respond(send, 405, error_body(405, "method_not_allowed", "Use POST."))
                return
            await self._model_call(scope, receive, send, *call)
        elif path == "/v1/models" or path.startswith("/v1/models/"):
            await self._models(scope, send, path[len("/v1/models/") :] if len(path) > 10 else None)
        elif path == "/v1/access":
            await self._access(scope, send)
        elif path == "/authz" or path.startswith("/authz/"):
            await self._authz(scope, send)
        elif path == "/healthz":
            await self._health(send)
        elif path == "/metrics":
            await self._metrics(scope, send)
        else:
            await self._respond(
                send, 404, error_body(404, "not_found", f"No route {method} {path}.")
            )

    # --- shared steps -----------------------------------------------------------------------

    async def _respond(self, send, status: int, body: bytes, headers=(), content_type=JSON):
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [content_type, (b"content-length", b"%d" % len(body)), *headers],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _snapshot(self) -> Snapshot:
        snapshot = self.store.current()
        if snapshot is None:
            metrics.UNAVAILABLE.labels("policy").inc()
            raise HTTPError(
                503,
                "policy_store_unavailable",
                "Stagegate cannot reach its key and policy store; refusing rather than"
                " guessing. Try again shortly.",
            )
        return snapshot

    def _key(self, scope, snapshot: Snapshot) -> KeyEntry | None:
        """The key presented as ``Authorization: Bearer`` or ``x-api-key``, if genuine."""
        raw = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    raw = token.strip()
                break
            if name == b"x-api-key":
                raw = value.strip()
        if not raw:
            return None
        try:
            text = raw.decode("ascii")
            key_id = parse_key(text)
        except (UnicodeDecodeError, KeyFormatError):
            return None
        entry = snapshot.keys.get(key_id)
        if entry is None:
            return None
        if not hmac.compare_digest(hashlib.sha256(raw).hexdigest(), entry.digest):
            return None
        return entry

    def _touch(self, key: KeyEntry) -> None:
        """Note the key's use; the usage thread writes last_used at most once a minute."""
        now = time.monotonic()
        if now - self._last_touch.get(key.key_id, -1e9) >= self.config.last_used_interval:
            self._last_touch[key.key_id] = now
            self.recorder.mark_used(key.key_id)

    def _record(self, call: Call) -> None:
        decision = call.decision
        if call.code:  # refused outside the decision: bad body, a store unreachable (503)
            reason, verdict = call.code, "deny"
        elif decision is not None:  # (an upstream failure keeps its allow, with .error set)
            reason = decision.reason.value
            verdict = "allow" if decision.allowed else "deny"
        else:  # a listing that succeeded
            reason, verdict = "ok", "allow"
        stage = (decision.stage or "") if decision else ""
        tier = (decision.tier or "") if decision else ""
        # The name asked for is the client's text: stored only once it is safe to store.
        model = clean_text(call.model, 63)
        # Metrics label only releases that exist: a client-chosen name would let anyone
        # grow the series without bound. The usage event keeps the name asked for.
        release = model if stage else ""
        elapsed = time.perf_counter() - call.started
        self.recorder.record(
            (
                call.wall,
                call.request_id,
                call.org.public_id if call.org else "",
                call.key.public_id if call.key else "",
                tier,
                model,
                stage,
                call.endpoint,
                verdict,
                reason,
                call.status,
                call.error,
                call.streamed,
                call.client_disconnected,
                call.flagged,
                call.prompt_tokens,
                call.completion_tokens,
                elapsed * 1000,
                None if call.upstream_seconds is None else call.upstream_seconds * 1000,
            )
        )
        child = metrics.child
        child(metrics.REQUESTS, release, stage, tier, call.endpoint, reason).inc()
        child(metrics.REQUEST_LATENCY, call.endpoint).observe(elapsed)
        if call.upstream_seconds is not None:
            child(metrics.UPSTREAM_LATENCY, release).observe(call.upstream_seconds)
        if call.error:
            child(metrics.UPSTREAM_ERRORS, release, call.error).inc()
        if call.prompt_tokens or call.completion_tokens:
            child(metrics.TOKENS, release, tier, "prompt").inc(call.prompt_tokens)
            child(metrics.TOKENS, release, tier, "completion").inc(call.completion_tokens)

    async def _refuse(self, send, call: Call, decision: Decision, headers=()) -> None:
        """Answer a refusal; the caller records the call."""
        call.decision = decision
        call.status = decision.status
        await self._respond(
            send,
            call.status,
            error_body(call.status, decision.public_reason.value, decision.message),
            [(b"x-request-id", call.request_id.encode()), *headers],
        )

    async def _limit(self, call: Call, release: ReleaseEntry, tokens: int) -> LimitResult:
        decision = call.decision
        try:
            return await self.limiter.acquire(
                f"{release.name}:{call.org.public_id}", decision.limits, tokens, time.time()
            )
        except LimiterUnavailable as exc:
            metrics.UNAVAILABLE.labels("limits").inc()
            log.warning("%s", exc)
            raise HTTPError(
                503,
                "limits_unavailable",
                "Stagegate cannot reach its rate-limit store; refusing rather than admitting"
                " without limits. Try again shortly.",
            ) from None

    def _over_limit(self, call: Call, limited: LimitResult) -> Decision:
        """The refusal for a request a limit stopped, naming the limit (and counted)."""
        decision = call.decision
        name = limited.limit_name
        metrics.RATE_LIMITED.labels(call.model, decision.tier, name).inc()
        return Decision(
            Reason(limited.reason),
            f"{name} limit of {getattr(decision.limits, name)} reached for your organization"
            f" on '{call.model}' (tier {decision.tier}, stage '{decision.stage}');"
            f" retry after {limited.retry_after} s.",
            tier=decision.tier,
            stage=decision.stage,
            limits=decision.limits,
        )

    # --- model calls ------------------------------------------------------------------------

    async def _model_call(self, scope, receive, send, endpoint: str, suffix: str) -> None:
        """The one place a model call ends, however it ends: its reservation is settled
        and its usage event recorded with the status the client got."""
        call = Call(endpoint)
        try:
            await self._model_call_inner(scope, receive, send, call, suffix)
        except HTTPError as exc:
            call.status = exc.status
            if not call.error:  # an upstream failure is recorded as .error, not a refusal
                call.code = exc.code
            await self._respond(
                send,
                exc.status,
                error_body(exc.status, exc.code, exc.message),
                [(b"x-request-id", call.request_id.encode()), *exc.headers],
            )
        except Exception:
            # A bug, not a refusal: say so in the API's shape if nothing was sent yet, and
            # record it; the server would otherwise answer text/plain and lose the event.
            log.exception("model call %s failed", call.request_id)
            call.error = "internal_error"
            if call.status == 0:
                call.status = 500
                await self._respond(
                    send,
                    500,
                    error_body(500, "internal_error", "Stagegate failed on this request."),
                    [(b"x-request-id", call.request_id.encode())],
                )
        finally:
            if call.reservation is not None:
                await self._settle(call)
            self._record(call)

    async def _settle(self, call: Call) -> None:
        """Replace the call's token reservation with what it really used."""
        if call.status != 200:  # refused or failed upstream: nothing was served
            used = 0
        elif call.usage_reported or call.streamed:
            used = call.prompt_tokens + call.completion_tokens
        else:  # an answer without usage counts as reserved
            used = call.reservation.tokens
        try:
            await self.limiter.settle(call.reservation, used)
        except Exception as exc:  # the reservation stands; it expires with its window
            metrics.UNSETTLED.inc()
            log.warning("could not settle a token reservation: %s", exc)

    async def _read_body(self, receive) -> bytes:
        chunks = []
        size = 0
        limit = self.config.max_body_bytes
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise HTTPError(400, "client_disconnected", "The client went away.")
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                raise HTTPError(
                    413, Reason.REQUEST_TOO_LARGE.value, f"Request body above {limit} bytes."
                )
            chunks.append(body)
            if not message.get("more_body", False):
                return b"".join(chunks) if len(chunks) != 1 else chunks[0]

    async def _model_call_inner(self, scope, receive, send, call: Call, suffix: str) -> None:
        found = await self._authenticated(scope, send, call)
        if found is None:  # refused before reading the body: a stranger costs nothing
            return
        snapshot, key = found
        body = await self._read_body(receive)
        now = time.time()
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise HTTPError(400, "invalid_json", "The request body is not valid JSON.") from None
        if not isinstance(document, dict):
            raise HTTPError(400, "invalid_request", "The request body must be a JSON object.")
        model = document.get("model")
        if not isinstance(model, str) or not model:
            raise HTTPError(400, "invalid_request", "'model' is required and must be a string.")
        call.model = model
        stream = document.get("stream") is True
        max_tokens = document.get("max_completion_tokens", document.get("max_tokens"))
        if max_tokens is not None and (
            not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
        ):
            raise HTTPError(400, "invalid_request", "max_tokens must be a positive integer.")
        choices = document.get("n")
        if choices is None:  # absent or null: OpenAI's default of one choice
            choices = 1
        if not isinstance(choices, int) or isinstance(choices, bool) or not 1 <= choices <= 128:
            raise HTTPError(400, "invalid_request", "n must be an integer from 1 to 128.")
        release = snapshot.releases.get(model)
        decision = decide(
            key=key,
            org=call.org,
            release=release,
            model=model,
            request=RequestInfo(call.endpoint, stream=stream, max_tokens=max_tokens),
            now=now,
        )
        call.decision = decision
        if not decision.allowed:
            await self._refuse(send, call, decision)
            return
        self._touch(key)

        # Reserve the prompt estimate (about 4 bytes a token) plus the completion cap, for
        # each of the n choices asked for.
        limits = decision.limits
        completion_cap = (
            0 if call.endpoint == "embeddings" else (max_tokens or limits.max_tokens) * choices
        )
        reserve = len(body) // 4 + completion_cap
        if reserve > limits.tokens_per_minute:
            await self._refuse(
                send,
                call,
                Decision(
                    Reason.REQUEST_TOO_LARGE,
                    f"This request (about {len(body) // 4} prompt tokens plus up to"
                    f" {completion_cap} completion tokens) can never fit this tier's"
                    f" tokens_per_minute of {limits.tokens_per_minute}.",
                    tier=decision.tier,
                    stage=decision.stage,
                    limits=limits,
                ),
            )
            return

        # Forward: the model name is the one change every request needs; streams also
        # ask for usage, and completions get the tier's cap when they name none. The body
        # is written before anything is reserved, so one the proxy cannot re-encode (JSON
        # nested deeper than orjson writes) is refused and holds nothing.
        document["model"] = release.upstream_model
        hide_usage = False
        if stream:
            options = document.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                hide_usage = True
                document["stream_options"] = {
                    **(options if isinstance(options, dict) else {}),
                    "include_usage": True,
                }
        if max_tokens is None and call.endpoint != "embeddings":
            document["max_tokens"] = limits.max_tokens
        try:
            forwarded = orjson.dumps(document)
        except (TypeError, orjson.JSONEncodeError):
            raise HTTPError(
                400,
                "invalid_request",
                f"The request body nests deeper than the {MAX_DEPTH} levels Stagegate forwards.",
            ) from None

        limited = await self._limit(call, release, reserve)
        if not limited.allowed:
            await self._refuse(send, call, self._over_limit(call, limited), limited.headers())
            return
        call.reservation = limited.reservation
        headers = [
            (b"x-request-id", call.request_id.encode()),
            (b"x-stagegate-tier", decision.tier.encode()),
            (b"x-stagegate-stage", decision.stage.encode()),
            *limited.headers(),
        ]
        if stream:
            call.streamed = True
            usage = await self._relay_stream(
                receive, send, call, release, suffix, forwarded, headers, hide_usage
            )
            if call.status == 200 and not usage.reported:  # cut: estimate the prompt
                usage.prompt_tokens = len(body) // 4
        else:
            usage = await self._relay(send, call, release, suffix, forwarded, headers)
        call.prompt_tokens = usage.prompt_tokens
        call.completion_tokens = usage.completion_tokens
        call.usage_reported = usage.reported
        call.flagged = usage.flagged

    def _upstream_headers(self, call: Call) -> dict[str, str]:
        return {**self._upstream_base_headers, "x-request-id": call.request_id}

    async def _relay(self, send, call: Call, release: ReleaseEntry, suffix, body, headers) -> Usage:
        usage = Usage()
        url = release.upstream_base_url + suffix
        started = time.perf_counter()
        try:
            async with self.session.post(url, data=body, headers=self._upstream_headers(call)) as r:
                payload = await r.read()
                status = r.status
                content_type = r.headers.get("content-type", "application/json")
        except Exception as exc:
            call.upstream_seconds = time.perf_counter() - started
            self._upstream_failed(call, translate(exc, release.upstream_base_url))
        call.upstream_seconds = time.perf_counter() - started
        if status >= 500:
            self._upstream_failed(
                call,
                UpstreamFailure.bad_status(status),
            )
        if status == 200:
            try:
                document = orjson.loads(payload)
            except orjson.JSONDecodeError:
                self._upstream_failed(
                    call,
                    UpstreamFailure(
                        "upstream_error", 502, "The model server's answer is not valid JSON."
                    ),
                )
            if isinstance(document, dict):
                usage.read(document)
        call.status = status
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type.encode()),
                    (b"content-length", b"%d" % len(payload)),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
        return usage

    def _upstream_failed(self, call: Call, failure: UpstreamFailure):
        call.error = failure.error
        raise HTTPError(failure.status, failure.error, failure.message)

    async def _relay_stream(
        self, receive, send, call: Call, release, suffix, body, headers, hide_usage
    ) -> Usage:
        url = release.upstream_base_url + suffix
        relay = SSERelay(hide_usage_chunk=hide_usage)
        started = time.perf_counter()
        # The body is read, so the next receive() returns only when the client leaves.
        gone = asyncio.ensure_future(receive())
        try:
            try:
                response = await self.session.post(
                    url, data=body, headers=self._upstream_headers(call)
                )
            except Exception as exc:
                call.upstream_seconds = time.perf_counter() - started
                self._upstream_failed(call, translate(exc, release.upstream_base_url))
            async with response:
                if response.status != 200:
                    payload = await response.read()
                    call.upstream_seconds = time.perf_counter() - started
                    if response.status >= 500:
                        self._upstream_failed(
                            call,
                            UpstreamFailure.bad_status(response.status),
                        )
                    call.status = response.status
                    await self._respond(send, response.status, payload, headers)
                    return relay.usage
                call.status = 200
                await send(
                    {"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + headers}
                )
                try:
                    async for chunk in response.content.iter_any():
                        out = relay.feed(chunk)
                        if gone.done():
                            call.client_disconnected = True
                            break
                        if out:
                            await send(
                                {"type": "http.response.body", "body": out, "more_body": True}
                            )
                    else:
                        out = relay.tail()
                        if out:
                            await send(
                                {"type": "http.response.body", "body": out, "more_body": True}
                            )
                        if not relay.done:
                            call.error = "upstream_incomplete"
                except Exception as exc:  # the stream broke after the status was sent
                    call.error = translate(exc, release.upstream_base_url).error
                call.upstream_seconds = time.perf_counter() - started
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if gone.done():
                call.client_disconnected = True
            else:
                gone.cancel()
        usage = relay.usage
        if call.client_disconnected or not usage.reported:
            # No usage chunk reached the client: count what it was sent, one token per
            # content chunk (the caller estimates the prompt).
            usage.completion_tokens = relay.content_chunks
            usage.reported = False
        if call.client_disconnected:
            metrics.CLIENT_DISCONNECTS.labels(release.name).inc()
        return usage

    # --- listing and access -----------------------------------------------------------------

    def _decide_all(self, snapshot: Snapshot, key: KeyEntry, now: float):
        """Every release's decision for a plain request by this key, in name order."""
        org = snapshot.orgs.get(key.org_id)
        request = RequestInfo("models")
        return org, [
            (
                release,
                decide(key=key, org=org, release=release, model=name, request=request, now=now),
            )
            for name, release in sorted(snapshot.releases.items())
        ]

    async def _authenticated(self, scope, send, call: Call) -> tuple[Snapshot, KeyEntry] | None:
        """The snapshot and a usable key, or None after answering the refusal."""
        snapshot = self._snapshot()
        key = call.key = self._key(scope, snapshot)
        refused = key_refusal(key, time.time())
        if refused is not None:
            await self._refuse(send, call, refused)
            return None
        call.org = snapshot.orgs.get(key.org_id)
        return snapshot, key

    async def _read_only(self, scope, send, endpoint: str, handler) -> None:
        """Run a GET route with the shared key check, 405 and 503 handling and a record."""
        call = Call(endpoint)
        try:
            if scope["method"] not in ("GET", "HEAD"):
                raise HTTPError(405, "method_not_allowed", "Use GET.")
            found = await self._authenticated(scope, send, call)
            if found is not None:
                await handler(send, call, *found)
        except HTTPError as exc:
            call.status = exc.status
            call.code = exc.code
            await self._respond(send, exc.status, error_body(exc.status, exc.code, exc.message))
        finally:
            self._record(call)

    async def _models(self, scope, send, model_id: str | None) -> None:
        async def list_models(send, call: Call, snapshot: Snapshot, key: KeyEntry) -> None:
            _, decisions = self._decide_all(snapshot, key, time.time())
            data = [_model_object(release) for release, d in decisions if d.allowed]
            call.status = 200
            await self._respond(send, 200, orjson.dumps({"object": "list", "data": data}))

        async def get_model(send, call: Call, snapshot: Snapshot, key: KeyEntry) -> None:
            call.model = model_id
            release = snapshot.releases.get(model_id)
            decision = decide(
                key=key,
                org=call.org,
                release=release,
                model=model_id,
                request=RequestInfo("models"),
                now=time.time(),
            )
            if not decision.allowed:
                await self._refuse(send, call, decision)
                return
            call.decision = decision
            call.status = 200
            await self._respond(send, 200, orjson.dumps(_model_object(release)))

        if model_id is None:
            await self._read_only(scope, send, "models", list_models)
        else:
            await self._read_only(scope, send, "models", get_model)

    async def _access(self, scope, send) -> None:
        async def report(send, call: Call, snapshot: Snapshot, key: KeyEntry) -> None:
            org, decisions = self._decide_all(snapshot, key, time.time())
            models = [
                {
                    "id": release.name,
                    "allowed": decision.allowed,
                    "reason": decision.reason.value,
                    "message": decision.message,
                    "stage": decision.stage,
                    "tier": decision.tier,
                    "limits": decision.limits.model_dump() if decision.limits else None,
                }
                for release, decision in decisions
                if decision.visible
            ]
            call.status = 200
            await self._respond(
                send,
                200,
                orjson.dumps(
                    {
                        "object": "access",
                        "key": key.public_id,
                        "organization": org.slug if org else None,
                        "claimed_tier": org.tier if org else None,
                        "models": models,
                    }
                ),
            )

        await self._read_only(scope, send, "access", report)

    # --- gateways -----------------------------------------------------------------------------

    async def _authz(self, scope, send) -> None:
        """Authorize a request for nginx ``auth_request`` or Envoy ``ext_authz``.

        The model comes from ``x-stagegate-model`` or from an original URI of
        ``/v1/models/{id}``; the original URI is ``x-original-uri`` (nginx) or the
        path after ``/authz`` (Envoy's path_prefix). Answers 200 with
        ``x-stagegate-*`` headers, or 401, 403 (also for an unknown model: gateways
        understand only these) or 429, each with ``x-stagegate-reason``.
        """
        call = Call("authz")
        headers = dict(scope["headers"])
        original = headers.get(b"x-original-uri", b"").decode("latin-1") or scope["path"][6:]
        model = headers.get(b"x-stagegate-model", b"").decode("latin-1")
        if not model and original.startswith("/v1/models/"):
            model = original[len("/v1/models/") :].split("?", 1)[0]
        call.model = model
        try:
            snapshot = self._snapshot()
            key = call.key = self._key(scope, snapshot)
            call.org = snapshot.orgs.get(key.org_id) if key else None
            release = snapshot.releases.get(model)
            decision = call.decision = decide(
                key=key,
                org=call.org,
                release=release,
                model=model or "(none)",
                request=RequestInfo("authz"),
                now=time.time(),
            )
            extra = []
            if decision.allowed:
                limited = await self._limit(call, release, 0)
                extra = limited.headers()
                if not limited.allowed:
                    decision = call.decision = self._over_limit(call, limited)
            reason = decision.public_reason
            status = decision.status if decision.status in (200, 401, 429) else 403
            call.status = status
            out = [(b"x-stagegate-reason", reason.value.encode()), *extra]
            if decision.allowed:
                out += [
                    (b"x-stagegate-org", call.org.slug.encode()),
                    (b"x-stagegate-org-id", call.org.public_id.encode()),
                    (b"x-stagegate-key-id", key.public_id.encode()),
                    (b"x-stagegate-tier", decision.tier.encode()),
                    (b"x-stagegate-stage", decision.stage.encode()),
                    (b"x-stagegate-release", release.name.encode()),
                    (b"x-stagegate-upstream-model", release.upstream_model.encode()),
                ]
                body = b""
            else:
                body = error_body(status, reason.value, decision.message)
            await self._respond(send, status, body, out)
        except HTTPError as exc:
            call.status = exc.status
            call.code = exc.code
            await self._respond(
                send,
                exc.status,
                error_body(exc.status, exc.code, exc.message),
                [(b"x-stagegate-reason", exc.code.encode())],
            )
        finally:
            self._record(call)

    # --- operations ---------------------------------------------------------------------------

    async def _health(self, send) -> None:
        snapshot = self.store.current()
        loaded = self.store.snapshot
        report = {
            "status": "ok" if snapshot is not None else "unavailable",
            "marker": list(loaded.marker) if loaded and loaded.marker else None,
            "loaded_at": loaded.loaded_at if loaded else None,
            "releases": len(loaded.releases) if loaded else 0,
            "keys": len(loaded.keys) if loaded else 0,
            "usage_pending": self.recorder.pending(),
            "pid": os.getpid(),
        }
        await self._respond(send, 200 if snapshot is not None else 503, orjson.dumps(report))

    async def _metrics(self, scope, send) -> None:
        token = self.config.metrics_token
        if not token:
            await self._respond(
                send,
                404,
                error_body(
                    404, "metrics_disabled", "Set STAGEGATE_METRICS_TOKEN to enable /metrics."
                ),
            )
            return
        presented = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                presented = value.partition(b" ")[2].strip()
        if not hmac.compare_digest(presented, token.encode()):
            await self._respond(
                send, 401, error_body(401, "invalid_metrics_token", "Bearer token required.")
            )
            return
        metrics.USAGE_PENDING.set(self.recorder.pending())
        body = await asyncio.to_thread(metrics.render)
        await self._respond(
            send, 200, body, content_type=(b"content-type", metrics.CONTENT_TYPE.encode())
        )


def _model_object(release: ReleaseEntry) -> dict:
    return {
        "id": release.name,
        "object": "model",
        "created": release.created,
        "owned_by": "stagegate",
    }
