"""Proxy overhead: the same load sent to the demo model directly and through Stagegate.

What is measured
  One run sets up a throwaway embedded Stagegate: SQLite in a temporary
  STAGEGATE_VAR_DIR and in-process rate limits (with --redis or REDIS_URL, limits
  in Redis; --redis alone starts a private redis-server). With --production it
  runs in production mode instead: a throwaway PostgreSQL database created for the
  run on the server --postgres names (dropped afterwards), limits in Redis (a
  private redis-server unless REDIS_URL is set), at concurrency 64 and 256 unless
  --concurrency says otherwise: the row that shows whether one worker's Redis
  connection pool holds up under many concurrent callers. It applies
  docs/examples/atlas-2.yaml with the upstream pointed at a demo upstream on a
  free port and research_partner's research_preview limits raised out of reach,
  creates northwind-research (research_partner, valid monitoring_agreement) and
  issues it a key. Two subprocesses, each on a free port, then serve:

    upstream   python -m stagegate.demo_upstream (latency 0: it answers at once), or
               with --upstream nginx: Debian's nginx (one worker) answering a fixed
               chat completion at /v1/chat/completions and a fixed SSE stream (16
               content chunks, a usage chunk, [DONE]) at /stream/v1/chat/completions,
               from a config this script writes to the run's temporary directory.
               nginx cannot branch on the body's "stream", so before the stream runs
               the plan is applied again with its base_url on /stream/v1, and the run
               waits until the proxy's snapshot has it. The upstream then costs a few
               µs a request, so the proxy's own cost is what the load measures
    proxy      python -m stagegate.serve (uvicorn + uvloop + httptools)

  One closed-loop load generator sends the same small chat request (max_tokens 16):
  with --load aiohttp, this process (aiohttp on uvloop; C workers, each sending its
  next request as soon as the last one ends; a warm-up first, then --requests); with
  --load wrk, Debian's wrk (the default where /usr/bin/wrk is installed: C and
  LuaJIT, far less CPU per request than aiohttp), one thread and C connections, from a
  Lua script written to the run's temporary directory, a 1 s warm-up, then --duration
  seconds. The script checks every answer: a status other than 200 is counted by its
  status and error code, a 200 whose body does not start with "{" (plain) or end with
  data: [DONE] (stream) as "200 (incomplete body)"; wrk's socket errors and its
  Non-2xx count are errors too. The requests go to:

    direct     POST {upstream}/v1/chat/completions, model atlas-2-2026-11
    stagegate  POST {proxy}/v1/chat/completions, model atlas-2, the key as Bearer

  in two modes, "plain" (whole JSON body) and "stream" ("stream": true, the SSE
  body read chunk by chunk to data: [DONE]), at each concurrency. Every answer
  must be a 200 with a complete body; anything else is counted as an error.
  Last, with the servers stopped and this process pinned to one core: decide()
  for an allowed request, and the proxy's key check (presented_key: header scan,
  parse_key, dict lookup, SHA-256, compare_digest) with its parts.

How to read the output
  errors       answers that were not a 200 with a complete body (warm-up included);
               under the table, each run's errors by kind: the status and error
               code, or the load generator's exception
  req/s        completed requests / wall time of the timed phase
  p50, p99     latency in ms, from sending the request to its last body byte
  proxy us/req CPU time (utime + stime from /proc, every thread: the event loop,
               the usage writer, the snapshot poller) of the proxy's processes
               during the timed phase, per request. The run waits until the
               proxy has written its usage rows (about once a second) before
               reading the clock, so each request's row is counted in its run
  upst us/req  the same for the upstream (the demo: a like-for-like uvicorn app; or nginx)
  via/direct   Stagegate's req/s as a ratio to the upstream's own
  +p50, +p99   latency added by going through Stagegate, in ms

  p99.9 (in the --json file only) is the same latency's 99.9th percentile: wrk's
  latency:percentile(99.9) from the script's done(), or the loadgen's.

  --pin (taskset) gives the proxy its own core(s): with W workers, the last W cores
  (or the last --proxy-cores), each worker process with all its threads on one of
  them; the load generator (wrk, or this process), the upstream and the private
  redis-server run on the remaining cores, or on the first core if none remain (on
  2 cores: the proxy on core 1, the rest on core 0; two workers on cores 0 and 1,
  one of them beside the rest). PostgreSQL is the machine's server and not pinned.

  --json PATH also writes every run (target, mode, concurrency, requests, errors,
  req/s, p50/p99/p99.9 ms, proxy and upstream us/req, workers, limiter, database
  mode) and how it was measured (load generator, pinning, load average before and
  after) as JSON, for bench/modes.py to combine runs of several invocations.

  The load generator, the proxy and the upstream share this machine's cores
  (the header says how many). With 2 cores, three busy processes take turns, so
  via/direct understates what a proxy on its own cores would carry, and the
  added latency at concurrency above 1 includes waiting for a core. proxy
  us/req is the figure least disturbed by that sharing: it is the proxy's cost
  per request; 1e6 / (proxy us/req) is about what one fully busy worker could
  serve. The micro-benchmarks are per call on one core, loop overhead included
  (the "empty call" row).

Usage: python bench/proxy.py [--quick] [--requests 6000] [--stream-requests 3000]
                             [--concurrency 1,10,50] [--redis] [--workers N]
                             [--upstream demo|nginx] [--load wrk|aiohttp] [--duration 10]
                             [--pin [--proxy-cores N]] [--json PATH]
                             [--production [--postgres postgres://postgres@127.0.0.1:5432]]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import orjson
import uvloop
import yaml
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
PLAN = ROOT / "docs" / "examples" / "atlas-2.yaml"
ORG_SLUG = "northwind-research"  # in the example plan's first stage's allow_orgs
TIER = "research_partner"
EVIDENCE = "monitoring_agreement"
RELEASE = "atlas-2"
UPSTREAM_MODEL = "atlas-2-2026-11"
ACTOR = "system:bench"
MAX_TOKENS = 16

sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- environment


def configure(var_dir: str, redis_url: str | None, database_url: str | None = None) -> None:
    """Point this process (and, through the environment, its servers) at a fresh var dir,
    and with ``database_url`` at a throwaway PostgreSQL database in production mode."""
    os.environ.update(
        DJANGO_SETTINGS_MODULE="stagegate.settings",
        STAGEGATE_MODE="embedded",
        STAGEGATE_VAR_DIR=var_dir,
        DEBUG="False",
    )
    # Throwaway means throwaway: never the database or sqlite file the shell points at.
    for name in ("DATABASE_URL", "STAGEGATE_SQLITE_PATH", "PROMETHEUS_MULTIPROC_DIR"):
        os.environ.pop(name, None)
    if redis_url:
        os.environ["REDIS_URL"] = redis_url
    else:
        os.environ.pop("REDIS_URL", None)
    if database_url:
        os.environ.update(
            STAGEGATE_MODE="production",
            DATABASE_URL=database_url,
            SECRET_KEY=os.urandom(32).hex(),
            ALLOWED_HOSTS="127.0.0.1",
            # No Celery worker runs here; the proxy needs no periodic work to serve.
            STAGEGATE_SCHEDULER="off",
        )


@contextlib.contextmanager
def throwaway_database(server_url: str):
    """A new, empty PostgreSQL database on ``server_url`` for this run; its URL. Dropped
    afterwards (the servers using it must have stopped)."""
    import psycopg

    name = f"stagegate_bench_{os.getpid()}"
    with psycopg.connect(f"{server_url}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{server_url}/{name}"
    finally:
        with psycopg.connect(f"{server_url}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def bench_plan(upstream_base_url: str) -> str:
    """The example plan with our upstream and research_preview limits no run can reach."""
    document = yaml.safe_load(PLAN.read_text())
    document["upstream"]["base_url"] = upstream_base_url
    first = document["stages"][0]
    # The proxy's own cost, as before screening: bench/screening.py measures screening.
    first.pop("screening", None)
    # The schema wants max_tokens <= tokens_per_minute <= tokens_per_day.
    first["tiers"][TIER]["limits"].update(
        requests_per_minute=10_000_000,
        tokens_per_minute=10_000_000_000,
        tokens_per_day=100_000_000_000,
        max_tokens=4096,
        streaming=True,
    )
    return yaml.safe_dump(document, sort_keys=False)


def seed(upstream_base_url: str) -> str:
    """Migrate, apply the plan, create the org and its verification; the raw key."""
    from django.core.management import call_command
    from django.db import connection
    from django.utils import timezone

    from access.keys import issue_key
    from access.models import VerificationStatus
    from access.organizations import create_organization
    from access.verifications import create_verification
    from rollout.plans import apply_plan

    call_command("migrate", verbosity=0)
    org = create_organization(slug=ORG_SLUG, name="Northwind Research", tier=TIER, actor=ACTOR)
    create_verification(
        organization=org,
        kind=EVIDENCE,
        status=VerificationStatus.VALID,
        expires_at=timezone.now() + timedelta(days=365),
        evidence_note="bench",
        actor=ACTOR,
    )
    apply_plan(bench_plan(upstream_base_url), actor=ACTOR, comment="bench/proxy.py")
    raw_key = issue_key(organization=org, name="bench", actor=ACTOR).raw_key
    connection.close()  # the proxy's usage writer shares the SQLite file
    return raw_key


TASKSET = shutil.which("taskset")


@dataclass(frozen=True)
class Layout:
    """Which cores the proxy's workers get, and which the rest (load generator, upstream,
    private redis-server, this process): both empty when nothing is pinned."""

    proxy: tuple[int, ...] = ()
    rest: tuple[int, ...] = ()

    @classmethod
    def pinned(cls, proxy_cores: int) -> Layout:
        """The last ``proxy_cores`` cores for the proxy, the others (or the first core,
        if none is left) for the rest."""
        cores = sorted(os.sched_getaffinity(0))
        if TASKSET is None or len(cores) < 2:
            raise SystemExit("--pin needs taskset (util-linux) and at least 2 cores")
        proxy = tuple(cores[-min(proxy_cores, len(cores)) :])
        return cls(proxy, tuple(core for core in cores if core not in proxy) or (cores[0],))

    def prefix(self, cores: tuple[int, ...]) -> list[str]:
        """``taskset -c CORES`` to start a command on ``cores``; nothing when not pinned."""
        return [TASKSET, "-c", ",".join(map(str, cores))] if cores else []

    def describe(self, workers: int) -> str:
        if not self.proxy:
            return "not pinned"
        return (
            f"proxy ({workers} worker(s), one core each) on core(s) {list(self.proxy)};"
            f" load generator, upstream, Redis and this process on core(s) {list(self.rest)};"
            " PostgreSQL not pinned"
        )


def pin_process(pid: int, cores: set[int]) -> None:
    """Put every thread of ``pid`` on ``cores`` (taskset -a -p)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cores)


