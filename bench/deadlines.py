"""What the slow-client deadlines (stagegate/deadlines.py) cost per request.

What is measured
  In this process, on one core, on uvloop, each case R rounds of N requests,
  interleaved so that a busy moment on the machine hits every case alike; the best
  round is kept (timeit's rule: slower rounds measure the machine, not the code).

    receive bare            await an ASGI receive that returns at once (a body that
                            came with its headers, the common case)
    receive BodyDeadline    the same through BodyDeadline.receive, where uvicorn's
                            request cycle says the body is all in: no timer, what
                            the proxy and Django pay for a body that came at once
    receive BodyDeadline,   the same where the receive does not say (or the body is
      timer                 not all in): one event-loop timer armed and cancelled
    protocol uvicorn        one keep-alive POST with a 2-byte body through uvicorn's
                            HttpToolsProtocol (a fake transport, no socket): parse,
                            start the ASGI task, a minimal app reads the body and
                            answers, the keep-alive timer
    protocol deadlines      the same through DeadlineHttpToolsProtocol, the app's
                            receive wrapped in BodyDeadline as stagegate/asgi.py
                            does: everything the deadlines add to a request

How to read the output
  us/request   microseconds per request (best round)
  added        the case's cost above its baseline (bare receive; uvicorn's protocol)

Usage: python bench/deadlines.py [--requests 100000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "stagegate.settings")
os.environ.setdefault("STAGEGATE_VAR_DIR", tempfile.mkdtemp(prefix="stagegate-bench-"))

import django

django.setup()

import uvloop  # noqa: E402
from uvicorn.config import Config  # noqa: E402
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # noqa: E402
from uvicorn.server import ServerState  # noqa: E402

from stagegate.deadlines import BodyDeadline, BodyTimedOut, DeadlineHttpToolsProtocol  # noqa: E402

MESSAGE = {"type": "http.request", "body": b"{}", "more_body": False}
REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"


async def receive() -> dict:
    return MESSAGE


async def app(scope, receive, send) -> None:
    await receive()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"{}"})


class Transport(asyncio.Transport):
    """Enough of a socket transport for uvicorn's protocol: writes are dropped."""

    def write(self, data) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Cycle:
    """uvicorn's RequestResponseCycle as BodyDeadline sees it, the body all in."""

    more_body = False

    async def receive(self) -> dict:
        return MESSAGE


async def bare(n: int) -> None:
    for _ in range(n):
        await receive()


async def guarded(n: int) -> None:
    cycle_receive = Cycle().receive
    for _ in range(n):
        await BodyDeadline(cycle_receive, 30.0, BodyTimedOut).receive()


async def guarded_with_timer(n: int) -> None:
    for _ in range(n):
        await BodyDeadline(receive, 30.0, BodyTimedOut).receive()


async def app_with_deadline(scope, receive, send) -> None:
    await app(scope, BodyDeadline(receive, 30.0, BodyTimedOut).receive, send)


def through(protocol_class, asgi_app):
    async def run(n: int) -> None:
        config = Config(app=asgi_app, lifespan="off", log_level="warning")
        config.load()
        state = ServerState()
        protocol = protocol_class(
            config=config, server_state=state, app_state={}, _loop=asyncio.get_running_loop()
        )
        protocol.connection_made(Transport())
        for _ in range(n):
            protocol.data_received(REQUEST)
            while protocol.tasks:  # the request's task runs to its end
                await asyncio.sleep(0)
        protocol.connection_lost(None)
        assert state.total_requests == n, state.total_requests

    return run


CASES = [
    ("receive bare", bare, None),
    ("receive BodyDeadline", guarded, "receive bare"),
    ("receive BodyDeadline, timer", guarded_with_timer, "receive bare"),
    ("protocol uvicorn", through(HttpToolsProtocol, app), None),
    (
        "protocol deadlines",
        through(DeadlineHttpToolsProtocol, app_with_deadline),
        "protocol uvicorn",
    ),
]


async def measure(requests: int, rounds: int) -> dict[str, float]:
    best = {name: float("inf") for name, _, _ in CASES}
    for _ in range(rounds):
        for name, case, _ in CASES:
            started = time.perf_counter()
            await case(requests)
            best[name] = min(best[name], (time.perf_counter() - started) / requests * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    best = uvloop.run(measure(args.requests, args.rounds))
    print(f"{args.requests:,} requests x {args.rounds} rounds, best round, one core, uvloop")
    print(f"{'case':30s} {'us/request':>10s} {'added':>8s}")
    for name, _, baseline in CASES:
        added = f"{best[name] - best[baseline]:+.2f}" if baseline else ""
        print(f"{name:30s} {best[name]:10.2f} {added:>8s}")


if __name__ == "__main__":
    main()
