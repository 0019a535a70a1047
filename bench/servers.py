"""Serving: a raw ASGI app vs Django's handler, on uvicorn's stacks and granian's; the proxy too.

What is measured
  The proxy's routes are a raw ASGI app on uvicorn + uvloop + httptools, outside
  Django's request machinery (stagegate/asgi.py). This script puts a number on both
  choices with the smallest possible endpoint, GET /v1/ping answering the same
  ~200-byte JSON body (json.dumps per request, as JsonResponse does), served by four
  subprocesses, each on a free port (this file re-run with --serve KIND PORT):

    raw           a raw ASGI function (checks scope["path"], sends start + body with
                  content-type and content-length), uvicorn loop=uvloop, http=httptools
    raw-h11       the same function, uvicorn loop=asyncio, http=h11 (pure Python)
    django-async  `async def ping(request): return JsonResponse(...)` through Django's
                  ASGI handler with the project's settings and its full MIDDLEWARE
                  (the urlconf is this module's one route), uvicorn uvloop + httptools
    django-sync   the same with `def ping(request)`: Django runs the view in a thread
    granian-asgi  the raw ASGI function on granian (Rust HTTP, one worker, uvloop), when
                  granian is installed (pip install -e ".[bench]")
    granian-rsgi  the same endpoint as an RSGI function (granian's own interface:
                  protocol.response_bytes, no ASGI message dicts), granian, uvloop

  Then, unless --no-proxy, the proxy's real path: Stagegate itself (stagegate.asgi,
  lifespan on: snapshot, usage writer) set up as bench/proxy.py does (embedded, the
  example plan, a key) in front of nginx answering a fixed chat completion
  (bench/proxy.py --upstream nginx), POST /v1/chat/completions through:

    proxy-uvicorn        python -m stagegate.serve (uvicorn + uvloop + httptools)
    proxy-granian-asgi   granian, interface asgi, one worker, uvloop, lifespan on

  The proxy is an ASGI app, so RSGI cannot serve it without an adapter in access/;
  the ping rows say what RSGI would save over granian's ASGI.

  One closed-loop load generator in this process (aiohttp on uvloop, one keep-alive
  connection per worker, as bench/http_clients.py) runs, per concurrency, each server
  in turn back to back: a warm-up, then N timed requests or S seconds, whichever ends
  first (Django serves an order of magnitude fewer requests per second; the cap keeps
  the run short). Every answer must be a 200 with the expected body; anything else is
  counted as an error.

How to read the output
  requests    timed requests completed (below N when the time cap ended the run)
  errors      answers that were not a 200 with the expected body (warm-up included)
  req/s       completed requests / wall time of the timed phase
  p50, p99    latency in ms, from sending the request to its last body byte
  srv us/req  CPU time (utime + stime from /proc, all threads) of the server process
              during the timed phase, per request: what serving one ping costs.
              1e6 / (srv us/req) is about what one fully busy worker could serve
  x raw       req/s as a ratio to raw's at the same concurrency, same run (in the
              proxy table: to proxy-uvicorn's)
  cpu x raw   srv us/req as a ratio to raw's (above 1 = costs more CPU per request)

  The load generator and the server share this machine's cores (the header says how
  many), so req/s is a system figure and p50/p99 at concurrency 20 include waiting for
  a core; srv us/req is the figure least disturbed by that sharing. Absolute numbers
  depend on the machine; compare the ratios across machines.

Usage: python bench/servers.py [--quick] [--requests 10000] [--seconds 6]
                               [--concurrency 1,20] [--warmup 300] [--no-proxy]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import uvloop
from django.http import HttpRequest, JsonResponse
from loadgen import (
    Load,
    Server,
    client_session,
    drive,
    free_port,
    http_status,
    tree_cpu_seconds,
)

ROOT = Path(__file__).resolve().parent.parent
PATH = "/v1/ping"

sys.path.insert(0, str(ROOT))

# --------------------------------------------------------------------------- servers

# About 200 bytes once serialized; every server serializes it per request.
PING = {
    "object": "ping",
    "status": "ok",
    "service": "stagegate",
    "version": "2026.11.0",
    "worker": "uvicorn-1",
    "checks": {"snapshot": "fresh", "limiter": "local", "usage_writer": "running"},
    "time": 1_700_000_000,
}
PING_BYTES = len(json.dumps(PING).encode())  # what JsonResponse sends, byte for byte


async def raw_app(scope, receive, send) -> None:
    """The proxy's style: a plain ASGI function, no framework."""
    if scope["type"] != "http":
        return
    if scope["method"] == "GET" and scope["path"] == PATH:
        body = json.dumps(PING).encode()
        status = 200
    else:
        body = b'{"error":"not found"}'
        status = 404
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def ping_async(request: HttpRequest) -> JsonResponse:
    return JsonResponse(PING)