def health_pid(url: str) -> int | None:
    with urllib.request.urlopen(url, timeout=2) as response:
        return orjson.loads(response.read())["pid"] if response.status == 200 else None


def start_redis(log_dir: str, prefix: list[str] | None = None) -> tuple[Server, str]:
    import redis

    port = free_port()
    server = Server(
        "redis",
        [
            *(prefix or []),
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        log_dir,
    )
    url = f"redis://127.0.0.1:{port}/0"

    def answers() -> bool:
        try:
            return redis.Redis.from_url(url, socket_timeout=1).ping()
        except redis.ConnectionError:
            return False

    server.wait_ready(answers, 15)
    return server, url


def start_upstream(log_dir: str, prefix: list[str] | None = None) -> tuple[Server, str]:
    port = free_port()
    server = Server(
        "upstream",
        [
            *(prefix or []),
            sys.executable,
            "-m",
            "stagegate.demo_upstream",
            "--port",
            str(port),
            "--latency-ms",
            "0",
        ],
        log_dir,
    )
    base = f"http://127.0.0.1:{port}"
    server.wait_ready(lambda: http_status(f"{base}/v1/models") == 200, 30)
    return server, base


NGINX = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin")


def fixed_completion() -> bytes:
    """What the demo upstream answers, fixed: one chat completion with usage."""
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": UPSTREAM_MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "A quiet river bends " * 4},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 2, "completion_tokens": MAX_TOKENS, "total_tokens": 18},
        }
    )


