"""What a key may see: ``GET /v1/models``, ``/v1/models/{id}`` and ``/v1/access``.

Listings decide as calls do (``decide_for``, for a plain request to each release),
so listing and calling cannot disagree. ``/v1/access`` explains each decision, and
leaves out the models the key's tier must not learn exist.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import orjson

from access.decisions import Decision, KeyEntry, OrgEntry, ReleaseEntry, RequestInfo
from access.proxy.common import (
    Call,
    HTTPError,
    authenticate,
    decide_for,
    error_body,
    record_usage,
    refuse,
    respond,
)
from access.snapshot import Snapshot

if TYPE_CHECKING:
    from access.proxy.app import Proxy


async def models(proxy: Proxy, scope, send, model_id: str | None) -> None:
    """``/v1/models`` (``model_id`` None) or ``/v1/models/{model_id}``."""

    async def list_models(send, call: Call, snapshot: Snapshot, key: KeyEntry) -> None:
        data = [
            _model_object(release)
            for release, decision in _decide_all(snapshot, key, call.org, time.time())
            if decision.allowed
        ]
        call.status = 200
        await respond(send, 200, orjson.dumps({"object": "list", "data": data}))

    async def get_model(send, call: Call, snapshot: Snapshot, key: KeyEntry) -> None:
        call.model = model_id
        release, decision = decide_for(
            snapshot, key, call.org, model_id, RequestInfo("models"), time.time()
        )
        call.release = release
        if not decision.allowed:
            await refuse(send, call, decision)
            return
        call.decision = decision
        call.status = 200
        await respond(send, 200, orjson.dumps(_model_object(release)))

    if model_id is None:
        await _read_only(proxy, scope, send, "models", list_models)
    else:
        await _read_only(proxy, scope, send, "models", get_model)


async def access(proxy: Proxy, scope, send) -> None:
    """``/v1/access``: every visible release's decision for this key, with its reason."""

    async def report(send, call: Call, snapshot: Snapshot, key: KeyEntry) -> None:
        org = call.org
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
            for release, decision in _decide_all(snapshot, key, org, time.time())
            if decision.visible
        ]
        call.status = 200
        await respond(
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

    await _read_only(proxy, scope, send, "access", report)


async def _read_only(proxy: Proxy, scope, send, endpoint: str, answer) -> None:
    """Run a GET route with the shared key check, 405 and 503 handling and a record."""
    call = Call(endpoint)
    try:
        if scope["method"] not in ("GET", "HEAD"):
            raise HTTPError(405, "method_not_allowed", "Use GET.")
        found = await authenticate(proxy.store, scope, send, call)
        if found is not None:
            await answer(send, call, *found)
    except HTTPError as exc:
        call.status = exc.status
        call.code = exc.code
        await respond(send, exc.status, error_body(exc.status, exc.code, exc.message))
    finally:
        record_usage(proxy.recorder, call)


def _decide_all(
    snapshot: Snapshot, key: KeyEntry, org: OrgEntry | None, now: float
) -> list[tuple[ReleaseEntry, Decision]]:
    """Every release's decision for a plain request by this key, in name order."""
    request = RequestInfo("models")
    return [
        decide_for(snapshot, key, org, name, request, now) for name in sorted(snapshot.releases)
    ]


def _model_object(release: ReleaseEntry) -> dict:
    return {
        "id": release.name,
        "object": "model",
        "created": release.created,
        "owned_by": "stagegate",
    }
