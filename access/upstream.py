"""Calls to the upstream model servers, and relaying their answers to the client.

``Upstream`` is the worker's one pooled aiohttp session (created at start-up, shared
by every request, connections kept alive and reused) and the two ways an answer goes
back: ``relay`` a whole JSON answer, ``relay_stream`` an SSE stream event by event
(``SSERelay``). aiohttp was chosen over httpx by measurement (bench/http_clients.py,
docs/performance.md).

Relaying writes what it learns onto the proxy's ``Call``: ``status`` (what the client
got), ``upstream_seconds``, ``error`` (a stream that broke after its status was sent)
and ``client_disconnected``; it returns the ``Usage`` it read. An upstream that gives
no answer before anything was sent raises ``UpstreamFailure``, which the caller
answers and records.

When the stage screens answers, both take the call's ``AnswerScreen``
(``access.proxy.screening``): a whole answer is screened before it is sent; a stream is
held until screened whole (``buffer``) or sent as each batch of events passes and cut
when one does not (``audit``). An answer screening refused is not sent at all
(``call.status`` stays 0 and the caller answers the screen's ``refusal``). Without a
screen the relaying is unchanged.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import orjson

if TYPE_CHECKING:
    from access.proxy.common import Call
    from access.proxy.screening import AnswerScreen

# SSE events end with a blank line; servers use \n or \r\n.
EVENT_END = re.compile(rb"\r?\n\r?\n")
DONE = b"data: [DONE]"
# A chunk that carries text (a token, roughly), and one the content filter ended.
CONTENT = re.compile(rb'"(?:content|text)"\s*:\s*"[^"]')
FILTERED = re.compile(rb'"finish_reason"\s*:\s*"content_filter"')
SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # tell nginx in front not to buffer the stream
]


class UpstreamFailure(Exception):
    """The upstream could not give an answer: ``error`` is a stable code."""

    def __init__(self, error: str, status: int, message: str) -> None:
        super().__init__(message)
        self.error = error  # upstream_unreachable | upstream_timeout | upstream_error
        self.status = status  # what the client gets: 502 or 504
        self.message = message

    @classmethod
    def bad_status(cls, status: int) -> UpstreamFailure:
        return cls(
            "upstream_error", 502, f"The model server answered {status}; nothing was served."
        )


def make_session(*, connect_timeout: float, read_timeout: float, max_connections: int):
    """The worker's one client session (call inside the event loop)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=max_connections, limit_per_host=max_connections, ttl_dns_cache=300
        ),
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        ),
        auto_decompress=False,  # pass bodies through as the upstream encoded them
        cookie_jar=aiohttp.DummyCookieJar(),  # never carry one caller's cookie to another
        skip_auto_headers=("User-Agent",),
        raise_for_status=False,
    )


def translate(exc: BaseException, base_url: str) -> UpstreamFailure:
    """A client exception as the failure the caller is told about."""
    if isinstance(exc, TimeoutError):
        return UpstreamFailure(
            "upstream_timeout", 504, f"The model server at {base_url} did not answer in time."
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamFailure(
            "upstream_unreachable", 502, f"The model server at {base_url} cannot be reached."
        )
    return UpstreamFailure(
        "upstream_error", 502, f"The model server at {base_url} failed: {type(exc).__name__}."
    )


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    flagged: bool = False
    reported: bool = False  # the upstream said how many tokens it used

    def read(self, document: dict) -> None:
        """Take usage and the content-filter flag from a response or a stream chunk."""
        usage = document.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = _count(usage.get("prompt_tokens"))
            self.completion_tokens = _count(usage.get("completion_tokens"))
            self.reported = True
        choices = document.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict) and choice.get("finish_reason") == "content_filter":
                    self.flagged = True