def fixed_stream() -> bytes:
    """A fixed SSE answer: a role chunk, MAX_TOKENS content chunks, a stop, usage, [DONE]."""

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
        document = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": UPSTREAM_MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if usage is not None:
            document["choices"] = []
            document["usage"] = usage
        return b"data: " + orjson.dumps(document) + b"\n\n"

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": " river"}) for _ in range(MAX_TOKENS)]
    events.append(chunk({}, "stop"))
    events.append(
        chunk({}, usage={"prompt_tokens": 2, "completion_tokens": MAX_TOKENS, "total_tokens": 18})
    )
    return b"".join(events) + DONE


NGINX_UPSTREAM_CONF = """\
worker_processes 1;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location = /v1/models {{
            default_type application/json;
            return 200 '{{"object":"list","data":[]}}';
        }}
        location = /v1/chat/completions {{
            default_type application/json;
            return 200 '{completion}';
        }}
        location = /stream/v1/chat/completions {{
            default_type text/event-stream;
            return 200 '{stream}';
        }}
    }}
}}
"""


def nginx_command(conf_dir: Path) -> list[str]:
    """nginx in the foreground on ``conf_dir/nginx.conf``, its pid file and errors there too."""
    if NGINX is None:
        raise SystemExit("nginx is not installed (apt-get install nginx-light)")
    return [
        NGINX,
        "-e",
        "stderr",
        "-p",
        f"{conf_dir}/",
        "-c",
        str(conf_dir / "nginx.conf"),
        "-g",
        f"daemon off; pid {conf_dir}/nginx.pid;",
    ]


def start_nginx_upstream(log_dir: str, prefix: list[str] | None = None) -> tuple[Server, str]:
    """nginx answering fixed bodies (see the module docstring); its base URL."""
    conf_dir = Path(log_dir) / "nginx-upstream"
    conf_dir.mkdir()
    conf_dir.chmod(0o755)  # a root master runs its worker as nobody
    port = free_port()

    def quoted(body: bytes) -> str:  # inside nginx's single quotes
        return body.decode().replace("\\", "\\\\").replace("'", "\\'")

    (conf_dir / "nginx.conf").write_text(
        NGINX_UPSTREAM_CONF.format(
            dir=conf_dir,
            port=port,
            completion=quoted(fixed_completion()),
            stream=quoted(fixed_stream()),
        )
    )
    server = Server("nginx-upstream", [*(prefix or []), *nginx_command(conf_dir)], log_dir)
    base = f"http://127.0.0.1:{port}"
    server.wait_ready(lambda: http_status(f"{base}/v1/models") == 200, 15)
    return server, base


def start_proxy(log_dir: str, workers: int, layout: Layout = Layout()) -> tuple[Server, str]:
    """``stagegate.serve`` with ``workers`` workers; with a pinned ``layout``, on its proxy
    cores, each worker (all its threads) on one of them."""
    port = free_port()
    server = Server(
        "proxy",
        [
            *layout.prefix(layout.proxy),
            sys.executable,
            "-m",
            "stagegate.serve",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ],
        log_dir,
    )
    base = f"http://127.0.0.1:{port}"
    server.wait_ready(lambda: http_status(f"{base}/healthz") == 200, 60)
    if workers > 1:
        # /healthz names the worker that answered; wait until every worker has.
        seen: set[int | None] = set()

        def every_worker_answered() -> bool:
            seen.add(health_pid(f"{base}/healthz"))
            return len(seen) >= workers

        server.wait_ready(every_worker_answered, 30)
        if layout.proxy:
            for index, pid in enumerate(sorted(pid for pid in seen if pid is not None)):
                pin_process(pid, {layout.proxy[index % len(layout.proxy)]})
    return server, base


