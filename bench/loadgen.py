"""What the bench scripts share: subprocess servers, a closed-loop load generator, /proc CPU.

The scripts run as ``python bench/X.py``, so this directory is on sys.path and they
import it as ``loadgen``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

T = TypeVar("T")

# --------------------------------------------------------------------------- servers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment of asking."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_status(url: str) -> int:
    """The status of GET ``url``; raises OSError (urllib's errors) when there is no answer."""
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status


class Server:
    """A subprocess run from the repository root, its output in ``log_dir/<name>.log``."""

    def __init__(self, name: str, args: list[str], log_dir: str) -> None:
        self.name = name
        self.log_path = Path(log_dir) / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_ready(self, check: Callable[[], bool], deadline_s: float) -> None:
        """Poll ``check`` until it is true (OSError counts as not yet).

        Raises RuntimeError, with the end of the log, if the process exits first or
        ``deadline_s`` passes.
        """
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.popen.returncode}:\n{self.log()}"
                )
            with contextlib.suppress(OSError):
                if check():
                    return
            time.sleep(0.05)  # poll interval, not a readiness guess
        raise RuntimeError(f"{self.name} not ready after {deadline_s:.0f} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (a clean shutdown), SIGKILL after ``timeout_s``; a no-op once it has exited."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


# --------------------------------------------------------------------------- CPU time


def _stat_fields(pid: int | str) -> list[str]:
    """The fields of /proc/<pid>/stat after ``comm``, so fields[0] is the state."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()  # comm may hold spaces


def _cpu(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, all its threads, from /proc."""
    return _cpu(_stat_fields(pid))


def tree_cpu_seconds(root: int) -> float:
    """utime + stime of ``root`` and its descendants (all threads), from /proc."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat_fields(entry)
        except OSError:
            continue  # exited while we looked
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = _cpu(fields)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0.0)
        todo.extend(child for child, parent in parents.items() if parent == pid)
    return total


# --------------------------------------------------------------------------- load


def client_session(concurrency: int) -> aiohttp.ClientSession:
    """An aiohttp session with one keep-alive connection per worker (as bench/http_clients.py)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency, limit_per_host=0, keepalive_timeout=30),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )


@dataclass
class Load(Generic[T]):
    """One drive(): per request its latency and what it returned, in completion order."""

    latencies: list[float]
    results: list[T]
    wall_s: float
    cpu_s: float  # this process's CPU time, load generator included

    @property
    def requests(self) -> int:
        return len(self.latencies)

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s

    def percentile_ms(self, pct: float) -> float:
        """The ``pct`` percentile of the latencies, in ms."""
        ordered = sorted(self.latencies)
        return 1e3 * ordered[min(len(ordered) - 1, int(pct / 100 * len(ordered)))]


async def drive(
    request: Callable[[], Awaitable[T]], n: int, concurrency: int, max_s: float = float("inf")
) -> Load[T]:
    """``n`` requests (fewer if ``max_s`` runs out) from ``concurrency`` closed-loop workers.

    Each worker sends its next request as soon as its last one ends. An exception from
    ``request`` ends the run; to count a failure instead, ``request`` returns it as its
    result (the scripts' requests return False).
    """
    todo = iter(range(n))
    latencies: list[float] = []
    results: list[T] = []
    deadline = time.perf_counter() + max_s

    async def worker() -> None:
        for _ in todo:  # a shared iterator: each worker takes the next request number
            start = time.perf_counter()
            if start > deadline:
                break
            result = await request()
            latencies.append(time.perf_counter() - start)
            results.append(result)

    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Load(latencies, results, time.perf_counter() - wall, time.process_time() - cpu)