def _count(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class SSERelay:
    """Splits an upstream event stream into whole events as chunks arrive.

    It notes usage and content-filter flags, counts the content chunks sent (the
    tokens a client received if the stream is cut), and drops the usage-only chunk
    when the proxy asked for usage on the client's behalf.
    """

    def __init__(self, *, hide_usage_chunk: bool) -> None:
        self.hide_usage_chunk = hide_usage_chunk
        self.usage = Usage()
        self.content_chunks = 0
        self.done = False
        self._pending = b""

    def _split(self, chunk: bytes) -> list[bytes]:
        """The whole events in ``pending + chunk``; the rest waits for the next chunk."""
        data = self._pending + chunk if self._pending else chunk
        # The regex has no literal first byte to search for: ten times slower than split.
        parts = EVENT_END.split(data) if b"\r" in data else data.split(b"\n\n")
        self._pending = parts.pop()
        return parts

    def feed(self, chunk: bytes) -> bytes:
        """The whole events in ``pending + chunk`` to send on now."""
        parts = self._split(chunk)
        if not parts:
            return b""
        out = []
        for event in parts:
            if self._keep(event):
                out.append(event)
                out.append(b"\n\n")
        return b"".join(out)

    def events(self, chunk: bytes) -> list[bytes]:
        """The whole events in ``pending + chunk`` to send on, each without its blank line."""
        return [event for event in self._split(chunk) if self._keep(event)]

    def tail(self) -> bytes:
        """Whatever is left when the upstream closes (an unterminated last event)."""
        rest, self._pending = self._pending, b""
        return rest if rest.strip() and self._keep(rest) else b""

    def _keep(self, event: bytes) -> bool:
        if event.startswith(DONE):
            self.done = True
            return True
        # Streams asked for usage carry "usage":null in every chunk: parse only the rest.
        usage_here = b'"usage"' in event and b'"usage":null' not in event
        if usage_here or FILTERED.search(event):
            payload = event[event.find(b"{") :]
            try:
                document = orjson.loads(payload)
            except orjson.JSONDecodeError:
                return True
            if isinstance(document, dict):
                self.usage.read(document)
                if self.hide_usage_chunk and document.get("usage") and not document.get("choices"):
                    return False
        if CONTENT.search(event):
            self.content_chunks += 1
        return True


class Upstream:
    """The worker's session to the model servers and the relaying of their answers."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_connections: int,
        api_key: str = "",
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.session: aiohttp.ClientSession | None = None
        self._base_headers = {"content-type": "application/json"}
        if api_key:
            self._base_headers["authorization"] = f"Bearer {api_key}"

    def open(self) -> None:
        """Create the session (inside the event loop)."""
        self.session = make_session(
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            max_connections=self.max_connections,
        )

    async def close(self) -> None:
        await self.session.close()

    def headers_for(self, call: Call, *, identity: bool = False) -> dict[str, str]:
        """The headers of a request to an upstream for ``call``; ``identity`` asks for an
        answer that is not compressed (one the proxy reads rather than passes on)."""
        headers = {**self._base_headers, "x-request-id": call.request_id}
        if identity:
            headers["accept-encoding"] = "identity"
        return headers

    async def relay(
        self, send, call: Call, base_url: str, suffix, body, headers, screen=None
    ) -> Usage:
        """Forward ``body`` and answer the client with the upstream's whole answer
        (screened first when ``screen``, an ``AnswerScreen``, is given)."""
        usage = Usage()
        url = base_url + suffix
        started = time.perf_counter()
        try:
            async with self.session.post(
                url, data=body, headers=self.headers_for(call, identity=screen is not None)
            ) as r:
                payload = await r.read()
                status = r.status
                content_type = r.headers.get("content-type", "application/json")
        except Exception as exc:
            call.upstream_seconds = time.perf_counter() - started
            raise translate(exc, base_url) from None
        call.upstream_seconds = time.perf_counter() - started
        if status >= 500:
            raise UpstreamFailure.bad_status(status)
        if status == 200:
            try:
                document = orjson.loads(payload)
            except orjson.JSONDecodeError:
                raise UpstreamFailure(
                    "upstream_error", 502, "The model server's answer is not valid JSON."
                ) from None
            if isinstance(document, dict):
                usage.read(document)
                if screen is not None and not await screen.passes(document):
                    return usage  # nothing sent: the caller answers screen.refusal
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

    async def relay_stream(
        self,
        receive,
        send,
        call: Call,
        base_url: str,
        suffix,
        body,
        headers,
        hide_usage,
        screen: AnswerScreen | None = None,
    ) -> Usage:
        """Forward ``body`` and pass the upstream's event stream on as it arrives
        (screened as ``screen.mode`` says when ``screen`` is given: ``_relay_screened``).

        Without a usage chunk that reached the client (it left, or the upstream sent
        none, or screening cut the stream), the completion counts one token per content
        chunk the upstream sent; the caller estimates the prompt.
        """
        url = base_url + suffix
        relay = SSERelay(hide_usage_chunk=hide_usage)
        started = time.perf_counter()
        # The body is read, so the next receive() returns only when the client leaves.
        gone = asyncio.ensure_future(receive())
        try:
            try:
                response = await self.session.post(
                    url, data=body, headers=self.headers_for(call, identity=screen is not None)
                )
            except Exception as exc:
                call.upstream_seconds = time.perf_counter() - started
                raise translate(exc, base_url) from None
            async with response:
                if response.status != 200:
                    payload = await response.read()
                    call.upstream_seconds = time.perf_counter() - started
                    if response.status >= 500:
                        raise UpstreamFailure.bad_status(response.status)
                    call.status = response.status
                    await send(
                        {
                            "type": "http.response.start",
                            "status": response.status,
                            "headers": [
                                (b"content-type", b"application/json"),
                                (b"content-length", b"%d" % len(payload)),
                                *headers,
                            ],
                        }
                    )
                    await send({"type": "http.response.body", "body": payload})
                    return relay.usage
                if screen is not None:
                    try:
                        await self._relay_screened(
                            send, call, base_url, response, relay, screen, gone, headers
                        )
                    finally:
                        call.upstream_seconds = time.perf_counter() - started
                else:
                    call.status = 200
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 200,
                            "headers": SSE_HEADERS + headers,
                        }
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
                        call.error = translate(exc, base_url).error
                    call.upstream_seconds = time.perf_counter() - started
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if gone.done():
                call.client_disconnected = True
            else:
                gone.cancel()
        return self._stream_usage(call, relay)

    @staticmethod
    def _stream_usage(call: Call, relay: SSERelay) -> Usage:
        usage = relay.usage
        if call.client_disconnected or not usage.reported:
            usage.completion_tokens = relay.content_chunks
            usage.reported = False
        return usage

    async def _relay_screened(
        self, send, call: Call, base_url: str, response, relay: SSERelay, screen, gone, headers
    ) -> None:
        """Relay a stream the stage screens. ``buffer``: hold every event, screen the
        whole answer, then send it all, or nothing (``call.status`` left 0) when it is
        refused; a stream that breaks before that is an ``UpstreamFailure`` (nothing was
        sent). ``audit``: send each event once the text so far passes the rules; end the
        stream with ``screen.closing()`` instead of the first event that does not, or
        instead of ``[DONE]`` when the whole answer does not pass (``screen.finish``)."""
        if screen.mode == "buffer":
            held: list[bytes] = []
            try:
                async for chunk in response.content.iter_any():
                    held += relay.events(chunk)
                    if gone.done():
                        call.client_disconnected = True
                        break
                else:
                    if rest := relay.tail():
                        held.append(rest)
            except Exception as exc:  # nothing was sent: answered as a failure
                raise translate(exc, base_url) from None
            if call.client_disconnected:  # no one to screen for
                call.status = 200
                await send(
                    {"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + headers}
                )
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            if not relay.done:
                call.error = "upstream_incomplete"
            for event in held:
                screen.take(event)
            if not await screen.passes_whole():
                return  # nothing sent: the caller answers screen.refusal
            call.status = 200
            await send(
                {"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + headers}
            )
            out = b"".join(event + b"\n\n" for event in held)
            await send({"type": "http.response.body", "body": out, "more_body": False})
            return

        call.status = 200
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + headers})
        ending = b""
        try:
            async for chunk in response.content.iter_any():
                events = relay.events(chunk)
                if gone.done():
                    call.client_disconnected = True
                    break
                if not events:
                    continue
                if relay.done:  # the end: [DONE] waits for the whole answer's screening
                    events = [event for event in events if not event.startswith(DONE)]
                    ending = DONE + b"\n\n"
                passed = []
                for event in events:  # each checked: what came before a match goes out
                    if screen.take(event) and screen.cut():
                        out = b"".join(sent + b"\n\n" for sent in passed)
                        await send({"type": "http.response.body", "body": out + screen.closing()})
                        return  # (the upstream's connection is closed unread)
                    passed.append(event)
                events = passed
                if ending:
                    break
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"".join(event + b"\n\n" for event in events),
                        "more_body": True,
                    }
                )
            else:
                rest = relay.tail()
                events = []
                if rest.startswith(DONE):  # [DONE] without its blank line
                    ending = DONE + b"\n\n"
                elif rest:
                    if screen.take(rest) and screen.cut():
                        await send({"type": "http.response.body", "body": screen.closing()})
                        return
                    events.append(rest)
                if not relay.done:
                    call.error = "upstream_incomplete"
        except Exception as exc:  # the stream broke after the status was sent
            call.error = translate(exc, base_url).error
            events = []
        if call.client_disconnected:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        out = b"".join(event + b"\n\n" for event in events)
        if await screen.finish():
            await send({"type": "http.response.body", "body": out + screen.closing()})
        else:
            await send({"type": "http.response.body", "body": out + ending})