# --------------------------------------------------------------------------- load

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Describe a quiet river in one sentence."},
]
DONE = b"data: [DONE]\n\n"

# A request returns True when the answer was a 200 with a complete body, else what went
# wrong: the status and error code, or the exception's name.
Outcome = bool | str
RequestFn = Callable[[], Awaitable[Outcome]]


def failure(status: int, body: bytes) -> str:
    """``"503 limits_unavailable"``: the status and the code of an OpenAI-shaped error."""
    try:
        return f"{status} {orjson.loads(body)['error']['code']}"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return f"{status} (incomplete body)"


def request_body(model: str, stream: bool) -> bytes:
    return orjson.dumps(
        {"model": model, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "stream": stream}
    )


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    model: str
    headers: dict[str, str]
    server: Server  # whose CPU is charged to this target
    stream_url: str | None = None  # where stream requests go, if not to url


@contextlib.asynccontextmanager
async def client(target: Target, concurrency: int) -> AsyncIterator[dict[str, RequestFn]]:
    """A session with one keep-alive connection per worker (as bench/http_clients.py)."""
    session = client_session(concurrency)
    headers = {"content-type": "application/json", "accept-encoding": "identity", **target.headers}
    plain_body = request_body(target.model, stream=False)
    stream_body = request_body(target.model, stream=True)

    async def plain() -> Outcome:
        try:
            async with session.post(target.url, data=plain_body, headers=headers) as response:
                body = await response.read()
                if response.status == 200 and body.startswith(b"{"):
                    return True
                return failure(response.status, body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return type(exc).__name__

    async def stream() -> Outcome:
        try:
            url = target.stream_url or target.url
            async with session.post(url, data=stream_body, headers=headers) as response:
                head, tail = b"", b""
                async for chunk in response.content.iter_any():
                    head = head or chunk  # an error answer is one JSON body
                    tail = (tail + chunk)[-len(DONE) :]
                if response.status == 200 and tail == DONE:
                    return True
                return failure(response.status, head)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return type(exc).__name__

    try:
        yield {"plain": plain, "stream": stream}
    finally:
        await session.close()


WRK = shutil.which("wrk")
WRK_WARMUP_S = 1  # wrk takes whole seconds

WRK_SCRIPT = """\
-- bench/proxy.py: {target} {mode}. Every answer must be a 200 with a complete body;
-- done() prints the 99.9th percentile and the failures each thread counted, by kind.
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept-Encoding"] = "identity"
{authorization}
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) failures = {{}} end

local function complete(body)
  {complete}
end

function response(status, headers, body)
  local kind = nil
  if status ~= 200 then
    local code = string.match(body or "", '"code"%s*:%s*"([^"]+)"')
    kind = status .. " " .. (code or "(incomplete body)")
  elseif not complete(body or "") then
    kind = "200 (incomplete body)"
  end
  if kind then failures[kind] = (failures[kind] or 0) + 1 end
end

function done(summary, latency, requests)
  io.write(string.format("p99.9_us %d\\n", latency:percentile(99.9)))
  for _, thread in ipairs(threads) do
    for kind, count in pairs(thread:get("failures")) do
      io.write(string.format("failure %d %s\\n", count, kind))
    end
  end
end
"""


def wrk_script(directory: str, target: Target, mode: str) -> Path:
    """The Lua script wrk sends ``target``'s ``mode`` request with (module docstring)."""
    stream = mode == "stream"
    authorization = "\n".join(
        f'wrk.headers["{name.title()}"] = "{value}"' for name, value in target.headers.items()
    )
    done = DONE.decode().replace("\n", "\\n")  # as a Lua string literal
    complete = (
        f'return string.sub(body, -{len(DONE)}) == "{done}"'
        if stream
        else 'return string.sub(body, 1, 1) == "{"'
    )
    script = Path(directory) / f"wrk-{target.name}-{mode}.lua"
    script.write_text(
        WRK_SCRIPT.format(
            target=target.name,
            mode=mode,
            body=request_body(target.model, stream).decode(),
            authorization=authorization,
            complete=complete,
        )
    )
    return script


def wrk_version() -> str:
    """``wrk debian/4.1.0-3+b2``: wrk -v prints it (and exits 1)."""
    out = subprocess.run([WRK, "-v"], capture_output=True, text=True, check=False).stdout
    return " ".join(out.split()[:2]) or "wrk"


def wrk_ms(text: str) -> float:
    """wrk's ``412.00us`` / ``1.23ms`` / ``2.01s`` in ms."""
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


@dataclass
class WrkLoad:
    """One wrk run: the requests it completed, its req/s, its latency percentiles (ms,
    from sending a request to its last body byte) and its failures by kind."""

    requests: int
    rps: float
    percentiles: dict[float, float]
    failures: collections.Counter[str]

    def percentile_ms(self, pct: float) -> float:
        return self.percentiles[pct]


def run_wrk(url: str, concurrency: int, seconds: int, script: Path, prefix: list[str]) -> WrkLoad:
    out = subprocess.run(
        [
            *prefix,
            WRK,
            "-t1",
            f"-c{concurrency}",
            f"-d{seconds}s",
            "--timeout",
            "30s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    percentiles = {
        float(pct): wrk_ms(value)
        # "     99%    1.02s ": wrk pads a one-letter unit with a space
        for pct, value in re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.MULTILINE)
    }
    percentiles[99.9] = int(re.search(r"^p99\.9_us (\d+)$", out, re.MULTILINE).group(1)) / 1e3
    failures: collections.Counter[str] = collections.Counter()
    for count, kind in re.findall(r"^failure (\d+) (.+)$", out, re.MULTILINE):
        failures[kind] += int(count)
    # wrk's own count of non-2xx answers; the script's statuses should account for all.
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    counted = sum(n for kind, n in failures.items() if not kind.startswith("200 "))
    if non_2xx and int(non_2xx.group(1)) > counted:
        failures["non-2xx (wrk)"] += int(non_2xx.group(1)) - counted
    # Socket errors: connect 0, read 0, write 0, timeout 0 (printed only when any is not 0)
    sockets = re.search(r"^\s*Socket errors: (.*)$", out, re.MULTILINE)
    for kind, count in re.findall(r"(\w+) (\d+)", sockets.group(1) if sockets else ""):
        if int(count):
            failures[f"socket {kind} (wrk)"] += int(count)
    return WrkLoad(
        int(re.search(r"(\d+) requests in", out).group(1)),
        float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        percentiles,
        failures,
    )


def outcomes(load: Load[Outcome] | WrkLoad) -> collections.Counter[str]:
    """What went wrong in a run, by kind."""
    if isinstance(load, WrkLoad):
        return load.failures
    return collections.Counter(result for result in load.results if result is not True)


@dataclass
class Run:
    target: str
    mode: str
    concurrency: int
    load: Load[Outcome] | WrkLoad  # the timed phase
    errors: collections.Counter[str]  # by kind, warm-up included
    proxy_cpu_s: float | None
    upstream_cpu_s: float

    def us_per_request(self, cpu_s: float | None) -> float | None:
        return None if cpu_s is None else 1e6 * cpu_s / self.load.requests

    def record(self) -> dict[str, object]:
        """This run for --json (the figures printed, and p99.9)."""
        load = self.load
        return {
            "target": self.target,
            "mode": self.mode,
            "concurrency": self.concurrency,
            "requests": load.requests,
            "errors": self.errors.total(),
            "errors_by_kind": dict(self.errors),
            "rps": load.rps,
            "wall_s": load.requests / load.rps,
            "p50_ms": load.percentile_ms(50),
            "p99_ms": load.percentile_ms(99),
            "p99.9_ms": load.percentile_ms(99.9),
            "proxy_cpu_s": self.proxy_cpu_s,
            "proxy_us_per_request": self.us_per_request(self.proxy_cpu_s),
            "upstream_cpu_s": self.upstream_cpu_s,
            "upstream_us_per_request": self.us_per_request(self.upstream_cpu_s),
        }


@dataclass
class Servers:
    """The running servers, and how many calls the proxy has been sent (to wait for usage)."""

    proxy: Server
    upstream: Server
    proxy_calls: int = 0

    async def usage_written(self, deadline_s: float = 30.0) -> bool:
        """Wait until the proxy has written a usage row for every call it was sent.

        Its usage thread writes about once a second; waiting for it puts the cost of
        writing a run's own events, and only those, inside that run's CPU window.
        """
        from monitoring.models import UsageEvent

        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            # A thread: Django refuses synchronous queries inside an event loop.
            written = await asyncio.to_thread(UsageEvent.objects.count)
            if written >= self.proxy_calls:
                # wrk counts only the answers it read: the calls it left in flight at
                # the end of a run are written too, and counted from here on.
                self.proxy_calls = written
                return True
            await asyncio.sleep(0.05)
        print(f"  (usage rows still missing after {deadline_s:.0f} s)", flush=True)
        return False


async def measure(
    target: Target, mode: str, concurrency: int, args: argparse.Namespace, servers: Servers
) -> Run:
    """One warm-up and one timed phase of ``target``'s ``mode`` requests at ``concurrency``,
    with the CPU the proxy and the upstream spent in the timed phase."""
    through_proxy = target.server is servers.proxy
    async with contextlib.AsyncExitStack() as stack:
        if args.load == "wrk":
            script = wrk_script(args.var_dir, target, mode)
            url = (target.stream_url or target.url) if mode == "stream" else target.url
            prefix = args.layout.prefix(args.layout.rest)

            def phase(seconds: int) -> Awaitable[WrkLoad]:
                return asyncio.to_thread(run_wrk, url, concurrency, seconds, script, prefix)

            warm_up, timed = phase(WRK_WARMUP_S), lambda: phase(args.duration)
        else:
            request = (await stack.enter_async_context(client(target, concurrency)))[mode]
            n = args.requests if mode == "plain" else args.stream_requests
            warm_up = drive(request, max(args.warmup, 2 * concurrency), concurrency)

            def timed() -> Awaitable[Load[Outcome]]:
                return drive(request, n, concurrency)

        warm = await warm_up
        if through_proxy:
            servers.proxy_calls += warm.requests
            await servers.usage_written()
        proxy_cpu = tree_cpu_seconds(servers.proxy.pid)
        upstream_cpu = tree_cpu_seconds(servers.upstream.pid)
        load = await timed()
        if through_proxy:
            servers.proxy_calls += load.requests
            await servers.usage_written()
        proxy_cpu = tree_cpu_seconds(servers.proxy.pid) - proxy_cpu
        upstream_cpu = tree_cpu_seconds(servers.upstream.pid) - upstream_cpu
    return Run(
        target.name,
        mode,
        concurrency,
        load,
        outcomes(warm) + outcomes(load),
        proxy_cpu if through_proxy else None,
        upstream_cpu,
    )


# --------------------------------------------------------------------------- report


def cell(value: float | None, width: int, spec: str) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def print_runs(runs: list[Run]) -> None:
    print(
        f"{'target':<10}{'mode':<8}{'conc':>5}{'requests':>9}{'errors':>7}{'req/s':>9}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'proxy us/req':>14}{'upst us/req':>13}"
    )
    for run in runs:
        load = run.load
        print(
            f"{run.target:<10}{run.mode:<8}{run.concurrency:>5}{load.requests:>9}"
            f"{run.errors.total():>7}"
            f"{load.rps:>9,.0f}{load.percentile_ms(50):>9.2f}{load.percentile_ms(99):>9.2f}"
            f"{cell(run.us_per_request(run.proxy_cpu_s), 14, ',.0f')}"
            f"{cell(run.us_per_request(run.upstream_cpu_s), 13, ',.0f')}"
        )
    for run in runs:
        if run.errors:
            kinds = ", ".join(f"{count} {kind}" for kind, count in run.errors.most_common())
            print(f"  errors, {run.target} {run.mode} c={run.concurrency}: {kinds}")


def print_ratios(runs: list[Run]) -> None:
    print()
    print("through Stagegate vs direct, per (mode, concurrency):")
    print(
        f"{'mode':<8}{'conc':>5}{'via/direct':>12}{'+p50 ms':>9}{'+p99 ms':>9}{'proxy us/req':>14}"
    )
    by_key = {(run.target, run.mode, run.concurrency): run for run in runs}
    for run in runs:
        if run.target != "stagegate":
            continue
        load, direct = run.load, by_key[("direct", run.mode, run.concurrency)].load
        print(
            f"{run.mode:<8}{run.concurrency:>5}{load.rps / direct.rps:>12.2f}"
            f"{load.percentile_ms(50) - direct.percentile_ms(50):>9.2f}"
            f"{load.percentile_ms(99) - direct.percentile_ms(99):>9.2f}"
            f"{cell(run.us_per_request(run.proxy_cpu_s), 14, ',.0f')}"
        )


async def stream_from_nginx(upstream_base: str, proxy: Target) -> int:
    """Point the plan at nginx's SSE location and wait until the proxy streams from it;
    how many calls that took (each writes a usage row)."""
    from rollout.plans import apply_plan

    plan = bench_plan(f"{upstream_base}/stream/v1")
    # A thread: Django refuses synchronous queries inside an event loop.
    await asyncio.to_thread(apply_plan, plan, actor=ACTOR, comment="bench/proxy.py: SSE")
    calls = 0
    async with client(proxy, 1) as requests:
        deadline = time.monotonic() + 30
        while True:
            calls += 1
            if await requests["stream"]() is True:
                return calls
            if time.monotonic() > deadline:
                raise RuntimeError("the proxy did not pick up the plan's SSE upstream in 30 s")
            await asyncio.sleep(0.1)


async def run_load(
    args: argparse.Namespace, targets: list[Target], servers: Servers, upstream_base: str
) -> list[Run]:
    runs = []
    for mode in ("plain", "stream"):
        if mode == "stream" and args.upstream == "nginx":
            servers.proxy_calls += await stream_from_nginx(upstream_base, targets[1])
        for concurrency in args.concurrency:
            # Direct and through Stagegate back to back, so both see the same machine state.
            for target in targets:
                run = await measure(target, mode, concurrency, args, servers)
                runs.append(run)
                progress = f"  {run.target:<10}{run.mode:<8}c={run.concurrency:<4}"
                print(f"{progress}{run.load.rps:>9,.0f} req/s", flush=True)
    return runs


# --------------------------------------------------------------------------- micro


def per_call_us(fn: Callable[[], object], iterations: int) -> float:
    """Mean µs per call of ``fn`` over ``iterations`` calls, after a tenth as warm-up."""
    for _ in range(max(1, iterations // 10)):
        fn()
    gc.collect()
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return 1e6 * (time.perf_counter() - start) / iterations


def micro(iterations: int) -> None:
    """decide() and the key check, on one core, from the example plan's first stage."""
    import hashlib
    import hmac

    from access.decisions import (
        Decision,
        KeyEntry,
        OrgEntry,
        ReleaseEntry,
        RequestInfo,
        decide,
    )
    from access.keys import digest, generate_key, parse_key
    from access.proxy import presented_key
    from access.snapshot import Snapshot
    from rollout.plan_schema import parse_plan

    with contextlib.suppress(AttributeError, OSError):  # not every OS can pin
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    stage = parse_plan(PLAN.read_bytes()).stages[0]
    now = time.time()
    raw_key, key_id = generate_key()
    key = KeyEntry(key_id, f"key_{key_id}", digest(raw_key), 1, None, False)
    org = OrgEntry("org_bench", ORG_SLUG, TIER, ((EVIDENCE, now + 365 * 86_400),))
    release = ReleaseEntry(
        RELEASE, "rel_bench", "active", stage, "http://127.0.0.1:8001/v1", UPSTREAM_MODEL, 1, 0
    )
    request = RequestInfo("chat.completions", stream=True, max_tokens=MAX_TOKENS)

    def decide_allowed() -> Decision:
        return decide(key=key, org=org, release=release, model=RELEASE, request=request, now=now)

    if not decide_allowed().allowed:
        raise RuntimeError(f"the bench request is refused: {decide_allowed()}")

    # A snapshot of 10,000 keys: the lookup is a dict hit whatever the size.
    keys = {key_id: key}
    for _ in range(9_999):
        other_raw, other_id = generate_key()
        keys[other_id] = KeyEntry(other_id, f"key_{other_id}", digest(other_raw), 1, None, False)
    snapshot = Snapshot(marker=None, keys=keys, orgs={1: org}, releases={RELEASE: release})
    raw = raw_key.encode()
    scope = {
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"accept-encoding", b"identity"),
            (b"authorization", b"Bearer " + raw),
        ]
    }
    if presented_key(scope, snapshot) is not key:
        raise RuntimeError("presented_key does not find the bench key")

    cases: dict[str, Callable[[], object]] = {
        "empty call (loop overhead)": lambda: None,
        "decide (allowed)": decide_allowed,
        "presented_key (valid key)": lambda: presented_key(scope, snapshot),
        "  parse_key": lambda: parse_key(raw_key),
        "  sha256 hex + compare_digest": lambda: hmac.compare_digest(
            hashlib.sha256(raw).hexdigest(), key.digest
        ),
        "  dict lookup": lambda: keys.get(key_id),
    }
    print()
    print(f"in-process, one core, {iterations:,} calls each (after a tenth as warm-up):")
    print(f"{'case':<32}{'calls/s':>12}{'us/call':>9}")
    for name, fn in cases.items():
        us = per_call_us(fn, iterations)
        print(f"{name:<32}{1e6 / us:>12,.0f}{us:>9.2f}", flush=True)


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (about a minute)")
    parser.add_argument("--requests", type=int, help="timed plain requests per run (6000)")
    parser.add_argument("--stream-requests", type=int, help="timed stream requests (3000)")
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 10, 50],
        help="comma-separated levels (default 1,10,50)",
    )
    parser.add_argument("--warmup", type=int, help="untimed requests per run (200)")
    parser.add_argument("--iterations", type=int, help="calls per micro-benchmark (200000)")
    parser.add_argument(
        "--redis",
        action="store_true",
        help="limits in Redis: REDIS_URL if set, else a private redis-server",
    )
    parser.add_argument("--workers", type=int, default=1, help="proxy workers (>1 needs Redis)")
    parser.add_argument(
        "--upstream",
        choices=("demo", "nginx"),
        default="demo",
        help="what answers the model calls: the demo upstream, or nginx with fixed answers",
    )
    parser.add_argument(
        "--production",
        action="store_true",
        help="production mode: a throwaway PostgreSQL database and Redis limits;"
        " concurrency 64,256 unless given",
    )
    parser.add_argument(
        "--postgres",
        default="postgres://postgres@127.0.0.1:5432",
        help="the PostgreSQL server --production creates its database on",
    )
    parser.add_argument(
        "--load",
        choices=("wrk", "aiohttp"),
        default="wrk" if WRK else "aiohttp",
        help="the load generator: wrk if installed, else aiohttp in this process",
    )
    parser.add_argument("--duration", type=int, help="wrk: timed seconds per run (10)")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="taskset: the proxy's workers on cores of their own, the rest on the others",
    )
    parser.add_argument(
        "--proxy-cores", type=int, help="with --pin: cores for the proxy (default: --workers)"
    )
    parser.add_argument("--json", type=Path, help="also write the runs to this JSON file")
    args = parser.parse_args()
    if args.load == "wrk" and WRK is None:
        parser.error("wrk is not installed (apt-get install wrk)")
    if args.production:
        args.redis = True
        if "--concurrency" not in sys.argv:
            args.concurrency = [64, 256]
    quick = args.quick
    args.requests = args.requests or (600 if quick else 6000)
    args.stream_requests = args.stream_requests or (300 if quick else 3000)
    args.warmup = args.warmup if args.warmup is not None else (50 if quick else 200)
    args.iterations = args.iterations or (50_000 if quick else 200_000)
    args.duration = args.duration or (2 if quick else 10)
    if args.proxy_cores is not None and not args.pin:
        parser.error("--proxy-cores goes with --pin")
    args.layout = Layout.pinned(args.proxy_cores or args.workers) if args.pin else Layout()
    args.redis = args.redis or bool(os.environ.get("REDIS_URL"))
    if args.workers < 1 or (args.workers > 1 and not args.redis):
        parser.error("--workers above 1 shares limits through Redis: add --redis")
    return args


