"""Upstream HTTP client for the inference proxy: aiohttp.ClientSession vs httpx and pyreqwest.

What is measured
  The proxy makes one call per request to an upstream model server through one
  pooled async client. This script starts a stand-in upstream (a raw ASGI app on
  uvicorn + uvloop + httptools, in a subprocess) and drives it from this process,
  on uvloop, with each client in turn, at each concurrency level:

    plain   POST /v1/chat/completions, read the whole ~300-byte JSON body as bytes
    stream  POST with "stream": true, iterate the body chunks as they arrive
            (20 SSE "data: {...}" events and "data: [DONE]", each sent by the
            upstream as its own ASGI body message, i.e. its own HTTP chunk)

  The clients: aiohttp (the proxy's, the baseline), httpx.AsyncClient and, when it is
  installed (pip install -e ".[bench]"), pyreqwest's async Client (Rust reqwest on its
  own tokio threads, awaited from the event loop).

  Each (client, mode, concurrency) gets a fresh client whose pool holds as many
  keep-alive connections as there are concurrent workers, a warm-up, then N timed
  requests issued by `concurrency` workers sharing one counter.

How to read the output
  req/s     completed requests / wall time of the timed phase (client + upstream
            share the machine, so this is a system figure)
  p50, p99  per-request latency in ms, from send to last body byte
  x aio     req/s as a ratio to aiohttp's in the same mode and concurrency
  cpu us    CPU time of this (client) process per request (every thread: pyreqwest's
            tokio threads included), i.e. what the proxy
            itself would pay per upstream call, harness overhead included
  cpu x     cpu us as a ratio to aiohttp's (above 1 = costs more CPU than aiohttp)
  chunks    mean body chunks the client handed back per response

  Absolute numbers depend on the machine; compare the ratios across machines.

Usage: python bench/http_clients.py [--requests 4000] [--stream-requests 2000]
                                    [--concurrency 1,10,50] [--warmup 200]
"""

from __future__ import annotations

import argparse
import contextlib
import http.cookiejar
import importlib.util
import json
import os
import platform
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import aiohttp
import httpx
import uvloop
from loadgen import Load, Server, drive, free_port

PATH = "/v1/chat/completions"
CREATED = 1_700_000_000
MODEL = "stagegate-bench-8b"
SSE_EVENTS = 20

# --------------------------------------------------------------------------- upstream


def completion_body() -> bytes:
    """A realistic non-streaming chat.completion object (about 300 bytes)."""
    return json.dumps(
        {
            "id": "chatcmpl-9f3b2c1d7e6a4b5c8d9e0f1a2b3c4d5e",
            "object": "chat.completion",
            "created": CREATED,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "The capital of France is Paris."},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 14, "completion_tokens": 8, "total_tokens": 22},
        },
        separators=(",", ":"),
    ).encode()


def sse_events() -> list[bytes]:
    """20 chat.completion.chunk SSE events followed by the [DONE] sentinel."""
    events = []
    for i in range(SSE_EVENTS):
        chunk = {
            "id": "chatcmpl-9f3b2c1d7e6a4b5c8d9e0f1a2b3c4d5e",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": MODEL,
            "choices": [{"index": 0, "delta": {"content": f" tok{i}"}, "finish_reason": None}],
        }
        events.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


COMPLETION = completion_body()
EVENTS = sse_events()
STREAM_BYTES = sum(map(len, EVENTS))


async def upstream_app(scope, receive, send) -> None:
    """Raw ASGI stand-in for an OpenAI-compatible model server."""
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if scope["method"] != "POST" or scope["path"] != PATH:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    if json.loads(body or b"{}").get("stream") is True:
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i, event in enumerate(EVENTS):
            last = i == len(EVENTS) - 1
            await send({"type": "http.response.body", "body": event, "more_body": not last})
    else:
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(COMPLETION)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": COMPLETION})