def ping_sync(request: HttpRequest) -> JsonResponse:
    return JsonResponse(PING)


# The urlconf of the Django servers: this module (__main__ in a --serve process), with
# the one route django_app() sets, so the project's own URLs and views stay out of it.
urlpatterns: list = []


def django_app(view: Callable):
    """Django's ASGI handler with the project's settings, MIDDLEWARE and only ``view``."""
    global urlpatterns
    from django.conf import settings
    from django.core.asgi import get_asgi_application
    from django.urls import path

    urlpatterns = [path(PATH.lstrip("/"), view)]
    # Set before the handler exists, so no resolver has cached the project's urlconf.
    settings.ROOT_URLCONF = __name__
    return get_asgi_application()


async def rsgi_app(scope, protocol) -> None:
    """The same endpoint as raw_app through granian's RSGI interface."""
    if scope.proto != "http":
        return
    if scope.method == "GET" and scope.path == PATH:
        body = json.dumps(PING).encode()
        status = 200
    else:
        body = b'{"error":"not found"}'
        status = 404
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    protocol.response_bytes(status, headers, body)


@dataclass(frozen=True)
class Kind:
    label: str
    loop: str
    http: str
    app: Callable[[], Callable]
    granian: str | None = None  # granian's interface (asgi, rsgi); None: uvicorn
    target: str = ""  # granian imports its app by name, from this directory


GRANIAN = importlib.util.find_spec("granian") is not None


KINDS = {
    "raw": Kind("raw ASGI app, uvicorn uvloop + httptools", "uvloop", "httptools", lambda: raw_app),
    "raw-h11": Kind("raw ASGI app, uvicorn asyncio + h11", "asyncio", "h11", lambda: raw_app),
    "django-async": Kind(
        "Django ASGI handler, async view, uvicorn uvloop + httptools",
        "uvloop",
        "httptools",
        lambda: django_app(ping_async),
    ),
    "django-sync": Kind(
        "Django ASGI handler, sync view, uvicorn uvloop + httptools",
        "uvloop",
        "httptools",
        lambda: django_app(ping_sync),
    ),
}
if GRANIAN:  # the bench extra
    KINDS["granian-asgi"] = Kind(
        "raw ASGI app, granian, uvloop", "uvloop", "granian", lambda: raw_app, "asgi", "raw_app"
    )
    KINDS["granian-rsgi"] = Kind(
        "RSGI app, granian, uvloop", "uvloop", "granian", lambda: rsgi_app, "rsgi", "rsgi_app"
    )
BASELINE = "raw"


def serve_granian(target: str, interface: str, port: int, working_dir: Path) -> None:
    from granian import Granian

    Granian(
        target,
        address="127.0.0.1",
        port=port,
        interface=interface,
        workers=1,
        loop="uvloop",
        log_level="warning",
        log_access=False,
        working_dir=working_dir,
    ).serve()


def serve(kind: str, port: int) -> None:
    import uvicorn

    config = KINDS[kind]
    if config.granian is not None:
        bench = Path(__file__).resolve().parent
        serve_granian(f"servers:{config.target}", config.granian, port, bench)
        return
    uvicorn.run(
        config.app(),
        host="127.0.0.1",
        port=port,
        loop=config.loop,
        http=config.http,
        lifespan="off",  # Django's handler refuses lifespan scopes; raw_app has no use for them
        access_log=False,
        log_level="warning",
    )


def configure(var_dir: str) -> None:
    """This process and its servers: the project's settings on a throwaway var dir."""
    os.environ.update(
        DJANGO_SETTINGS_MODULE="stagegate.settings",
        STAGEGATE_MODE="embedded",
        STAGEGATE_VAR_DIR=var_dir,
        DEBUG="False",
    )
    for name in ("DATABASE_URL", "STAGEGATE_SQLITE_PATH", "PROMETHEUS_MULTIPROC_DIR", "REDIS_URL"):
        os.environ.pop(name, None)


def sync_only_middleware() -> list[str]:
    """MIDDLEWARE entries Django must run synchronously (each costs the async chain a hop)."""
    import django
    from django.conf import settings
    from django.utils.module_loading import import_string

    django.setup()
    return [
        name
        for name in settings.MIDDLEWARE
        if not getattr(import_string(name), "async_capable", False)
    ]


class PingServer(Server):
    """This file re-run with --serve KIND PORT, its output in a log file."""

    def __init__(self, kind: str, log_dir: str) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}{PATH}"
        args = [sys.executable, str(Path(__file__).resolve()), "--serve", kind, str(port)]
        super().__init__(kind, args, log_dir)

    def answers(self) -> bool:
        """GET /v1/ping answers 200 (a readiness check for wait_ready)."""
        return http_status(self.url) == 200