def print_header(args: argparse.Namespace, limits: str) -> None:
    print(
        f"Stagegate proxy overhead | Python {platform.python_version()}, uvloop"
        f" {uvloop.__version__}, aiohttp {aiohttp.__version__} | os.cpu_count() = {os.cpu_count()}"
    )
    print(
        f"NOTE: the load generator, the proxy ({args.workers} worker(s)) and the upstream"
        f" share these {os.cpu_count()} CPUs: via/direct understates throughput and +p50/+p99"
        " include waiting for a core; proxy us/req is the least disturbed overhead figure."
    )
    per_run = (
        f"requests per run: plain {args.requests}, stream {args.stream_requests}, warm-up"
        f" {args.warmup}"
        if args.load == "aiohttp"
        else f"per run: {args.duration} s after a {WRK_WARMUP_S} s warm-up"
    )
    print(
        f"limits: {limits} | {per_run} | body: chat, max_tokens {MAX_TOKENS}"
        f" | upstream: {args.upstream}"
    )
    if args.load == "wrk" or args.pin:
        load = "aiohttp in this process" if args.load == "aiohttp" else args.load_generator
        print(
            f"load generator: {load}, one thread, a connection per concurrent caller"
            f" | pinned: {args.layout.describe(args.workers)}"
        )


