"""The embedded mode's stand-in for Celery beat and a worker: one daemon thread that
runs the Celery task functions of ``stagegate.schedule`` in this process, each on
its interval. Started by the ASGI lifespan when ``STAGEGATE_SCHEDULER=in_process``.

A task that raises is logged and runs again at its next tick; the thread never dies
of it. Like beat, the first run of each task comes one interval after start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from django.db import close_old_connections

from stagegate.schedule import Periodic, schedule

log = logging.getLogger(__name__)


class InProcessScheduler:
    def __init__(
        self,
        jobs: Sequence[Periodic],
        *,
        resolve: Callable[[str], Callable[[], object]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.jobs = tuple(jobs)
        self._resolve = resolve or _celery_task
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.runs: dict[str, int] = {job.task: 0 for job in self.jobs}

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="stagegate-scheduler")
            self._thread.daemon = True
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        due = {job.task: self._clock() + job.every for job in self.jobs}
        while not self._stop.is_set():
            now = self._clock()
            for job in self.jobs:
                if due[job.task] <= now and not self._stop.is_set():
                    self.run(job.task)
                    due[job.task] = self._clock() + job.every
            self._stop.wait(max(0.0, min(due.values()) - self._clock()))

    def run(self, task: str) -> None:
        """Run one task now, here; log its failure instead of raising it."""
        close_old_connections()
        try:
            self._resolve(task)()
        except Exception:
            log.exception("scheduled task %s failed; it runs again at its next tick", task)
        finally:
            self.runs[task] += 1
            close_old_connections()


def _celery_task(name: str) -> Callable[[], object]:
    from stagegate.celery import app

    app.loader.import_default_modules()
    return app.tasks[name]


def scheduler_from_settings() -> InProcessScheduler | None:
    """A started scheduler when this process is to run the periodic tasks, else None."""
    from django.conf import settings

    if settings.STAGEGATE_SCHEDULER != "in_process":
        return None
    scheduler = InProcessScheduler(schedule())
    scheduler.start()
    return scheduler
