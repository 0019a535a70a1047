"""Deadlines on what a client sends: a request's headers and its body.

uvicorn (0.54) times out only an idle keep-alive connection, and only after a first
response. A client that opens a connection and sends part of a request line, part of
its headers or part of a body (slowloris, slow POST) holds the connection, and for a
body the application task waiting for it, for as long as it likes. Two deadlines end
that, both in seconds from Django settings (``STAGEGATE_HEADER_TIMEOUT``,
``STAGEGATE_BODY_TIMEOUT``; docs/operations.md):

- **headers**: ``DeadlineHttpToolsProtocol``, uvicorn's httptools protocol given to it
  as its ``http`` class, arms one timer when a connection opens and when each later
  request on it begins, and cancels it when the request's headers are complete. At the
  deadline a partly received request is answered 408 and the connection closed; a
  connection that sent nothing is closed without an answer, as an idle keep-alive
  connection is. The same timer, set to the body timeout, bounds the rest of a body
  nobody reads (the request was answered before its body was read): a client still
  dripping it when the time is up is disconnected rather than kept.
- **body**: ``BodyDeadline`` wraps the application's ``receive``: the whole body must
  arrive within the body timeout of the application's first ``receive``. After it, the
  waiting ``receive`` raises the exception the application was given (the proxy's 408
  ``request_timeout``; for Django, ``BodyTimedOut``, after which ``stagegate.asgi``
  answers 408), and that response closes the connection. Once the body is complete,
  ``receive`` (which then waits only for a disconnect) is passed through untimed.

Cost: the header deadline is one event-loop timer per request (armed and cancelled),
the price of the keep-alive timer uvicorn already sets after each response. The body
deadline arms its timer only for a body not all received when the application first
reads it (bench/deadlines.py; docs/performance.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from django.conf import settings
from django.core.exceptions import RequestAborted
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from monitoring import metrics

Receive = Callable[[], Awaitable[dict[str, Any]]]

CONNECTION_CLOSE = (b"connection", b"close")


def _headers_late_body(seconds: float) -> bytes:
    # The proxy's (OpenAI's) error shape, whose "code" and "message" are also what the
    # REST API's shape has: the route is not known before the headers are.
    return orjson.dumps(
        {
            "error": {
                "message": f"The request headers did not arrive within {seconds:g} s.",
                "type": "invalid_request_error",
                "param": None,
                "code": "request_timeout",
            }
        }
    )


class BodyTimedOut(RequestAborted):
    """The request body did not arrive in time. Django's handler takes any
    ``RequestAborted`` from ``receive`` as a client gone and returns without answering;
    ``stagegate.asgi`` then answers 408."""


class BodyDeadline:
    """``receive`` for one request, whose body must be complete within ``timeout``
    seconds of the first call. At the deadline, the waiting call raises ``error()``."""

    __slots__ = ("_done", "_error", "_receive", "_timeout", "_timer", "_waiter", "expired")

    def __init__(self, receive: Receive, timeout: float, error: Callable[[], Exception]) -> None:
        self._receive = receive
        self._timeout = timeout
        self._error = error
        self._timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Task | None = None
        self._done = False
        self.expired = False

    async def receive(self) -> dict[str, Any]:
        if self._done:  # the body is in: what follows is a wait for the client to leave
            return await self._receive()
        if self.expired:
            raise self._error()
        if self._timer is None:
            if not getattr(getattr(self._receive, "__self__", None), "more_body", True):
                # uvicorn's request cycle, whose method receive is, has the whole body
                # (the common case: it came with the headers), so this call returns at
                # once and needs no timer, which would cost more than the rest.
                self._done = True
                return await self._receive()
            # One timer for the whole body, not one per receive: a client dripping a
            # byte at a time must not earn a fresh deadline with each byte.
            self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expire)
        self._waiter = waiter = asyncio.current_task()
        try:
            message = await self._receive()
        except asyncio.CancelledError:
            # Ours only if the timer fired and nothing else also cancelled the task.
            if self.expired and waiter.uncancel() == 0:
                raise self._error() from None
            self._timer.cancel()
            raise
        finally:
            self._waiter = None
        if not message.get("more_body", False):  # complete, or an http.disconnect
            self._done = True
            self._timer.cancel()
        return message

    def _expire(self) -> None:
        if self._done:
            return
        self.expired = True
        metrics.SLOW_CLIENTS.labels("body").inc()
        if self._waiter is not None:
            self._waiter.cancel()


class DeadlineHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request's headers, and on
    the rest of a body left unread after the response."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout: float = settings.STAGEGATE_HEADER_TIMEOUT
        self.body_timeout: float = settings.STAGEGATE_BODY_TIMEOUT
        self.deadline: asyncio.TimerHandle | None = None
        self.awaiting_headers = False  # a request has begun and its headers are not in

    def _arm(self, seconds: float) -> None:
        self.deadline = self.loop.call_later(seconds, self.deadline_passed)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.awaiting_headers = True
        if self.deadline is None:  # a later request on a kept-alive connection
            self._arm(self.header_timeout)

    def on_headers_complete(self) -> None:
        self.awaiting_headers = False
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()  # a body left unread after the response has all arrived
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle  # the one answered, unless a pipelined one has started since
        if cycle.response_complete and cycle.more_body and not self.transport.is_closing():
            # Answered before its body was read (a refusal): the rest is read and
            # discarded to keep the connection, but not for longer than a body may take.
            self._disarm()
            self._arm(self.body_timeout)

    def deadline_passed(self) -> None:
        self.deadline = None
        if self.transport.is_closing():
            return
        answering = self.cycle is not None and not self.cycle.response_complete
        if self.awaiting_headers:
            metrics.SLOW_CLIENTS.labels("headers").inc()
            # A 408 in the middle of an earlier request's response would corrupt it.
            if not answering:
                self.transport.write(self._timeout_response())
        elif self.cycle is not None and self.cycle.more_body:
            metrics.SLOW_CLIENTS.labels("body").inc()
        self.transport.close()

    def _timeout_response(self) -> bytes:
        body = _headers_late_body(self.header_timeout)
        head = [STATUS_LINE[408]]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.append(b"content-type: application/json\r\n")
        head.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        return b"".join(head) + body
