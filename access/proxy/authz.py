"""``/authz`` and ``/authz/...``: authorization for nginx ``auth_request`` and Envoy
``ext_authz`` (docs/gateways.md), decided and rate-limited as a model call is.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from access.decisions import RequestInfo
from access.proxy.common import (
    Call,
    HTTPError,
    current_snapshot,
    decide_for,
    error_body,
    over_limit,
    presented_key,
    record_usage,
    respond,
    take_limit,
)

if TYPE_CHECKING:
    from access.proxy.app import Proxy


async def authorize(proxy: Proxy, scope, send) -> None:
    """Authorize a request for nginx ``auth_request`` or Envoy ``ext_authz``.

    The model comes from ``x-stagegate-model`` or from an original URI of
    ``/v1/models/{id}``; the original URI is ``x-original-uri`` (nginx) or the
    path after ``/authz`` (Envoy's path_prefix). Answers 200 with
    ``x-stagegate-*`` headers, or 401, 403 (also for an unknown model: gateways
    understand only these, and ``screening_requires_proxy`` for a stage that
    screens, which a gateway's check cannot) or 429, each with ``x-stagegate-reason``.
    """
    call = Call("authz")
    headers = dict(scope["headers"])
    original = headers.get(b"x-original-uri", b"").decode("latin-1") or scope["path"][6:]
    model = headers.get(b"x-stagegate-model", b"").decode("latin-1")
    if not model and original.startswith("/v1/models/"):
        model = original[len("/v1/models/") :].split("?", 1)[0]
    call.model = model
    try:
        snapshot = current_snapshot(proxy.store)
        key = call.key = presented_key(scope, snapshot)
        call.org = snapshot.orgs.get(key.org_id) if key else None
        # No release is called "(none)": release names are slugs.
        release, decision = decide_for(
            snapshot, key, call.org, model or "(none)", RequestInfo("authz"), time.time()
        )
        call.release = release
        call.decision = decision
        if decision.allowed and release.screen is not None:
            # The gateway keeps the prompt and the answer: screening the stage promises
            # cannot happen here, so the stage is not served this way (fail closed).
            raise HTTPError(
                403,
                "screening_requires_proxy",
                f"Stage '{decision.stage}' of '{release.name}' screens requests, which an"
                " authorization check cannot see: call it through Stagegate's proxy.",
            )
        extra = []
        if decision.allowed:
            limited = await take_limit(proxy.limiter, call, release, 0)
            extra = limited.headers()
            if not limited.allowed:
                decision = call.decision = over_limit(call, limited)
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
        await respond(send, status, body, out)
    except HTTPError as exc:
        call.status = exc.status
        call.code = exc.code
        await respond(
            send,
            exc.status,
            error_body(exc.status, exc.code, exc.message),
            [(b"x-stagegate-reason", exc.code.encode())],
        )
    finally:
        record_usage(proxy.recorder, call)
