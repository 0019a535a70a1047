"""What every proxy route shares.

- the error shape (``error_body``) and ``HTTPError``, a refusal answered before a
  decision could be made;
- ``Call``, what is known about one request as it goes through;
- answering (``respond``, ``refuse``);
- the snapshot (``current_snapshot``: 503 when the policy store is unreachable) and
  the key a request presents (``presented_key``, ``authenticate``);
- ``decide_for``, the one way a route asks ``access.decisions.decide``;
- the rate limits (``take_limit``, ``over_limit``);
- ``record_usage``, the usage event and metrics every request leaves.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import os
import time
from typing import TYPE_CHECKING

import orjson

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
from monitoring import metrics
from monitoring.records import UsageRecord
from monitoring.usage import UsageRecorder, clean_text

if TYPE_CHECKING:
    from rollout.plan_schema import TierLimits

log = logging.getLogger(__name__)

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


def error_body(
    status: int, code: str, message: str, param: str | None = None, category: str | None = None
) -> bytes:
    """OpenAI's error shape; the official client reads message, type and code. A
    screening refusal also names its ``category``."""
    error = {
        "message": message,
        "type": ERROR_TYPES.get(status, "api_error"),
        "param": param,
        "code": code,
    }
    if category is not None:
        error["category"] = category
    return orjson.dumps({"error": error})


class HTTPError(Exception):
    """A refusal the route answers itself rather than from a decision: a bad body, a
    store that cannot be reached (503), screening's ``content_blocked``, ..."""

    def __init__(
        self, status: int, code: str, message: str, headers=(), category: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = list(headers)
        self.category = category  # the screening category that blocked the request


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
        "flags",
        "key",
        "max_tokens",
        "model",
        "org",
        "prompt_tokens",
        "release",
        "request_id",
        "reservation",
        "routed_to",
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
        self.max_tokens: int | None = None  # as asked for
        self.release: ReleaseEntry | None = None  # the release the decision read
        self.decision: Decision | None = None
        self.code = ""  # the refusal code when no decision was reached (503, bad body)
        self.status = 0
        self.error = ""
        self.streamed = False  # the client asked for a stream
        self.client_disconnected = False
        self.flagged = False  # the upstream's content filter fired
        self.flags: tuple[str, ...] = ()  # screening's categories, sorted and unique
        self.routed_to = ""  # the release a screening rule routed the call to
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.usage_reported = False  # the upstream said how many tokens it used
        self.reservation: Reservation | None = None  # tokens held until the call ends
        self.upstream_seconds: float | None = None


# --- answering ------------------------------------------------------------------------------


async def respond(send, status: int, body: bytes, headers=(), content_type=JSON) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [content_type, (b"content-length", b"%d" % len(body)), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def refuse(send, call: Call, decision: Decision, headers=()) -> None:
    """Answer a refusal; the caller records the call."""
    call.decision = decision
    call.status = decision.status
    await respond(
        send,
        call.status,
        error_body(call.status, decision.public_reason.value, decision.message),
        [(b"x-request-id", call.request_id.encode()), *headers],
    )


# --- the snapshot, the key and the decision ---------------------------------------------------


def current_snapshot(store: SnapshotStore) -> Snapshot:
    """The snapshot to decide from, or a 503: never a guess from a stale one."""
    snapshot = store.current()
    if snapshot is None:
        metrics.UNAVAILABLE.labels("policy").inc()
        raise HTTPError(
            503,
            "policy_store_unavailable",
            "Stagegate cannot reach its key and policy store; refusing rather than"
            " guessing. Try again shortly.",
        )
    return snapshot


def presented_key(scope, snapshot: Snapshot) -> KeyEntry | None:
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


async def authenticate(
    store: SnapshotStore, scope, send, call: Call
) -> tuple[Snapshot, KeyEntry] | None:
    """The snapshot and a usable key, or None after answering the refusal."""
    snapshot = current_snapshot(store)
    key = call.key = presented_key(scope, snapshot)
    refused = key_refusal(key, time.time())
    if refused is not None:
        await refuse(send, call, refused)
        return None
    call.org = snapshot.orgs.get(key.org_id)
    return snapshot, key


def decide_for(
    snapshot: Snapshot,
    key: KeyEntry | None,
    org: OrgEntry | None,
    model: str,
    request: RequestInfo,
    now: float,
) -> tuple[ReleaseEntry | None, Decision]:
    """The release called ``model`` (None if there is none) and the decision for this
    key to make ``request`` to it: how every route asks ``decide``."""
    release = snapshot.releases.get(model)
    return release, decide(key=key, org=org, release=release, model=model, request=request, now=now)


# --- limits -----------------------------------------------------------------------------------


async def take_limit(
    limiter: LocalLimiter | RedisLimiter,
    call: Call,
    release: ReleaseEntry,
    tokens: int,
    limits: TierLimits | None = None,
) -> LimitResult:
    """Count the call against its organization's ``limits`` on ``release`` (the
    decision's unless given: a routed call's are its fallback's), reserving ``tokens``;
    a 503 if the limits cannot be reached (never admit without them). A tuned model's
    calls count against its parent's limits: tuning more models buys no more."""
    try:
        return await limiter.acquire(
            f"{release.parent or release.name}:{call.org.public_id}",
            limits or call.decision.limits,
            tokens,
            time.time(),
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


def over_limit(
    call: Call, limited: LimitResult, served: tuple[str, Decision] | None = None
) -> Decision:
    """The refusal for a request a limit stopped, naming the limit (and counted).
    ``served`` is the release and decision a routed call's limits came from: the
    message names them, the refusal keeps the call's own tier and stage."""
    decision = call.decision
    model, limiting = served or (call.model, decision)
    name = limited.limit_name
    metrics.RATE_LIMITED.labels(model, limiting.tier, name).inc()
    return Decision(
        Reason(limited.reason),
        f"{name} limit of {getattr(limiting.limits, name)} reached for your organization"
        f" on '{model}' (tier {limiting.tier}, stage '{limiting.stage}');"
        f" retry after {limited.retry_after} s.",
        tier=decision.tier,
        stage=decision.stage,
        limits=limiting.limits,
    )


# --- the record -------------------------------------------------------------------------------


def record_usage(recorder: UsageRecorder, call: Call) -> None:
    """The call's usage event and metrics: how every request, however it ended, is counted."""
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
    org = call.org
    recorder.record(
        UsageRecord(
            created_at=call.wall,
            request_id=call.request_id,
            org=org.public_id if org else "",
            key=call.key.public_id if call.key else "",
            tier=tier,
            release=model,
            stage=stage,
            endpoint=call.endpoint,
            decision=verdict,
            reason=reason,
            status=call.status,
            error=call.error,
            streamed=call.streamed,
            client_disconnected=call.client_disconnected,
            flagged=call.flagged,
            prompt_tokens=call.prompt_tokens,
            completion_tokens=call.completion_tokens,
            latency_ms=elapsed * 1000,
            upstream_latency_ms=(
                None if call.upstream_seconds is None else call.upstream_seconds * 1000
            ),
            # What replaying the decision against another plan needs:
            plan_version=call.release.plan_version if call.release else None,
            max_tokens=call.max_tokens,
            claimed_tier=org.tier if org else "",
            verifications=org.verifications if org else (),
            flags=",".join(call.flags),
            routed_to=call.routed_to,
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