# --------------------------------------------------------------------------- load

# A request returns True when the answer was a 200 with the expected body.
RequestFn = Callable[[], Awaitable[bool]]


@contextlib.asynccontextmanager
async def client(url: str, concurrency: int) -> AsyncIterator[RequestFn]:
    """A session with one keep-alive connection per worker (as bench/http_clients.py)."""
    session = client_session(concurrency)
    headers = {"accept": "application/json", "accept-encoding": "identity"}

    async def ping() -> bool:
        try:
            async with session.get(url, headers=headers) as response:
                body = await response.read()
                return response.status == 200 and len(body) == PING_BYTES
        except (aiohttp.ClientError, TimeoutError):
            return False

    try:
        yield ping
    finally:
        await session.close()


@dataclass
class Run:
    kind: str
    concurrency: int
    load: Load[bool]  # the timed phase
    errors: int  # warm-up included
    server_cpu_s: float

    @property
    def server_us(self) -> float:
        return 1e6 * self.server_cpu_s / self.load.requests


async def measure(server: PingServer, concurrency: int, args: argparse.Namespace) -> Run:
    # args.seconds caps each phase: Django serves an order of magnitude fewer requests
    # per second than raw.
    async with client(server.url, concurrency) as ping:
        warm = max(args.warmup, 2 * concurrency)
        warm_up = await drive(ping, warm, concurrency, args.seconds / 2)
        # The tree: granian serves from a worker process under its own.
        cpu = tree_cpu_seconds(server.pid)
        load = await drive(ping, args.requests, concurrency, args.seconds)
        cpu = tree_cpu_seconds(server.pid) - cpu
    errors = warm_up.results.count(False) + load.results.count(False)
    return Run(server.name, concurrency, load, errors, cpu)


# --------------------------------------------------------------------------- report

COLUMNS = (
    f"{'server':<20}{'conc':>5}{'requests':>9}{'errors':>7}{'req/s':>9}{'p50 ms':>9}"
    f"{'p99 ms':>9}{'srv us/req':>12}{'x raw':>7}{'cpu x raw':>11}"
)


def row(run: Run, baseline: Run) -> str:
    load = run.load
    return (
        f"{run.kind:<20}{run.concurrency:>5}{load.requests:>9}{run.errors:>7}{load.rps:>9,.0f}"
        f"{load.percentile_ms(50):>9.2f}{load.percentile_ms(99):>9.2f}{run.server_us:>12,.0f}"
        f"{load.rps / baseline.load.rps:>7.2f}{run.server_us / baseline.server_us:>11.2f}"
    )


def print_header(args: argparse.Namespace, sync_only: list[str]) -> None:
    import django
    import uvicorn

    print(
        f"ASGI serving of GET {PATH} ({PING_BYTES} B JSON) | Python"
        f" {platform.python_version()}, Django {django.get_version()}, uvicorn"
        f" {uvicorn.__version__}, uvloop {uvloop.__version__}, aiohttp {aiohttp.__version__}"
        f" | os.cpu_count() = {os.cpu_count()}"
    )
    print(
        f"NOTE: the load generator and the server share these {os.cpu_count()} CPUs: req/s is a"
        " system figure; srv us/req is the server's own cost per request."
    )
    for name, kind in KINDS.items():
        print(f"  {name:<14}{kind.label}")
    print(
        f"Django MIDDLEWARE: {len(sync_only)} sync-only entr{'y' if len(sync_only) == 1 else 'ies'}"
        f" ({', '.join(sync_only) or 'none'})"
        + ("; the async chain hops to a thread and back around it" if sync_only else "")
    )
    print(
        f"per run: {args.requests} timed requests or {args.seconds:g} s, whichever ends first;"
        f" warm-up {args.warmup} requests or {args.seconds / 2:g} s"
    )


# --------------------------------------------------------------------------- the proxy


class ProxyServer(Server):
    """Stagegate's real app, under uvicorn (stagegate.serve) or granian (--serve-proxy)."""

    def __init__(self, kind: str, log_dir: str) -> None:
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.url = f"{self.base}/v1/chat/completions"
        if kind == "proxy-uvicorn":
            args = [sys.executable, "-m", "stagegate.serve", "--port", str(port)]
        else:
            args = [sys.executable, str(Path(__file__).resolve()), "--serve-proxy", str(port)]
        super().__init__(kind, args, log_dir)

    def answers(self) -> bool:
        return http_status(f"{self.base}/healthz") == 200


PROXY_BASELINE = "proxy-uvicorn"


