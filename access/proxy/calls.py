"""Model calls: ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``.

One call: find the key (``authenticate``: a stranger is refused before its body is
read), validate the body, decide (``decide_for``), screen the prompt when the stage
screens (``access.proxy.screening``: block, flag, or route to a fallback release that
then serves the call under its own limits), reserve the rate limits and the token
estimate (``take_limit``), forward the body with the model name swapped and relay the
answer (``access.upstream``; screened too when the stage screens answers), then settle
the reservation to the tokens really used. ``model_call`` is the one place a call ends,
however it ends: answered, refused, failed upstream or failed here, its reservation is
settled and its usage event recorded with the status the client got.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import orjson

from access.decisions import Decision, KeyEntry, Reason, RequestInfo
from access.proxy.common import (
    Call,
    HTTPError,
    authenticate,
    decide_for,
    error_body,
    over_limit,
    record_usage,
    refuse,
    respond,
    take_limit,
)
from access.proxy.screening import AnswerScreen, add_flags, keep_sample, screen_prompt
from access.upstream import UpstreamFailure
from monitoring import metrics

if TYPE_CHECKING:
    from access.proxy.app import Proxy

log = logging.getLogger(__name__)

# How deep a request body may nest: orjson writes at most 254 levels (objects and arrays
# together), and the proxy rewrites every body it forwards.
MAX_DEPTH = 254
# Refusals of an answer the upstream gave and screening held back: its tokens were used.
ANSWER_REFUSALS = frozenset({"content_blocked", "screening_unavailable"})


async def model_call(proxy: Proxy, scope, receive, send, endpoint: str, suffix: str) -> None:
    """The one place a model call ends, however it ends: its reservation is settled
    and its usage event recorded with the status the client got."""
    call = Call(endpoint)
    try:
        await _serve(proxy, scope, receive, send, call, suffix)
    except HTTPError as exc:
        call.status = exc.status
        if not call.error:  # an upstream failure is recorded as .error, not a refusal
            call.code = exc.code
        await respond(
            send,
            exc.status,
            error_body(exc.status, exc.code, exc.message, category=exc.category),
            [(b"x-request-id", call.request_id.encode()), *exc.headers],
        )
    except Exception:
        # A bug, not a refusal: say so in the API's shape if nothing was sent yet, and
        # record it; the server would otherwise answer text/plain and lose the event.
        log.exception("model call %s failed", call.request_id)
        call.error = "internal_error"
        if call.status == 0:
            call.status = 500
            await respond(
                send,
                500,
                error_body(500, "internal_error", "Stagegate failed on this request."),
                [(b"x-request-id", call.request_id.encode())],
            )
    finally:
        if call.reservation is not None:
            await _settle(proxy, call)
        record_usage(proxy.recorder, call)


async def _serve(proxy: Proxy, scope, receive, send, call: Call, suffix: str) -> None:
    """Validate, decide, screen, reserve, forward and relay; raises HTTPError for a
    refusal answered before a decision and for screening's, and answers every other
    refusal itself."""
    found = await authenticate(proxy.store, scope, send, call)
    if found is None:  # refused before reading the body: a stranger costs nothing
        return
    snapshot, key = found

    # Validate: a JSON object naming a model, with a sane max_tokens and n.
    body = await _read_body(receive, proxy.config.max_body_bytes)
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
    stream = call.streamed = document.get("stream") is True
    max_tokens = document.get("max_completion_tokens", document.get("max_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise HTTPError(400, "invalid_request", "max_tokens must be a positive integer.")
    call.max_tokens = max_tokens
    choices = document.get("n")
    if choices is None:  # absent or null: OpenAI's default of one choice
        choices = 1
    if not isinstance(choices, int) or isinstance(choices, bool) or not 1 <= choices <= 128:
        raise HTTPError(400, "invalid_request", "n must be an integer from 1 to 128.")

    # Decide.
    request = RequestInfo(call.endpoint, stream=stream, max_tokens=max_tokens)
    release, decision = decide_for(snapshot, key, call.org, model, request, now)
    call.release, call.decision = release, decision
    if not decision.allowed:
        await refuse(send, call, decision)
        return
    _touch(proxy, key)

    # Screen the prompt: a block or a classifier failure the stage refuses raises; a
    # route returns the fallback release, which serves the call under its own limits.
    serving, served = release, decision
    screen = release.screen
    if screen is not None:
        routed = await screen_prompt(proxy, call, screen, snapshot, key, document, request, now)
        if routed is not None:
            serving, served = routed

    # Reserve the prompt estimate (about 4 bytes a token) plus the completion cap, for
    # each of the n choices asked for.
    limits = served.limits
    completion_cap = (
        0 if call.endpoint == "embeddings" else (max_tokens or limits.max_tokens) * choices
    )
    reserve = len(body) // 4 + completion_cap
    if reserve > limits.tokens_per_minute:
        await refuse(
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
    document["model"] = serving.upstream_model
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

    limited = await take_limit(proxy.limiter, call, serving, reserve, limits)
    if not limited.allowed:
        routed_limits = (serving.name, served) if serving is not release else None
        await refuse(send, call, over_limit(call, limited, routed_limits), limited.headers())
        return
    call.reservation = limited.reservation
    headers = [
        (b"x-request-id", call.request_id.encode()),
        (b"x-stagegate-tier", decision.tier.encode()),
        (b"x-stagegate-stage", decision.stage.encode()),
        *limited.headers(),
    ]
    if call.routed_to:
        headers.append((b"x-stagegate-routed-to", call.routed_to.encode()))
    elif call.flags:
        headers.append((b"x-stagegate-screening", b"flag"))
    answer = None
    if screen is not None and screen.responses != "off" and call.endpoint != "embeddings":
        answer = AnswerScreen(proxy.upstream, call, screen)

    # Relay the answer; what the upstream reports is what the call used.
    upstream = proxy.upstream
    base_url = serving.upstream_base_url
    try:
        if stream:
            usage = await upstream.relay_stream(
                receive, send, call, base_url, suffix, forwarded, headers, hide_usage, answer
            )
            if call.client_disconnected:
                metrics.CLIENT_DISCONNECTS.labels(release.name).inc()
            # Cut (or held back by screening): estimate the prompt.
            if call.status in (0, 200) and not usage.reported:
                usage.prompt_tokens = len(body) // 4
        else:
            usage = await upstream.relay(send, call, base_url, suffix, forwarded, headers, answer)
    except UpstreamFailure as failure:  # nothing was sent: answered as an HTTPError
        call.error = failure.error
        raise HTTPError(failure.status, failure.error, failure.message) from None
    call.prompt_tokens = usage.prompt_tokens
    call.completion_tokens = usage.completion_tokens
    call.usage_reported = usage.reported
    call.flagged = usage.flagged
    if answer is not None:
        verdict = answer.verdict
        if verdict.categories:
            add_flags(call, verdict.categories)
            keep_sample(proxy, call, screen, verdict, "response", answer.text())
        if call.status == 0 and answer.refusal is not None:  # held back: nothing was sent
            raise answer.refusal


async def _read_body(receive, limit: int) -> bytes:
    chunks = []
    size = 0
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


def _touch(proxy: Proxy, key: KeyEntry) -> None:
    """Note the key's use; the usage thread writes last_used at most once a minute."""
    now = time.monotonic()
    last_touch = proxy.last_touch
    if now - last_touch.get(key.key_id, -1e9) >= proxy.config.last_used_interval:
        last_touch[key.key_id] = now
        proxy.recorder.mark_used(key.key_id)


async def _settle(proxy: Proxy, call: Call) -> None:
    """Replace the call's token reservation with what it really used."""
    if call.status != 200 and call.code not in ANSWER_REFUSALS:
        used = 0  # refused or failed upstream: nothing was served
    elif call.usage_reported or call.streamed:
        used = call.prompt_tokens + call.completion_tokens
    else:  # an answer without usage counts as reserved
        used = call.reservation.tokens
    try:
        await proxy.limiter.settle(call.reservation, used)
    except Exception as exc:  # the reservation stands; it expires with its window
        metrics.UNSETTLED.inc()
        log.warning("could not settle a token reservation: %s", exc)
