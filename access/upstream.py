"""Calls to the upstream model servers: one pooled aiohttp session per worker.

aiohttp was chosen over httpx by measurement (bench/http_clients.py,
docs/performance.md). The session is created once at start-up and shared by
every request; connections are kept alive and reused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import aiohttp
import orjson

# SSE events end with a blank line; servers use \n or \r\n.
EVENT_END = re.compile(rb"\r?\n\r?\n")
DONE = b"data: [DONE]"
# A chunk that carries text (a token, roughly), and one the content filter ended.
CONTENT = re.compile(rb'"(?:content|text)"\s*:\s*"[^"]')
FILTERED = re.compile(rb'"finish_reason"\s*:\s*"content_filter"')


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

    def feed(self, chunk: bytes) -> bytes:
        """The whole events in ``pending + chunk`` to send on now."""
        data = self._pending + chunk if self._pending else chunk
        # The regex has no literal first byte to search for: ten times slower than split.
        parts = EVENT_END.split(data) if b"\r" in data else data.split(b"\n\n")
        self._pending = parts.pop()
        if not parts:
            return b""
        out = []
        for event in parts:
            if self._keep(event):
                out.append(event)
                out.append(b"\n\n")
        return b"".join(out)

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
