"""Serve Stagegate: ``python -m stagegate.serve [--workers N] [--demo-upstream]``.

Runs uvicorn (uvloop + httptools, measured in docs/performance.md) on
``stagegate.asgi:application`` with lifespan events, after preparing what several
worker processes share: a fresh directory for Prometheus' multiprocess files. With
``--demo-upstream`` it also starts the built-in demo model server
(``stagegate.demo_upstream``) beside it and stops it on exit, so ``make run`` gives a
new user a model to call at once. Slow clients are cut off and open connections
bounded (``stagegate.deadlines``, the ``STAGEGATE_HEADER_TIMEOUT`` family of settings).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path


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
    parser.add_argument("--access-log", action="store_true", help="log every request")
    args = parser.parse_args(argv)

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "stagegate.settings")
    from django.conf import settings

    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.workers > 1 and not settings.REDIS_URL:
        # In-process limits would be multiplied by the number of workers.
        parser.error("several workers share limits through Redis: set REDIS_URL, or use 1")
    if args.workers > 1:  # one worker keeps its metrics in memory, which is cheaper
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(
            _prepare_metrics_dir(Path(settings.VAR_DIR), args.port)
        )
    else:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

    demo = None
    if args.demo_upstream:
        demo = subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
            [
                sys.executable,
                "-m",
                "stagegate.demo_upstream",
                "--host",
                "127.0.0.1",
                "--port",
                str(args.demo_port),
            ],
            preexec_fn=_die_with_parent,  # single-threaded at this point, so safe
        )
        print(f"demo upstream on http://127.0.0.1:{args.demo_port}/v1", flush=True)
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
        if demo is not None:
            demo.terminate()
            demo.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
