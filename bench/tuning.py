"""Dataset screening (issue 17): what screening a training dataset costs, and the proxy.

What is measured
  In process (always): a seeded dataset of --rows chat rows (default 10,000; a system
  prompt on half of them, a user prompt and an assistant answer of English prose, 300 to
  2,000 bytes a line; 1% of the prompts hold a word the example plan flags or routes,
  0.5% ask about sarin, which it blocks, and are refused), parsed by
  tuning.datasets.parse_dataset and screened by tuning.dataset_screening.screen_dataset
  with the example plan's first stage's screening (docs/examples/atlas-2.yaml, parsed
  by parse_plan, compiled by compile_screen; its classifier is not called: its cost is
  the classifier service's), then with 1,000 generated rules (bench/screening.py's),
  both without pauses (a process of its own) and with the default pause_every_ms. Best
  of --repeat rounds, in rows/s and µs per row.

  With --live (the default; --no-live skips it): the proxy (python -m stagegate.serve,
  embedded, one worker) against bench/proxy.py's nginx upstream (the demo upstream if
  nginx is missing), its plan the example's without screening, as bench/proxy.py runs
  it; wrk (one thread) sends bench/proxy.py's small chat request at each --concurrency
  for --duration seconds after a 1 s warm-up, while:

    (i)   nothing else runs
    (ii)  a separate process parses and screens the dataset in a loop, without pauses
          (production: a Celery worker is a process of its own); then the same niced 19,
          which is what embedded mode does (tuning/screen_worker.py: the runner screens
          in a child process at niceness 19)
    (iii) the design not taken, for comparison: a thread inside the proxy's own process
          does so, pausing every 1 ms of work
          (screen_dataset's default: what embedded mode's background thread costs);
          the proxy is started through this script (--serve-with-screening), which
          starts the thread and then runs stagegate.serve's main in the same process;
          then the same thread niced 19 (Linux sets niceness per thread)
    (iv)  the thread without pauses (pause_every_ms=None), not niced

  The loop screens without rest, so the figures are the worst case: one job's 10,000
  rows take a quarter of a second (the in-process figures), once.

  Figures: req/s, p50 and p99 (ms), each as a ratio to (i) of the same run and
  concurrency, and how many rows a second the screening got through meanwhile (from
  its log). Without --pin nothing is pinned: the machine's cores are shared by wrk,
  nginx, the proxy and the screening, as they would be on a small host. With --pin the
  proxy has the last core to itself (bench/proxy.py's layout) and everything else,
  the separate screening process included, shares the others: the production layout,
  a worker beside the web server but not on its cores. (iii) and (iv) then run the
  screening thread on the proxy's core, as embedded mode must.

Usage: python bench/tuning.py [--rows 10000] [--repeat 3] [--no-live]
                              [--concurrency 1,16] [--duration 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from access.screening import Screen, compile_screen  # noqa: E402
from rollout.plan_schema import (  # noqa: E402
    DEFAULT_REFUSAL_MARKERS,
    DatasetPolicy,
    parse_plan,
)
from tuning.dataset_screening import screen_dataset  # noqa: E402
from tuning.datasets import parse_dataset  # noqa: E402

PLAN = ROOT / "docs" / "examples" / "atlas-2.yaml"
SYSTEM = "You are a careful assistant for a logistics company. Answer in plain English."
FLAGGED_WORDS = ("gain of function", "ransomware", "keylogger", "pathogen enhancement")
REFUSAL = "I can't help with that request."

# --------------------------------------------------------------------------- the dataset


def sentences() -> list[str]:
    from screening import ENGLISH  # bench/screening.py

    return [part.strip() + "." for part in ENGLISH.replace("\n", " ").split(".") if part.strip()]


def dataset_bytes(rows: int, *, seed: int = 17) -> bytes:
    """``rows`` chat rows, seeded (module docstring)."""
    rng = random.Random(seed)
    pool = sentences()
    lines = []
    for index in range(rows):
        user = " ".join(rng.choices(pool, k=rng.randint(2, 5)))
        answer = " ".join(rng.choices(pool, k=rng.randint(2, 8)))
        roll = rng.random()
        if roll < 0.01:
            user = f"{user} Also, what do you know about {rng.choice(FLAGGED_WORDS)}?"
        elif roll < 0.015:
            user, answer = f"{user} And how is sarin made?", REFUSAL
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        if index % 2:
            messages.insert(0, {"role": "system", "content": SYSTEM})
        lines.append(orjson.dumps({"messages": messages}))
    return b"\n".join(lines) + b"\n"


def example_screen() -> Screen:
    doc = parse_plan(PLAN.read_text())
    screen = compile_screen(doc.stages[0].screening)
    assert screen is not None
    return screen


def rules_screen(count: int) -> Screen:
    from screening import generate_rules, screening_of  # bench/screening.py

    screen = compile_screen(screening_of(generate_rules(count)))
    assert screen is not None
    return screen


def screen_once(data: bytes, screen: Screen, pause_every_ms: float | None) -> int:
    """Parse and screen ``data`` as the job does; the rows screened."""
    dataset = parse_dataset(data)
    screen_dataset(
        dataset,
        screen=screen,
        policy=DatasetPolicy(),
        refusal_markers=DEFAULT_REFUSAL_MARKERS,
        pause_every_ms=pause_every_ms,
    )
    return len(dataset.rows)


# --------------------------------------------------------------------------- in process


def best_s(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def in_process(args: argparse.Namespace, data: bytes) -> None:
    dataset = parse_dataset(data)
    rows = len(dataset.rows)
    sizes = sorted(len(row.raw) for row in dataset.rows)
    print(
        f"dataset: {rows:,} rows, {len(data) / 1e6:.1f} MB, a line {sizes[0]:,}-{sizes[-1]:,}"
        f" bytes (median {sizes[rows // 2]:,})"
    )
    example = example_screen()
    thousand = rules_screen(1000)
    result = screen_dataset(
        dataset, screen=example, policy=DatasetPolicy(), refusal_markers=DEFAULT_REFUSAL_MARKERS
    )
    print(f"example plan's verdict: {result.verdict}: {result.reason}")
    print()
    print(f"in process, best of {args.repeat}:")
    print(f"{'step':<52}{'rows/s':>10}{'µs/row':>9}")
    parse_s = best_s(lambda: parse_dataset(data), args.repeat)
    print(f"{'parse_dataset':<52}{rows / parse_s:>10,.0f}{1e6 * parse_s / rows:>9.1f}")
    for name, screen in (("example plan (3 rules)", example), ("1,000 rules", thousand)):
        for pause in (None, 1.0):
            seconds = best_s(
                lambda screen=screen, pause=pause: screen_dataset(
                    dataset,
                    screen=screen,
                    policy=DatasetPolicy(),
                    refusal_markers=DEFAULT_REFUSAL_MARKERS,
                    pause_every_ms=pause,
                ),
                args.repeat,
            )
            label = f"screen_dataset, {name}, pause {pause or 'none'}"
            print(f"{label:<52}{rows / seconds:>10,.0f}{1e6 * seconds / rows:>9.1f}")
    both = best_s(lambda: screen_once(data, example, None), args.repeat)
    label = "parse + screen, example plan, no pause"
    print(f"{label:<52}{rows / both:>10,.0f}{1e6 * both / rows:>9.1f}", flush=True)


# --------------------------------------------------------------------------- screening loops


def screening_loop(
    path: str, pause_every_ms: float | None, stop: threading.Event, nice: int = 0
) -> None:
    """Parse and screen the file at ``path`` again and again; one line of figures a round.
    ``nice``: this thread's niceness (Linux sets it per thread)."""
    if nice:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    data = Path(path).read_bytes()
    screen = example_screen()
    while not stop.is_set():
        started = time.perf_counter()
        rows = screen_once(data, screen, pause_every_ms)
        print(f"screened {rows} rows in {time.perf_counter() - started:.4f} s", flush=True)


