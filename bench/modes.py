"""Production mode against embedded, and one worker against two: bench/proxy.py, repeated.

What is measured
  bench/proxy.py configures Django once per process, so it measures one configuration
  per invocation. This script runs it as a subprocess, again and again, always with
  the nginx upstream (--upstream nginx: the upstream costs a few µs a request) and
  --json, and combines what the invocations wrote:

    modes      for --rounds N rounds (default 3): embedded (SQLite, in-process limits)
               then production (--production: a throwaway PostgreSQL database, limits
               in a private redis-server, quota leases), one worker each
    --scaling  then, for the same rounds, production mode with one worker on one core,
               two workers on two cores, and two workers on one core (--proxy-cores 1)

  Each invocation: --load wrk (one thread; --load aiohttp if wrk is absent), --pin
  (unless --no-pin: on 2 cores the proxy's worker on core 1; wrk, nginx and Redis on
  core 0), --duration seconds per timed run after a 1 s warm-up, plain and stream at
  each --concurrency, Stagegate and nginx direct back to back. Alternating the
  configurations within a round spreads the machine's changing load over all of them.
  REDIS_URL is unset for the subprocesses, so every production run has its own Redis.

How to read the output
  Every figure is the median over the rounds of that configuration (n says how many
  invocations succeeded). The machine is shared with other engineers' runs: the load
  average is printed before and after, and per invocation.

  req/s          Stagegate's completed requests / wall time of a timed run
  proxy us/req   CPU time (utime + stime, all threads, from /proc) of the proxy's
                 processes in the timed run, per request
  cores busy     the proxy's CPU seconds per wall second: 1.0 is one core fully busy
  +p50 +p99      Stagegate's latency percentile minus nginx direct's, same invocation
  +p99.9         the same at the 99.9th percentile (wrk's latency:percentile(99.9))
  prod/emb       production's median as a ratio to embedded's: req/s (goal >= 0.90) and
                 CPU per request; "per round" gives the range of the ratio within rounds
  2w/1w req/s    two workers on two cores against one worker on one core (goal >= 1.8)
  capacity       2 x (us/req, one worker) / (us/req, two workers): what two workers
                 with a core each would serve against one, from CPU per request alone
                 (the ratio of req/s per busy core, so the share of the cores each
                 configuration got on a shared machine drops out)

Usage: python bench/modes.py [--rounds 3] [--concurrency 1,16] [--duration 10]
                             [--scaling [--scaling-concurrency 16,64]]
                             [--load wrk|aiohttp] [--no-pin] [--out DIR] [--label TEXT]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROXY = HERE / "proxy.py"
WRK = shutil.which("wrk")


@dataclass(frozen=True)
class Config:
    """One configuration of bench/proxy.py: a name for the tables, and its flags."""

    name: str
    flags: tuple[str, ...]


EMBEDDED = Config("embedded", ())
PRODUCTION = Config("production", ("--production",))
SCALING = (
    Config("1 worker, 1 core", ("--production", "--workers", "1")),
    Config("2 workers, 2 cores", ("--production", "--workers", "2")),
    Config("2 workers, 1 core", ("--production", "--workers", "2", "--proxy-cores", "1")),
)


# --------------------------------------------------------------------------- running


def invoke(config: Config, round_: int, concurrency: str, args: argparse.Namespace) -> dict | None:
    """One bench/proxy.py run; what it wrote to --json, or None if it failed."""
    stem = f"{config.name.replace(' ', '').replace(',', '-')}-r{round_}"
    json_path, log_path = args.out / f"{stem}.json", args.out / f"{stem}.txt"
    command = [
        sys.executable,
        str(PROXY),
        "--upstream",
        "nginx",
        "--load",
        args.load,
        "--duration",
        str(args.duration),
        "--concurrency",
        concurrency,
        "--iterations",
        "20000",  # the micro-benchmarks at the end: not what this script reads
        "--postgres",
        args.postgres,
        "--json",
        str(json_path),
        *(() if args.no_pin else ("--pin",)),
        *config.flags,
    ]
    env = {key: value for key, value in os.environ.items() if key != "REDIS_URL"}
    started = time.monotonic()
    with log_path.open("w") as log:
        code = subprocess.run(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False
        ).returncode
    took = time.monotonic() - started
    if code != 0 or not json_path.exists():
        tail = log_path.read_text(errors="replace")[-1500:]
        print(f"  round {round_} {config.name}: FAILED (exit {code}, {took:.0f} s):\n{tail}")
        return None
    document = orjson.loads(json_path.read_bytes())
    errors = sum(run["errors"] for run in document["runs"])
    before, after = document["loadavg_before"][0], document["loadavg_after"][0]
    print(
        f"  round {round_} {config.name:<20} {took:4.0f} s, {errors} errors,"
        f" load average {before:.2f} -> {after:.2f}",
        flush=True,
    )
    return document


def rounds(configs: tuple[Config, ...], concurrency: str, args: argparse.Namespace) -> Results:
    """``args.rounds`` rounds, each running every configuration once, in order."""
    results = Results()
    for round_ in range(1, args.rounds + 1):
        for config in configs:
            document = invoke(config, round_, concurrency, args)
            if document is not None:
                results.add(config.name, round_, document)
    return results


# --------------------------------------------------------------------------- combining

Key = tuple[str, str, int]  # (configuration, plain|stream, concurrency)


@dataclass
class Figures:
    """One invocation's Stagegate row at one (mode, concurrency), with direct's beside it."""

    round_: int
    rps: float
    us_per_request: float
    cores_busy: float
    added: dict[str, float]  # p50_ms, p99_ms, p99.9_ms: Stagegate minus direct
    errors: int


class Results:
    """Figures by (configuration, mode, concurrency), one per successful invocation."""

    PERCENTILES = ("p50_ms", "p99_ms", "p99.9_ms")

    def __init__(self) -> None:
        self.figures: dict[Key, list[Figures]] = defaultdict(list)
        self.documents: list[tuple[str, int, dict]] = []

    def add(self, config: str, round_: int, document: dict) -> None:
        self.documents.append((config, round_, document))
        runs = document["runs"]
        direct = {(r["mode"], r["concurrency"]): r for r in runs if r["target"] == "direct"}
        for run in runs:
            if run["target"] != "stagegate":
                continue
            base = direct[(run["mode"], run["concurrency"])]
            self.figures[(config, run["mode"], run["concurrency"])].append(
                Figures(
                    round_,
                    run["rps"],
                    run["proxy_us_per_request"],
                    run["proxy_cpu_s"] / run["wall_s"],
                    {p: run[p] - base[p] for p in self.PERCENTILES},
                    run["errors"] + base["errors"],
                )
            )

    def keys(self, config: str) -> list[tuple[str, int]]:
        return sorted({(mode, conc) for c, mode, conc in self.figures if c == config})

    def median(self, key: Key, field: str) -> float:
        return statistics.median(figure_value(f, field) for f in self.figures[key])

    def ratio(self, top: Key, bottom: Key, field: str) -> tuple[float, float, float]:
        """Median of ``top`` / median of ``bottom``, and the range of the same ratio
        within rounds (pairs of the same round only)."""
        pairs = {f.round_: f for f in self.figures[bottom]}
        within = [
            figure_value(f, field) / figure_value(pairs[f.round_], field)
            for f in self.figures[top]
            if f.round_ in pairs
        ]
        overall = self.median(top, field) / self.median(bottom, field)
        return overall, min(within, default=float("nan")), max(within, default=float("nan"))


def figure_value(figures: Figures, field: str) -> float:
    return figures.added[field] if field in figures.added else getattr(figures, field)


# --------------------------------------------------------------------------- printing


def print_table(results: Results, configs: tuple[Config, ...]) -> None:
    print(
        f"{'configuration':<20}{'mode':<8}{'conc':>5}{'n':>3}{'req/s':>9}{'proxy us/req':>14}"
        f"{'cores busy':>12}{'+p50 ms':>9}{'+p99 ms':>9}{'+p99.9 ms':>11}{'errors':>8}"
    )
    for config in configs:
        for mode, conc in results.keys(config.name):
            key = (config.name, mode, conc)
            print(
                f"{config.name:<20}{mode:<8}{conc:>5}{len(results.figures[key]):>3}"
                f"{results.median(key, 'rps'):>9,.0f}"
                f"{results.median(key, 'us_per_request'):>14,.0f}"
                f"{results.median(key, 'cores_busy'):>12.2f}"
                f"{results.median(key, 'p50_ms'):>9.2f}{results.median(key, 'p99_ms'):>9.2f}"
                f"{results.median(key, 'p99.9_ms'):>11.2f}"
                f"{sum(f.errors for f in results.figures[key]):>8}"
            )


def print_modes(results: Results) -> None:
    print()
    print(
        "Stagegate, one worker, per (database mode, mode, concurrency): medians over the"
        " rounds; +pXX = Stagegate's percentile minus nginx direct's in the same invocation"
    )
    print_table(results, (EMBEDDED, PRODUCTION))
    print()
    print(
        "production / embedded, per (mode, concurrency): ratio of the medians, and in"
        " brackets the lowest and highest ratio within one round (same round's pair)"
    )
    print(f"{'mode':<8}{'conc':>5}{'req/s prod/emb':>26}{'CPU/req prod/emb':>28}")
    for mode, conc in results.keys(EMBEDDED.name):
        emb, prod = (EMBEDDED.name, mode, conc), (PRODUCTION.name, mode, conc)
        if prod not in results.figures:
            continue
        rps = results.ratio(prod, emb, "rps")
        cpu = results.ratio(prod, emb, "us_per_request")
        print(
            f"{mode:<8}{conc:>5}{rps[0]:>14.2f} ({rps[1]:.2f}-{rps[2]:.2f})"
            f"{cpu[0]:>16.2f} ({cpu[1]:.2f}-{cpu[2]:.2f})"
        )
    print(
        "  goal (a): production req/s >= 0.90 x embedded. goal (b): +p99 <= 1 ms at"
        " concurrency 1 and <= 10 ms at 16 (the table above)."
    )


def print_scaling(results: Results) -> None:
    one, two, packed = (config.name for config in SCALING)
    print()
    print(
        "Scaling, production mode (PostgreSQL, Redis leases): medians over the rounds;"
        " with --pin on 2 cores, '1 worker, 1 core' has core 1 to itself, '2 workers,"
        " 2 cores' has one worker on each core, the one on core 0 beside wrk, nginx and"
        " Redis, and '2 workers, 1 core' puts both on core 1"
    )
    print_table(results, SCALING)
    print()
    print(
        "ratios per (mode, concurrency), medians (in brackets: lowest-highest within a"
        " round); capacity = 2 x (us/req, 1 worker) / (us/req, 2 workers)"
    )
    print(
        f"{'mode':<8}{'conc':>5}{'2w/1w req/s':>24}{'capacity':>22}"
        f"{'2w on 1 core / 1w req/s':>30}{'CPU/req':>20}"
    )
    for mode, conc in results.keys(one):
        keys = {name: (name, mode, conc) for name in (one, two, packed)}
        if any(key not in results.figures for key in keys.values()):
            continue
        rps = results.ratio(keys[two], keys[one], "rps")
        us = results.ratio(keys[one], keys[two], "us_per_request")
        packed_rps = results.ratio(keys[packed], keys[one], "rps")
        packed_us = results.ratio(keys[packed], keys[one], "us_per_request")
        print(
            f"{mode:<8}{conc:>5}{rps[0]:>12.2f} ({rps[1]:.2f}-{rps[2]:.2f})"
            f"{2 * us[0]:>10.2f} ({2 * us[1]:.2f}-{2 * us[2]:.2f})"
            f"{packed_rps[0]:>18.2f} ({packed_rps[1]:.2f}-{packed_rps[2]:.2f})"
            f"{packed_us[0]:>8.2f} ({packed_us[1]:.2f}-{packed_us[2]:.2f})"
        )
    print(
        "  2w/1w req/s is limited by how much CPU each configuration got (cores busy): the"
        " second worker's core also runs wrk, nginx and Redis, which holds two workers back,"
        " and other processes on a shared machine take from either. capacity is req/s per"
        " busy core, so it leaves out how busy the cores were; it is limited by what CPU"
        " per request leaves out: it assumes each worker a core of its own and no shared"
        " bottleneck beyond what us/req includes (Redis, PostgreSQL and the kernel's loopback"
        " run outside the proxy's processes). goal (c): >= 1.8."
    )
    print(
        "  2w on 1 core: two workers sharing one core, against one worker on it: what a"
        " second worker per core adds (req/s) and costs (CPU per request)."
    )


def print_invocations(results: Results) -> None:
    print()
    print("invocations (load average from os.getloadavg(), 1-minute, before -> after):")
    for config, round_, document in results.documents:
        before, after = document["loadavg_before"][0], document["loadavg_after"][0]
        print(
            f"  round {round_} {config:<20} started {document['started_at']},"
            f" load average {before:.2f} -> {after:.2f}"
        )


def tree_description(label: str | None) -> str:
    if label:
        return label
    found = subprocess.run(
        ["git", "-C", str(ROOT), "log", "-1", "--format=%h %cd", "--date=short"],
        capture_output=True,
        text=True,
        check=False,
    )
    return f"commit {found.stdout.strip()}" if found.returncode == 0 else "not a git checkout"


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each configuration (3)")
    parser.add_argument("--concurrency", default="1,16", help="embedded/production (1,16)")
    parser.add_argument(
        "--scaling", action="store_true", help="also production mode with 1 and 2 workers"
    )
    parser.add_argument("--scaling-concurrency", default="16,64", help="scaling runs (16,64)")
    parser.add_argument("--duration", type=int, default=10, help="timed seconds per run (10)")
    parser.add_argument(
        "--load",
        choices=("wrk", "aiohttp"),
        default="wrk" if WRK else "aiohttp",
        help="bench/proxy.py's load generator: wrk if installed, else aiohttp",
    )
    parser.add_argument("--no-pin", action="store_true", help="leave the cores to the kernel")
    parser.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432")
    parser.add_argument("--out", type=Path, help="where each invocation's output and JSON go")
    parser.add_argument("--label", help="what the tree is, for the header (default: git log)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.out = args.out or Path(tempfile.mkdtemp(prefix="stagegate-bench-modes-"))
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def main() -> None:
    args = parse_args()
    started = time.monotonic()
    pinning = (
        "not pinned"
        if args.no_pin
        else "--pin: the proxy's worker(s) on core(s) of their own, wrk, nginx and Redis on"
        " the other (on 2 cores: proxy on core 1, the rest on core 0)"
    )
    print(
        f"bench/modes.py | {ROOT} at {tree_description(args.label)} | Python"
        f" {platform.python_version()} | os.cpu_count() = {os.cpu_count()}"
        f" | {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )
    print(
        f"each figure from bench/proxy.py --upstream nginx --load {args.load} --duration"
        f" {args.duration} (after a 1 s warm-up) --json, {pinning};"
        f" {args.rounds} round(s), configurations alternating within each round"
    )
    print(f"outputs and JSON of every invocation: {args.out}")
    print(f"load average before (os.getloadavg()): {os.getloadavg()}", flush=True)
    modes = rounds((EMBEDDED, PRODUCTION), args.concurrency, args)
    scaling = rounds(SCALING, args.scaling_concurrency, args) if args.scaling else None
    print(f"load average after (os.getloadavg()): {os.getloadavg()}")
    print_modes(modes)
    if scaling is not None:
        print_scaling(scaling)
    print_invocations(modes)
    if scaling is not None:
        print_invocations(scaling)
    print(f"\ntotal {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