@contextlib.asynccontextmanager
async def chat_client(url: str, concurrency: int, raw_key: str) -> AsyncIterator[RequestFn]:
    """POST the bench chat request (bench/proxy.py's) with the key; True on a whole 200."""
    import proxy as proxy_bench

    session = client_session(concurrency)
    headers = {
        "content-type": "application/json",
        "accept-encoding": "identity",
        "authorization": f"Bearer {raw_key}",
    }
    body = proxy_bench.request_body(proxy_bench.RELEASE, stream=False)

    async def chat() -> bool:
        try:
            async with session.post(url, data=body, headers=headers) as response:
                answer = await response.read()
                return response.status == 200 and answer.startswith(b"{")
        except (aiohttp.ClientError, TimeoutError):
            return False

    try:
        yield chat
    finally:
        await session.close()


async def measure_proxy(
    server: ProxyServer, concurrency: int, args: argparse.Namespace, raw_key: str
) -> Run:
    async with chat_client(server.url, concurrency, raw_key) as chat:
        warm_up = await drive(chat, max(args.warmup, 2 * concurrency), concurrency, args.seconds)
        cpu = tree_cpu_seconds(server.pid)
        load = await drive(chat, args.requests, concurrency, args.seconds)
        cpu = tree_cpu_seconds(server.pid) - cpu
    errors = warm_up.results.count(False) + load.results.count(False)
    return Run(server.name, concurrency, load, errors, cpu)


def proxy_path(args: argparse.Namespace, var_dir: str) -> None:
    """The proxy's real path under uvicorn and granian (see the module docstring)."""
    import proxy as proxy_bench

    proxy_bench.configure(var_dir, None)
    import django

    django.setup()
    servers: list[Server] = []
    try:
        upstream, upstream_base = proxy_bench.start_nginx_upstream(var_dir)
        servers.append(upstream)
        raw_key = proxy_bench.seed(f"{upstream_base}/v1")
        kinds = [PROXY_BASELINE] + (["proxy-granian-asgi"] if GRANIAN else [])
        proxies = [ProxyServer(kind, var_dir) for kind in kinds]
        servers.extend(proxies)
        for server in proxies:
            server.wait_ready(server.answers, 60)

        async def run() -> None:
            print()
            print("the proxy's real path, POST /v1/chat/completions, nginx upstream:")
            print(COLUMNS)
            for concurrency in args.concurrency:
                runs = [await measure_proxy(s, concurrency, args, raw_key) for s in proxies]
                for run in runs:
                    print(row(run, runs[0]), flush=True)

        uvloop.run(run())
    finally:
        for server in reversed(servers):
            server.stop(15)


async def run_load(args: argparse.Namespace, servers: list[PingServer]) -> None:
    print(COLUMNS)
    for concurrency in args.concurrency:
        # Every server back to back at one concurrency, so all see the same machine state.
        runs = [await measure(server, concurrency, args) for server in servers]
        baseline = next(run for run in runs if run.kind == BASELINE)
        for run in runs:
            print(row(run, baseline), flush=True)


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (about 15 s)")
    parser.add_argument("--requests", type=int, help="timed requests per run at most (10000)")
    parser.add_argument("--seconds", type=float, help="timed phase per run at most (6)")
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 20],
        help="comma-separated levels (default 1,20)",
    )
    parser.add_argument("--warmup", type=int, help="untimed requests per run (300)")
    parser.add_argument("--no-proxy", action="store_true", help="skip the proxy's real path")
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-proxy", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.requests = args.requests or (1000 if args.quick else 10000)
    args.seconds = args.seconds or (2.0 if args.quick else 6.0)
    args.warmup = args.warmup if args.warmup is not None else (100 if args.quick else 300)
    return args


def main() -> None:
    args = parse_args()
    if args.serve is not None:
        kind, port = args.serve
        serve(kind, int(port))
        return
    if args.serve_proxy is not None:
        serve_granian("stagegate.asgi:application", "asgi", args.serve_proxy, ROOT)
        return
    started = time.perf_counter()
    var_dir = tempfile.mkdtemp(prefix="stagegate-bench-servers-")
    servers: list[PingServer] = []
    try:
        configure(var_dir)
        print_header(args, sync_only_middleware())
        servers = [PingServer(kind, var_dir) for kind in KINDS]
        for server in servers:
            server.wait_ready(server.answers, 30)
        print(f"ready in {time.perf_counter() - started:.1f} s", flush=True)
        uvloop.run(run_load(args, servers))
        for server in servers:
            server.stop()
        if not args.no_proxy:
            proxy_path(args, var_dir)
    finally:
        for server in servers:
            server.stop()  # a no-op once stopped
        shutil.rmtree(var_dir, ignore_errors=True)
    print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