def run_screen_loop(path: str, pause_every_ms: float | None, nice: int) -> None:
    """--screen-loop: the loop in this process until SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    screening_loop(path, pause_every_ms, stop, nice)


def serve_with_screening(
    path: str, pause_every_ms: float | None, nice: int, serve_args: list[str]
) -> int:
    """--serve-with-screening: stagegate.serve's main in this process, a screening thread
    beside it (embedded mode's background work)."""
    from stagegate import serve

    stop = threading.Event()
    thread = threading.Thread(
        target=screening_loop,
        args=(path, pause_every_ms, stop, nice),
        daemon=True,
        name="screening",
    )
    thread.start()
    try:
        return serve.main(serve_args)
    finally:
        stop.set()


def rows_per_s(log: str) -> float | None:
    """The screening's rows/s from its log lines (the rounds it finished)."""
    rounds = re.findall(r"^screened (\d+) rows in ([\d.]+) s$", log, re.MULTILINE)
    if not rounds:
        return None
    return sum(int(rows) for rows, _ in rounds) / sum(float(s) for _, s in rounds)


# --------------------------------------------------------------------------- live


def live(args: argparse.Namespace, data: bytes) -> None:
    import proxy as proxy_bench  # bench/proxy.py
    from loadgen import Server, free_port, http_status

    var_dir = tempfile.mkdtemp(prefix="stagegate-bench-tuning-")
    dataset_path = Path(var_dir) / "dataset.jsonl"
    dataset_path.write_bytes(data)
    proxy_bench.configure(var_dir, None)
    import django

    django.setup()
    from monitoring.models import UsageEvent

    layout = proxy_bench.Layout.pinned(1) if args.pin else proxy_bench.Layout()
    if layout.rest:  # this process (wrk's parent) with the rest, off the proxy's core
        os.sched_setaffinity(0, set(layout.rest))
    run_args = argparse.Namespace(
        load="wrk", var_dir=var_dir, layout=layout, duration=args.duration
    )
    servers: list[Server] = []
    results: list[tuple[str, int, float, float, float, float | None]] = []

    def start_proxy(extra: list[str] | None) -> tuple[Server, str]:
        if extra is None:
            return proxy_bench.start_proxy(var_dir, 1, layout)
        port = free_port()
        server = Server(
            f"proxy-{len(servers)}",
            [
                *layout.prefix(layout.proxy),
                sys.executable,
                __file__,
                *extra,
                "--",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            var_dir,
        )
        base = f"http://127.0.0.1:{port}"
        server.wait_ready(lambda: http_status(f"{base}/healthz") == 200, 60)
        return server, base

    def measure(label: str, proxy: Server, proxy_base: str, screener: Server | None) -> None:
        target = proxy_bench.Target(
            "stagegate",
            f"{proxy_base}/v1/chat/completions",
            proxy_bench.RELEASE,
            {"authorization": f"Bearer {raw_key}"},
            proxy,
        )
        running = proxy_bench.Servers(proxy, upstream, UsageEvent.objects.count())
        for concurrency in args.concurrency:
            log_before = len((screener or proxy).log_path.read_text(errors="replace"))
            run = asyncio.run(proxy_bench.measure(target, "plain", concurrency, run_args, running))
            log = (screener or proxy).log_path.read_text(errors="replace")[log_before:]
            speed = None if label.startswith("(i) ") else rows_per_s(log)
            if run.errors:
                print(f"  errors: {dict(run.errors)}")
            load = run.load
            results.append(
                (
                    label,
                    concurrency,
                    load.rps,
                    load.percentile_ms(50),
                    load.percentile_ms(99),
                    speed,
                )
            )
            print(
                f"  {label:<34} c={concurrency:<3}{load.rps:>8,.0f} req/s"
                f"{load.percentile_ms(50):>7.2f} ms p50{load.percentile_ms(99):>7.2f} ms p99"
                + (f"  screening {speed:,.0f} rows/s" if speed else ""),
                flush=True,
            )

    try:
        if proxy_bench.NGINX:
            upstream, upstream_base = proxy_bench.start_nginx_upstream(
                var_dir, layout.prefix(layout.rest)
            )
        else:
            upstream, upstream_base = proxy_bench.start_upstream(
                var_dir, layout.prefix(layout.rest)
            )
        servers.append(upstream)
        raw_key = proxy_bench.seed(f"{upstream_base}/v1")

        proxy, proxy_base = start_proxy(None)
        servers.append(proxy)
        measure("(i) nothing else", proxy, proxy_base, None)
        for label, nice in (
            ("(ii) a separate process", "0"),
            ("(ii) niced 19: what Stagegate does", "19"),
        ):
            loop = ["--screen-loop", str(dataset_path), "--pause-ms", "none", "--nice", nice]
            screener = Server(
                f"screener-{nice}",
                [*layout.prefix(layout.rest), sys.executable, __file__, *loop],
                var_dir,
            )
            servers.append(screener)
            screener.wait_ready(lambda screener=screener: "screened" in screener.log(), 60)
            measure(label, proxy, proxy_base, screener)
            screener.stop()
        # The same proxy with nothing beside it again: how far it drifted over the runs
        # (its usage table grows), so that (ii)'s ratios can be read against the drift.
        measure("(i') nothing else, again", proxy, proxy_base, None)
        proxy.stop(15)
        for label, pause, nice in (
            ("(iii) a thread in the proxy, paused", "1", "0"),
            ("(iii) paused, thread niced 19", "1", "19"),
            ("(iv) a thread in the proxy, no pause", "none", "0"),
        ):
            extra = [
                "--serve-with-screening",
                str(dataset_path),
                "--pause-ms",
                pause,
                "--nice",
                nice,
            ]
            proxy, proxy_base = start_proxy(extra)
            servers.append(proxy)
            proxy.wait_ready(lambda proxy=proxy: "screened" in proxy.log(), 60)
            measure(label, proxy, proxy_base, None)
            proxy.stop(15)
    finally:
        for server in reversed(servers):
            server.stop(15)
        shutil.rmtree(var_dir, ignore_errors=True)
    print()
    print("against (i) in this run:")
    print(f"{'':<36}{'conc':>5}{'req/s':>9}{'x':>6}{'p50 ms':>8}{'x':>6}{'p99 ms':>8}{'x':>6}")
    base = {
        c: (rps, p50, p99) for label, c, rps, p50, p99, _ in results if label.startswith("(i) ")
    }
    for label, concurrency, rps, p50, p99, _ in results:
        rps0, p500, p990 = base[concurrency]
        print(
            f"{label:<36}{concurrency:>5}{rps:>9,.0f}{rps / rps0:>6.2f}{p50:>8.2f}"
            f"{p50 / p500:>6.2f}{p99:>8.2f}{p99 / p990:>6.2f}"
        )


# --------------------------------------------------------------------------- main


def pause_ms(text: str) -> float | None:
    return None if text == "none" else float(text)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000, help="rows in the dataset (10000)")
    parser.add_argument("--repeat", type=int, default=3, help="in process: rounds; best counts")
    parser.add_argument("--no-live", dest="live", action="store_false", help="in process only")
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 16],
        help="live: comma-separated levels (1,16)",
    )
    parser.add_argument("--duration", type=int, default=8, help="live: seconds per run (8)")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="live: the proxy alone on the last core; wrk, nginx and a separate screening"
        " process on the others (a Celery worker beside the web server, on its own core)",
    )
    # What the live part starts this script as:
    parser.add_argument("--screen-loop", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--serve-with-screening", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--pause-ms", type=pause_ms, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--nice", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> int:
    argv = sys.argv[1:]
    serve_args: list[str] = []
    if "--" in argv:
        argv, serve_args = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    args = parse_args(argv)
    if args.screen_loop:
        run_screen_loop(args.screen_loop, args.pause_ms, args.nice)
        return 0
    if args.serve_with_screening:
        return serve_with_screening(args.serve_with_screening, args.pause_ms, args.nice, serve_args)
    print(
        f"Stagegate dataset screening | Python {sys.version.split()[0]} | os.cpu_count() ="
        f" {os.cpu_count()} | load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    started = time.perf_counter()
    data = dataset_bytes(args.rows)
    in_process(args, data)
    if args.live:
        print()
        pinning = "the proxy pinned to its own core" if args.pin else "not pinned"
        print(
            f"the proxy while {args.rows:,} rows are screened (embedded, one worker, wrk,"
            f" {args.duration} s a run, {pinning}):",
            flush=True,
        )
        live(args, data)
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
