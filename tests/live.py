"""Real servers for end-to-end tests: the demo upstream and Stagegate itself, each a
subprocess on a free port with a readiness wait, sharing the test database.

The server reads the same database the test writes (PostgreSQL's test database, or
the SQLite test file), so tests use ``live_db`` (committed data) and
``ProxyServer.wait_synced`` to know the server has seen their latest change.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent
METRICS_TOKEN = "metrics-test-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Webhook:
    """A real HTTP endpoint on a free port that records the JSON bodies POSTed to it
    and answers ``status``."""

    def __init__(self) -> None:
        self.status = 204
        self.requests: list[tuple[str, dict]] = []
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.requests.append((self.headers["Content-Type"], json.loads(body)))
                self.send_response(received.status)
                self.end_headers()

            def log_message(self, format, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/stagegate"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def bodies(self) -> list[dict]:
        return [body for _, body in self.requests]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def wait_until(check, *, timeout: float, what: str, interval: float = 0.02):
    """Poll ``check`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last})")


def database_env() -> dict[str, str]:
    """Environment that points a server process at the test database."""
    settings_dict = connection.settings_dict
    if connection.vendor == "postgresql":
        user = settings_dict.get("USER") or "postgres"
        host = settings_dict.get("HOST") or "127.0.0.1"
        port = settings_dict.get("PORT") or 5432
        return {"DATABASE_URL": f"postgres://{user}@{host}:{port}/{settings_dict['NAME']}"}
    return {"STAGEGATE_SQLITE_PATH": str(settings_dict["NAME"])}


class Process:
    """A subprocess with its output in a log file, shown when a test fails."""

    def __init__(self, args: list[str], env: dict[str, str], log_name: str) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix=log_name, suffix=".log", delete=False)  # noqa: SIM115
        self.popen = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 15) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self.log.close()
        return self.popen.returncode


class DemoUpstream:
    def __init__(self, extra_args: list[str] = ()) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.process = Process(
            [
                sys.executable,
                "-m",
                "stagegate.demo_upstream",
                "--port",
                str(self.port),
                *extra_args,
            ],
            dict(os.environ),
            "demo-upstream-",
        )
        wait_until(
            lambda: httpx.get(f"{self.base_url}/models", timeout=1).status_code == 200,
            timeout=30,
            what="the demo upstream",
        )

    def stop(self) -> None:
        self.process.stop()


class ProxyServer:
    """``python -m stagegate.serve`` on a free port, against the test database."""

    def __init__(
        self,
        *,
        workers: int = 1,
        env: dict[str, str] | None = None,
        ready_status: int = 200,
        args: list[str] = (),
    ) -> None:
        self.ready_status = ready_status
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.var_dir = tempfile.mkdtemp(prefix="stagegate-live-")
        environment = {
            **os.environ,
            "STAGEGATE_VAR_DIR": self.var_dir,
            "STAGEGATE_USAGE_FLUSH_SECONDS": "0.1",
            "STAGEGATE_METRICS_TOKEN": METRICS_TOKEN,
            "STAGEGATE_UPSTREAM_READ_TIMEOUT": "2",
            # Periodic work would act on the tests' data behind their backs.
            "STAGEGATE_SCHEDULER": "off",
            **database_env(),
            **(env or {}),
        }
        environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if "STAGEGATE_SQLITE_PATH" in environment:
            environment.pop("DATABASE_URL", None)
        self.process = Process(
            [
                sys.executable,
                "-m",
                "stagegate.serve",
                "--port",
                str(self.port),
                "--workers",
                str(workers),
                *args,
            ],
            environment,
            "stagegate-",
        )
        try:
            wait_until(self._healthy, timeout=60, what="Stagegate to serve /healthz")
        except AssertionError:
            self.process.stop()
            raise AssertionError(self.process.output()) from None

    def _healthy(self) -> bool:
        if self.process.popen.poll() is not None:
            raise AssertionError(f"server exited:\n{self.process.output()}")
        return httpx.get(f"{self.url}/healthz", timeout=1).status_code == self.ready_status

    def health(self) -> dict:
        return httpx.get(f"{self.url}/healthz", timeout=2).json()

    def wait_synced(self, timeout: float = 10) -> float:
        """Wait until the server's snapshot includes every change committed so far;
        return how long that took."""
        from access.snapshot import read_marker

        marker, _ = read_marker()
        expected = list(marker) if marker else None
        started = time.monotonic()
        wait_until(
            lambda: self.health()["marker"] == expected,
            timeout=timeout,
            what=f"the server to load marker {expected}",
        )
        return time.monotonic() - started

    def stop(self, sig=signal.SIGTERM) -> int:
        return self.process.stop(sig)


class RedisServer:
    """A private ``redis-server`` on a free port, for tests that restart or kill it (the
    shared Redis is never touched). ``appendonly`` turns on the persistence
    docs/operations.md recommends; without it a restart loses everything."""

    def __init__(self, *, appendonly: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed: no private Redis to restart")
        self.binary = binary
        self.appendonly = appendonly
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="stagegate-redis-")
        self.process = self._start()

    def _start(self) -> Process:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir]
        args += ["--save", "", "--appendonly", "yes" if self.appendonly else "no"]
        if self.appendonly:
            args += ["--appendfsync", "everysec"]
        process = Process(args, dict(os.environ), "redis-")
        wait_until(self._answers, timeout=15, what=f"redis-server on port {self.port}")
        return process

    def _answers(self) -> bool:
        import redis

        try:
            with redis.Redis(port=self.port, socket_timeout=1) as client:
                return client.ping()
        except redis.ConnectionError:
            return False

    def restart(self, sig=signal.SIGTERM) -> None:
        """Stop it (SIGTERM: a clean shutdown; SIGKILL: a crash) and start it again on the
        same port, with whatever its persistence kept."""
        self.process.stop(sig)
        self.process = self._start()

    def stop(self) -> None:
        self.process.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class CeleryWorker:
    """``celery -A stagegate worker`` on its own queue, against the test database and
    the tests' Redis. The solo pool runs tasks in the worker process itself, so killing
    that process kills the task mid-way."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        environment = {
            **os.environ,
            "STAGEGATE_SCHEDULER": "celery",
            "PYTHONUNBUFFERED": "1",
            **database_env(),
        }
        self.process = Process(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "stagegate",
                "worker",
                "--pool=solo",
                "--queues",
                queue,
                "--hostname",
                f"{queue}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel=INFO",
            ],
            environment,
            "celery-worker-",
        )
        try:
            wait_until(self._ready, timeout=60, what="the Celery worker", interval=0.1)
        except AssertionError:
            self.process.stop()
            raise AssertionError(self.process.output()) from None

    def _ready(self) -> bool:
        if self.process.popen.poll() is not None:
            raise AssertionError(f"worker exited:\n{self.process.output()}")
        return " ready." in self.process.output()

    def run(self, task, timeout: float = 60, **kwargs):
        """Send ``task`` to this worker through the broker and wait for its result."""
        return task.apply_async(kwargs=kwargs, queue=self.queue).get(timeout=timeout)

    def kill(self) -> None:
        self.process.stop(signal.SIGKILL)

    def stop(self) -> None:
        self.process.stop()


def _sqlite_audit_triggers():
    migration = importlib.import_module("monitoring.migrations.0002_audit_append_only")
    return migration.SQLITE_FORWARD


def drop_audit_triggers() -> None:
    """SQLite empties tables with DELETE, which the audit table's triggers refuse, so
    they are dropped for the flush after a live test. (PostgreSQL empties tables with
    TRUNCATE, which row triggers do not see.)"""
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("DROP TRIGGER IF EXISTS monitoring_auditevent_no_update")
            cursor.execute("DROP TRIGGER IF EXISTS monitoring_auditevent_no_delete")


def restore_audit_triggers() -> None:
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            for statement in _sqlite_audit_triggers():
                cursor.execute(statement.replace("CREATE TRIGGER", "CREATE TRIGGER IF NOT EXISTS"))