def serve(port: int) -> None:
    import uvicorn

    uvicorn.run(
        upstream_app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


def listening(port: int) -> bool:
    """True once ``port`` accepts a connection (OSError until then)."""
    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    return True


@contextlib.contextmanager
def upstream_server() -> Iterator[str]:
    """Runs this file with --serve PORT in a subprocess; yields the endpoint URL."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="stagegate-bench-clients-") as log_dir:
        args = [sys.executable, os.path.abspath(__file__), "--serve", str(port)]
        server = Server("upstream", args, log_dir)
        try:
            server.wait_ready(lambda: listening(port), 15)
            yield f"http://127.0.0.1:{port}{PATH}"
        finally:
            server.stop(5)


# --------------------------------------------------------------------------- clients

# Same bytes on the wire for both clients. identity: the proxy passes bodies through
# untouched, so neither client may negotiate compression on its own.
HEADERS = {
    "content-type": "application/json",
    "accept": "application/json, text/event-stream",
    "accept-encoding": "identity",
    "authorization": "Bearer sk-upstream-bench",
}


def request_body(stream: bool) -> bytes:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    return json.dumps({"model": MODEL, "messages": messages, "stream": stream}).encode()


PLAIN_REQUEST = request_body(stream=False)
STREAM_REQUEST = request_body(stream=True)

# A request function returns (body bytes, chunks) so every response can be checked.
RequestFn = Callable[[], Awaitable[tuple[int, int]]]


def check_status(status: int) -> None:
    if status != 200:
        raise RuntimeError(f"upstream answered {status}")


@contextlib.asynccontextmanager
async def aiohttp_client(url: str, concurrency: int) -> AsyncIterator[dict[str, RequestFn]]:
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0, keepalive_timeout=30)
    session = aiohttp.ClientSession(
        connector=connector,
        # total=None: aiohttp's total covers the whole body, which would cut long streams
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30),
        auto_decompress=False,  # pass upstream bytes through as they are
        cookie_jar=aiohttp.DummyCookieJar(),  # never share upstream cookies across callers
    )

    async def plain() -> tuple[int, int]:
        async with session.post(url, data=PLAIN_REQUEST, headers=HEADERS) as resp:
            check_status(resp.status)
            return len(await resp.read()), 1

    async def stream() -> tuple[int, int]:
        async with session.post(url, data=STREAM_REQUEST, headers=HEADERS) as resp:
            check_status(resp.status)
            size = chunks = 0
            async for chunk in resp.content.iter_any():
                size += len(chunk)
                chunks += 1
            return size, chunks

    try:
        yield {"plain": plain, "stream": stream}
    finally:
        await session.close()


def no_cookies() -> http.cookiejar.CookieJar:
    """httpx keeps cookies per client; a jar that accepts none keeps callers apart."""
    return http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


@contextlib.asynccontextmanager
async def httpx_client(url: str, concurrency: int) -> AsyncIterator[dict[str, RequestFn]]:
    client = httpx.AsyncClient(
        # keep-alive must match the pool size: httpx defaults to 20 keep-alive
        # connections, so beyond 20 concurrent calls it would close and reconnect.
        limits=httpx.Limits(
            max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=30
        ),
        timeout=httpx.Timeout(connect=5, read=30, write=10, pool=10),  # default: 5 s for all
        trust_env=False,  # no *_PROXY / .netrc lookups
        cookies=no_cookies(),
    )

    async def plain() -> tuple[int, int]:
        resp = await client.post(url, content=PLAIN_REQUEST, headers=HEADERS)
        check_status(resp.status_code)
        return len(resp.content), 1

    async def stream() -> tuple[int, int]:
        async with client.stream("POST", url, content=STREAM_REQUEST, headers=HEADERS) as resp:
            check_status(resp.status_code)
            size = chunks = 0
            async for chunk in resp.aiter_raw():
                size += len(chunk)
                chunks += 1
            return size, chunks

    try:
        yield {"plain": plain, "stream": stream}
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def pyreqwest_client(url: str, concurrency: int) -> AsyncIterator[dict[str, RequestFn]]:
    from datetime import timedelta

    from pyreqwest.client import ClientBuilder

    client = (
        ClientBuilder()
        .max_connections(concurrency)
        .pool_max_idle_per_host(concurrency)
        .pool_idle_timeout(timedelta(seconds=30))
        .connect_timeout(timedelta(seconds=5))
        .read_timeout(timedelta(seconds=30))
        .http1_only()
        .build()
    )

    async def plain() -> tuple[int, int]:
        request = client.post(url).headers(HEADERS).body_bytes(PLAIN_REQUEST).build()
        resp = await request.send()
        check_status(resp.status)
        return len(await resp.bytes()), 1

    async def stream() -> tuple[int, int]:
        request = client.post(url).headers(HEADERS).body_bytes(STREAM_REQUEST).build_streamed()
        async with request as resp:
            check_status(resp.status)
            size = chunks = 0
            while (chunk := await resp.body_reader.read_chunk()) is not None:
                size += len(chunk)
                chunks += 1
            return size, chunks

    try:
        yield {"plain": plain, "stream": stream}
    finally:
        await client.close()


CLIENTS = {"aiohttp": aiohttp_client, "httpx": httpx_client}
if importlib.util.find_spec("pyreqwest") is not None:  # the bench extra
    CLIENTS["pyreqwest"] = pyreqwest_client
EXPECTED_BYTES = {"plain": len(COMPLETION), "stream": STREAM_BYTES}

# --------------------------------------------------------------------------- load


@dataclass
class Result:
    client: str
    mode: str
    concurrency: int
    load: Load[tuple[int, int]]  # the timed phase
    chunks: int

    @property
    def cpu_us(self) -> float:
        return 1e6 * self.load.cpu_s / self.load.requests


def checked_chunks(load: Load[tuple[int, int]], expected: int) -> int:
    """Every body had ``expected`` bytes (else RuntimeError); the chunks of all of them."""
    for size, _ in load.results:
        if size != expected:
            raise RuntimeError(f"body of {size} bytes, expected {expected}")
    return sum(chunks for _, chunks in load.results)


async def measure(client: str, url: str, mode: str, concurrency: int, n: int, warmup: int):
    async with CLIENTS[client](url, concurrency) as requests:
        request, expected = requests[mode], EXPECTED_BYTES[mode]
        warm = await drive(request, max(warmup, 2 * concurrency), concurrency)
        checked_chunks(warm, expected)
        load = await drive(request, n, concurrency)
    chunks = checked_chunks(load, expected)
    return Result(client, mode, concurrency, load, chunks)


# --------------------------------------------------------------------------- report

COLUMNS = (
    f"{'client':<10}{'mode':<8}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
    f"{'x aio':>7}{'cpu us':>8}{'cpu x':>7}{'chunks':>8}"
)


def row(result: Result, baseline: Result) -> str:
    load = result.load
    return (
        f"{result.client:<10}{result.mode:<8}{result.concurrency:>5}{load.rps:>9,.0f}"
        f"{load.percentile_ms(50):>9.2f}{load.percentile_ms(99):>9.2f}"
        f"{load.rps / baseline.load.rps:>7.2f}{result.cpu_us:>8.0f}"
        f"{result.cpu_us / baseline.cpu_us:>7.2f}{result.chunks / load.requests:>8.1f}"
    )


def print_header(args: argparse.Namespace) -> None:
    print(
        f"upstream HTTP clients: aiohttp {aiohttp.__version__}, httpx {httpx.__version__}"
        f" | Python {platform.python_version()}, uvloop {uvloop.__version__},"
        f" {os.cpu_count()} CPUs"
    )
    print(
        f"requests per run: plain {args.requests}, stream {args.stream_requests}"
        f" ({SSE_EVENTS} events + [DONE], {STREAM_BYTES} B); warm-up {args.warmup};"
        f" plain body {len(COMPLETION)} B"
    )
    print(COLUMNS)


async def run_all(args: argparse.Namespace, url: str) -> None:
    print_header(args)
    counts = {"plain": args.requests, "stream": args.stream_requests}
    for mode, n in counts.items():
        for concurrency in args.concurrency:
            results = [
                await measure(client, url, mode, concurrency, n, args.warmup) for client in CLIENTS
            ]
            for result in results:
                print(row(result, baseline=results[0]), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000, help="timed plain requests")
    parser.add_argument(
        "--stream-requests", type=int, help="timed streaming requests (default: requests / 2)"
    )
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 10, 50],
        help="comma-separated levels, e.g. 1,10,50",
    )
    parser.add_argument("--warmup", type=int, default=200, help="untimed requests per run")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stream_requests is None:
        args.stream_requests = max(1, args.requests // 2)
    return args


def main() -> None:
    args = parse_args()
    if args.serve is not None:
        serve(args.serve)
        return
    started = time.perf_counter()
    with upstream_server() as url:
        uvloop.run(run_all(args, url))
    print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