def write_json(
    path: Path, args: argparse.Namespace, runs: list[Run], meta: dict[str, object]
) -> None:
    """The runs and how they were measured, for bench/modes.py."""
    cores = {"proxy": list(args.layout.proxy), "rest": list(args.layout.rest)}
    document = {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "root": str(ROOT),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_generator": args.load_generator,
        "seconds_per_run" if args.load == "wrk" else "requests_per_run": (
            args.duration if args.load == "wrk" else args.requests
        ),
        "pinned": cores if args.pin else None,
        "pinning": args.layout.describe(args.workers),
        "upstream": args.upstream,
        **meta,
        "runs": [{**run.record(), **{k: meta[k] for k in RUN_META}} for run in runs],
    }
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))


RUN_META = ("workers", "limiter", "db_mode")


def main() -> None:
    args = parse_args()
    args.load_generator = (
        wrk_version() if args.load == "wrk" else f"aiohttp {aiohttp.__version__} (uvloop)"
    )
    with contextlib.ExitStack() as stack:
        database_url = (
            stack.enter_context(throwaway_database(args.postgres)) if args.production else None
        )
        run(args, database_url)


def run(args: argparse.Namespace, database_url: str | None) -> None:
    started = time.perf_counter()
    meta: dict[str, object] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg_before": os.getloadavg(),
    }
    var_dir = args.var_dir = tempfile.mkdtemp(prefix="stagegate-bench-proxy-")
    rest = args.layout.prefix(args.layout.rest)
    if args.layout.rest:
        os.sched_setaffinity(0, set(args.layout.rest))  # the load generator, the usage polls
    servers: list[Server] = []
    try:
        redis_url = os.environ.get("REDIS_URL") if args.redis else None
        if args.redis and not redis_url:
            redis_server, redis_url = start_redis(var_dir, rest)
            servers.append(redis_server)
        configure(var_dir, redis_url, database_url)
        import django

        django.setup()
        from django.conf import settings

        limits = (
            f"Redis ({redis_url}, pool of {settings.STAGEGATE_REDIS_MAX_CONNECTIONS} per worker)"
            if redis_url
            else "in process (LocalLimiter)"
        )
        mode = "production (PostgreSQL)" if database_url else "embedded (SQLite)"
        print_header(args, f"{limits} | mode: {mode}")
        meta.update(
            workers=args.workers,
            limiter="redis" if redis_url else "in-process",
            db_mode="production" if database_url else "embedded",
        )

        start = start_nginx_upstream if args.upstream == "nginx" else start_upstream
        upstream, upstream_base = start(var_dir, rest)
        servers.append(upstream)
        raw_key = seed(f"{upstream_base}/v1")
        proxy, proxy_base = start_proxy(var_dir, args.workers, args.layout)
        servers.append(proxy)
        targets = [
            Target(
                "direct",
                f"{upstream_base}/v1/chat/completions",
                UPSTREAM_MODEL,
                {},
                upstream,
                f"{upstream_base}/stream/v1/chat/completions" if args.upstream == "nginx" else None,
            ),
            Target(
                "stagegate",
                f"{proxy_base}/v1/chat/completions",
                RELEASE,
                {"authorization": f"Bearer {raw_key}"},
                proxy,
            ),
        ]
        print(f"ready in {time.perf_counter() - started:.1f} s; running:", flush=True)
        runs = uvloop.run(run_load(args, targets, Servers(proxy, upstream), upstream_base))
        for server in reversed(servers):
            server.stop(15)  # uvicorn shuts down; usage is flushed
        meta["loadavg_after"] = os.getloadavg()
        if args.json:
            write_json(args.json, args, runs, meta)
        print()
        print_runs(runs)
        print_ratios(runs)
        if args.json:
            print(f"\nruns written to {args.json}")
        micro(args.iterations)
    finally:
        for server in reversed(servers):
            server.stop(15)  # uvicorn shuts down; usage is flushed
        if database_url:
            from django.db import connections

            connections.close_all()  # before the database is dropped
        shutil.rmtree(var_dir, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
