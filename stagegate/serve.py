"""Serve Stagegate: ``python -m stagegate.serve [--workers N] [--demo-upstream]``.

Runs uvicorn (uvloop + httptools, measured in docs/performance.md) on
``stagegate.asgi:application`` with lifespan events, after preparing what several
worker processes share: a fresh directory for Prometheus' multiprocess files. With
``--demo-upstream`` it also starts the built-in demo model server
(``stagegate.demo_upstream``) beside it and stops it on exit, so ``make run`` gives a
new user a model to call at once; a demo port already taken stops it with an error,
and demo releases are pointed at the demo's port (``rollout.demo``). With the demo
upstream, the demo traffic generator (``stagegate.demo_traffic``) keeps sending real
requests through the proxy, unless ``--no-demo-traffic``. Slow clients are cut off
and open connections bounded (``stagegate.deadlines``, the ``STAGEGATE_HEADER_TIMEOUT``
family of settings).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DEMO_READY_SECONDS = 20


def _prepare_metrics_dir(var_dir: Path, port: int) -> Path:
    # Files left by a previous run would be summed into this one's counters.
    path = var_dir / f"prometheus-{port}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _die_with_parent() -> None:
    """Have the kernel stop the demo upstream when this process dies: uvicorn re-raises
    SIGTERM after its shutdown, so no ``finally`` here would get to stop it."""
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _port_taken(host: str, port: int) -> OSError | None:
    """Why ``host:port`` cannot be listened on (None if it can), as uvicorn would bind it."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc
    return None


def _start_demo_upstream(port: int) -> subprocess.Popen:
    """Start the demo model server and wait until it answers; SystemExit if it cannot."""
    if (taken := _port_taken("127.0.0.1", port)) is not None:
        raise SystemExit(
            f"error: the demo model's port 127.0.0.1:{port} is not free ({taken.strerror});"
            " stop what listens there, or choose another with --demo-port"
            " (make run DEMO_PORT=...)"
        )
    command = [sys.executable, "-m", "stagegate.demo_upstream", "--host", "127.0.0.1"]
    demo = subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
        [*command, "--port", str(port)],
        preexec_fn=_die_with_parent,  # single-threaded at this point, so safe
    )
    deadline = time.monotonic() + DEMO_READY_SECONDS
    while time.monotonic() < deadline:
        if demo.poll() is not None:
            raise SystemExit(f"error: the demo model server exited ({demo.returncode}) at start")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1):
                return demo
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    demo.terminate()
    raise SystemExit(f"error: the demo model server did not answer on port {port}")


def _follow_demo_upstream(base_url: str) -> None:
    """Point the demo releases at the demo model server's port (audited plan versions)."""
    import django
    from django.db import DatabaseError, connections

    django.setup()
    from rollout.demo import follow_demo_upstream
    from stagegate.demo_upstream import DemoConfig

    try:
        for name in follow_demo_upstream(base_url, DemoConfig.from_env().models):
            print(f"{name}: upstream now {base_url} (a new plan version)", flush=True)
    except DatabaseError as exc:  # e.g. not migrated yet: serving says so itself
        print(f"demo releases not checked: {exc}", flush=True)
    finally:
        connections.close_all()  # worker processes open their own


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stagegate.serve", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument(
        "--demo-upstream",
        action="store_true",
        help="also serve the built-in demo model on --demo-port",
    )
    parser.add_argument("--demo-port", type=int, default=8001)
    parser.add_argument(
        "--demo-traffic",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send demo requests through the proxy (default: on with --demo-upstream)",
    )
    parser.add_argument(
        "--demo-traffic-interval", type=float, default=0.75, help="seconds between demo requests"
    )
    parser.add_argument("--access-log", action="store_true", help="log every request")
    args = parser.parse_args(argv)

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "stagegate.settings")
    from django.conf import settings

    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.demo_traffic and not args.demo_upstream:
        parser.error("--demo-traffic needs --demo-upstream: it calls the demo model")
    if args.demo_traffic_interval <= 0:
        parser.error("--demo-traffic-interval must be positive")
    if args.workers > 1 and not settings.REDIS_URL:
        # In-process limits would be multiplied by the number of workers.
        parser.error("several workers share limits through Redis: set REDIS_URL, or use 1")
    if args.workers > 1:  # one worker keeps its metrics in memory, which is cheaper
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(
            _prepare_metrics_dir(Path(settings.VAR_DIR), args.port)
        )
    else:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

    demo = traffic = None
    if args.demo_upstream:
        demo_url = f"http://127.0.0.1:{args.demo_port}/v1"
        demo = _start_demo_upstream(args.demo_port)
        print(f"demo upstream on {demo_url}", flush=True)
        _follow_demo_upstream(demo_url)
        if args.demo_traffic is not False:
            from stagegate.demo_traffic import start_demo_traffic

            host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host  # noqa: S104
            traffic = start_demo_traffic(
                f"http://{host}:{args.port}",
                Path(settings.VAR_DIR) / "demo-traffic-keys.json",
                interval=args.demo_traffic_interval,
            )
    import uvicorn

    from stagegate.deadlines import DeadlineHttpToolsProtocol

    print(f"Stagegate on http://{args.host}:{args.port} ({args.workers} worker(s))", flush=True)
    try:
        uvicorn.run(
            "stagegate.asgi:application",
            host=args.host,
            port=args.port,
            workers=args.workers,
            loop="uvloop",
            # httptools, with deadlines on slow clients' headers (stagegate/deadlines.py)
            http=DeadlineHttpToolsProtocol,
            # uvicorn answers 503 once open connections reach its limit, counting the
            # one asking: +1 serves exactly STAGEGATE_MAX_CONNECTIONS.
            limit_concurrency=settings.STAGEGATE_MAX_CONNECTIONS + 1,
            backlog=settings.STAGEGATE_BACKLOG,
            lifespan="on",
            access_log=args.access_log,
            log_level="info",
        )
    finally:
        if traffic is not None:
            traffic.stop()
        if demo is not None:
            demo.terminate()
            demo.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
