"""Gateway mode: nginx auth_request -> Stagegate /authz, against plain nginx proxying.

What is measured
  One run sets up a throwaway embedded Stagegate as bench/proxy.py does (SQLite in a
  temporary STAGEGATE_VAR_DIR, in-process limits; the example plan with its limits out
  of reach, northwind-research and its key) and starts, each on a free port:

    upstream   nginx answering a fixed chat completion (bench/proxy.py --upstream nginx)
    stagegate  python -m stagegate.serve, one worker (uvicorn + uvloop + httptools)
    gateway    a second nginx (one worker) with two server blocks:
                 gated  docs/examples/nginx.conf itself, as tests/test_gateways.py runs
                        it: only its two upstream addresses, its listen port and its log
                        path replaced. Every request is a subrequest to /authz first
                 plain  the same location /atlas-2/v1/ proxying to the same upstream
                        with the same proxy settings, without auth_request

  A load generator sends POST /atlas-2/v1/chat/completions (model atlas-2, max_tokens
  16, the key as Bearer) to both, back to back at each concurrency: wrk if installed
  (one thread, a fixed duration), else this repository's closed-loop aiohttp loadgen
  (a fixed number of requests). Every answer must be a 200: wrk's non-2xx count and
  socket errors, or the loadgen's failures, are printed as errors.

How to read the output
  req/s          completed requests / wall time
  p50, p99       latency in ms (wrk's, or the loadgen's from send to last body byte)
  gw us/req      CPU (utime + stime from /proc) of the gateway nginx per request
  sg us/req      the same for Stagegate (its /authz answers); 0 for plain
  up us/req      the same for the upstream nginx
  x plain        gated per request, as a ratio to plain at the same concurrency:
                 wall time (plain req/s / gated req/s) and CPU ((gw + sg) / gw of
                 plain). The goal: within 2x of plain nginx

  The load generator, both nginx and Stagegate share this machine's cores (the header
  says how many), so req/s is a system figure; the CPU columns are each process's own
  cost per request.

Usage: python bench/gateway.py [--quick] [--seconds 8] [--requests 6000]
                               [--concurrency 1,16,64] [--loadgen wrk|aiohttp]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import uvloop
from loadgen import Server, client_session, drive, free_port, tree_cpu_seconds
from proxy import (
    MAX_TOKENS,
    MESSAGES,
    RELEASE,
    configure,
    nginx_command,
    seed,
    start_nginx_upstream,
    start_proxy,
    wrk_ms,
)

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "docs" / "examples" / "nginx.conf"
PATH = "/atlas-2/v1/chat/completions"
WRK = shutil.which("wrk")

MAIN_CONF = """\
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
    include {dir}/stagegate.conf;
    server {{
        listen 127.0.0.1:{plain_port};
        location /atlas-2/v1/ {{
            proxy_pass http://atlas_2/v1/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "";
            proxy_set_header X-Api-Key "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def render(*, stagegate: str, upstream: str, listen: str, access_log: Path) -> str:
    """docs/examples/nginx.conf with its addresses and log path replaced (as the test does)."""
    text = CONFIG.read_text()
    for documented, ours in {
        "server 127.0.0.1:8000;": f"server {stagegate};",
        "server 127.0.0.1:8001;": f"server {upstream};",
        "listen 8080;": f"listen {listen};",
        "/var/log/nginx/stagegate.log": str(access_log),
    }.items():
        if text.count(documented) != 1:
            raise SystemExit(f"{CONFIG.name} no longer says {documented!r} once")
        text = text.replace(documented, ours)
    return text


def start_gateway(log_dir: str, *, stagegate: str, upstream: str) -> tuple[Server, str, str]:
    """The gateway nginx; its gated and plain base URLs."""
    conf_dir = Path(log_dir) / "nginx-gateway"
    conf_dir.mkdir()
    conf_dir.chmod(0o755)  # a root master runs its worker as nobody
    gated, plain = free_port(), free_port()
    site = render(
        stagegate=stagegate,
        upstream=upstream,
        listen=f"127.0.0.1:{gated}",
        # One line per gated request is part of the documented setup's cost.
        access_log=conf_dir / "access.log",
    )
    (conf_dir / "stagegate.conf").write_text(site)
    (conf_dir / "nginx.conf").write_text(MAIN_CONF.format(dir=conf_dir, plain_port=plain))
    server = Server("nginx-gateway", nginx_command(conf_dir), log_dir)
    import socket

    def listening() -> bool:
        with socket.create_connection(("127.0.0.1", plain), timeout=1):
            return True

    server.wait_ready(listening, 15)
    return server, f"http://127.0.0.1:{gated}", f"http://127.0.0.1:{plain}"


# --------------------------------------------------------------------------- load

BODY = orjson.dumps(
    {"model": RELEASE, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "stream": False}
)


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


def wrk_script(directory: str, raw_key: str) -> Path:
    script = Path(directory) / "post.lua"
    body = BODY.decode().replace("\\", "\\\\").replace('"', '\\"')
    script.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = "{body}"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {raw_key}"\n'
    )
    return script


def run_wrk(url: str, concurrency: int, seconds: float, script: Path) -> Result:
    out = subprocess.run(
        [WRK, "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # "     99%    1.02s ": wrk pads a one-letter unit with a space
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.MULTILINE))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    errors = int(non_2xx.group(1)) if non_2xx else 0
    errors += sum(map(int, socket_errors.groups())) if socket_errors else 0
    return Result(
        float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        wrk_ms(percentiles["50"]),
        wrk_ms(percentiles["99"]),
        requests,
        errors,
    )


def run_aiohttp(url: str, concurrency: int, n: int, raw_key: str) -> Result:
    headers = {"content-type": "application/json", "authorization": f"Bearer {raw_key}"}

    async def load():
        session = client_session(concurrency)

        async def request() -> bool:
            async with session.post(url, data=BODY, headers=headers) as response:
                body = await response.read()
                return response.status == 200 and body.startswith(b"{")

        try:
            await drive(request, max(100, 2 * concurrency), concurrency)  # warm-up
            return await drive(request, n, concurrency)
        finally:
            await session.close()

    result = uvloop.run(load())
    return Result(
        result.rps,
        result.percentile_ms(50),
        result.percentile_ms(99),
        result.requests,
        result.results.count(False),
    )


@dataclass
class Row:
    target: str
    concurrency: int
    result: Result
    cpu_us: dict[str, float]  # per request, by process


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (about 20 s)")
    parser.add_argument("--seconds", type=float, help="wrk: seconds per run (8)")
    parser.add_argument("--requests", type=int, help="aiohttp: requests per run (6000)")
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 16, 64],
        help="comma-separated levels (default 1,16,64)",
    )
    parser.add_argument(
        "--loadgen",
        choices=("wrk", "aiohttp"),
        default="wrk" if WRK else "aiohttp",
        help="wrk if installed, else aiohttp",
    )
    args = parser.parse_args()
    args.seconds = args.seconds or (2.0 if args.quick else 8.0)
    args.requests = args.requests or (1000 if args.quick else 6000)
    if args.loadgen == "wrk" and WRK is None:
        parser.error("wrk is not installed (apt-get install wrk)")
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    var_dir = tempfile.mkdtemp(prefix="stagegate-bench-gateway-")
    servers: list[Server] = []
    try:
        configure(var_dir, None)
        import django

        django.setup()
        upstream, upstream_base = start_nginx_upstream(var_dir)
        servers.append(upstream)
        raw_key = seed(f"{upstream_base}/v1")
        stagegate, stagegate_base = start_proxy(var_dir, 1)
        servers.append(stagegate)
        gateway, gated_base, plain_base = start_gateway(
            var_dir,
            stagegate=stagegate_base.removeprefix("http://"),
            upstream=upstream_base.removeprefix("http://"),
        )
        servers.append(gateway)
        script = wrk_script(var_dir, raw_key)
        print(
            f"Gateway mode, POST {PATH} | Python {platform.python_version()} | load: {args.loadgen}"
            f" | os.cpu_count() = {os.cpu_count()}"
        )
        print(
            f"NOTE: the load generator, two nginx and Stagegate share these {os.cpu_count()}"
            " CPUs: req/s is a system figure; the us/req columns are each process's own cost."
        )
        print(f"ready in {time.perf_counter() - started:.1f} s", flush=True)
        processes = {"gw": gateway, "sg": stagegate, "up": upstream}
        rows: list[Row] = []
        for concurrency in args.concurrency:
            # Plain and gated back to back, so both see the same machine state.
            for target, base in (("plain", plain_base), ("gated", gated_base)):
                url = f"{base}{PATH}"
                if args.loadgen == "wrk":
                    run_wrk(url, concurrency, min(1.0, args.seconds), script)  # warm-up
                before = {name: tree_cpu_seconds(s.pid) for name, s in processes.items()}
                if args.loadgen == "wrk":
                    result = run_wrk(url, concurrency, args.seconds, script)
                else:
                    result = run_aiohttp(url, concurrency, args.requests, raw_key)
                cpu_us = {
                    name: 1e6 * (tree_cpu_seconds(s.pid) - before[name]) / result.requests
                    for name, s in processes.items()
                }
                rows.append(Row(target, concurrency, result, cpu_us))
                print(f"  {target:<6}c={concurrency:<4}{result.rps:>9,.0f} req/s", flush=True)
        print_rows(rows)
    finally:
        for server in reversed(servers):
            server.stop(15)
        shutil.rmtree(var_dir, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - started:.1f} s")


def print_rows(rows: list[Row]) -> None:
    print()
    print(
        f"{'target':<8}{'conc':>5}{'requests':>9}{'errors':>7}{'req/s':>9}{'p50 ms':>9}"
        f"{'p99 ms':>9}{'gw us/req':>11}{'sg us/req':>11}{'up us/req':>11}"
        f"{'x plain wall':>14}{'x plain cpu':>13}"
    )
    plain = {row.concurrency: row for row in rows if row.target == "plain"}
    for row in rows:
        base = plain[row.concurrency]
        result, cpu = row.result, row.cpu_us
        wall_ratio = base.result.rps / result.rps
        cpu_ratio = (cpu["gw"] + cpu["sg"]) / (base.cpu_us["gw"] + base.cpu_us["sg"])
        print(
            f"{row.target:<8}{row.concurrency:>5}{result.requests:>9}{result.errors:>7}"
            f"{result.rps:>9,.0f}{result.p50_ms:>9.2f}{result.p99_ms:>9.2f}"
            f"{cpu['gw']:>11.1f}{cpu['sg']:>11.1f}{cpu['up']:>11.1f}"
            f"{wall_ratio:>14.2f}{cpu_ratio:>13.2f}"
        )


if __name__ == "__main__":
    sys.exit(main())
