"""The Celery app: broker and results on Redis (``REDIS_URL``), tasks found in each
app's ``tasks`` module, the beat schedule from ``stagegate.schedule``.

Start a worker and beat (README, docs/operations.md)::

    celery -A stagegate worker --loglevel=INFO
    celery -A stagegate beat --loglevel=INFO

In embedded mode there is no broker: ``stagegate.scheduler`` runs the same task
functions on the same schedule inside the web server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading

from celery import Celery
from django.db import DatabaseError, InterfaceError, OperationalError, transaction
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "stagegate.settings")

log = logging.getLogger(__name__)

app = Celery("stagegate")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Every task: retried on a database or Redis outage, at most three times with growing
# waits, so a task that keeps failing is given up (its next periodic run tries again).
RETRIED = {
    "autoretry_for": (
        OperationalError,
        InterfaceError,
        DatabaseError,
        RedisConnectionError,
        RedisTimeoutError,
    ),
    "max_retries": 3,
    "retry_backoff": 2,
    "retry_backoff_max": 60,
    "retry_jitter": True,
}


@app.on_after_finalize.connect
def _schedule(sender: Celery, **_kwargs) -> None:
    from stagegate.schedule import beat_schedule

    sender.conf.beat_schedule = beat_schedule()


def registered_task(name: str):
    """The task registered as ``name`` (its ``name=``), every app's ``tasks`` module
    imported first if it is not registered yet; KeyError if no task has that name."""
    if name not in app.tasks:
        app.loader.import_default_modules()
    return app.tasks[name]


_background: queue.SimpleQueue | None = None
_background_lock = threading.Lock()


def run_in_background(function, /, **kwargs) -> None:
    """Run ``function(**kwargs)`` on this process's one background thread (embedded
    mode's stand-in for a worker, for work too long for a request: a fine-tuning job's
    screening and training), logging its failure.

    The thread is a daemon: a server that stops does not wait for it. Work it leaves
    half done is picked up again by the periodic task that sweeps for it (fine-tuning's
    runner claims a job for a few minutes, then lets the sweep have it)."""
    global _background
    with _background_lock:
        if _background is None:
            _background = queue.SimpleQueue()
            threading.Thread(
                target=_work, args=(_background,), name="stagegate-background", daemon=True
            ).start()
        work = _background
    work.put((function, kwargs))


def _work(work: queue.SimpleQueue) -> None:
    from django.db import close_old_connections, connections

    # The lowest priority for this thread (Linux sets niceness per thread): the proxy's
    # requests in the same process come first (docs/performance.md, "Fine-tuning").
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    while True:
        function, kwargs = work.get()
        close_old_connections()
        try:
            function(**kwargs)
        except Exception:
            log.exception("background task %s failed", getattr(function, "name", function))
        finally:
            # This thread's connections closed between tasks, which are rare: none is
            # left open while the thread waits (a database being dropped would wait on it).
            connections.close_all()


def enqueue(task_name: str, *, background: bool = False, **kwargs) -> None:
    """Run the task registered as ``task_name`` with ``kwargs`` once the current
    transaction commits: on a Celery worker when Celery is the scheduler, otherwise
    right here (or, with ``background``, on this process's background thread, so the
    request that enqueued it is answered first). If the broker cannot take it, it runs
    here too, so the work is not lost with the message.

    The task is named, as the schedule names its tasks, not imported: a service may
    enqueue work whose ``tasks`` module imports that service (``rollout.transitions``
    enqueues ``stagegate.notify_transition``; ``rollout.tasks`` runs the tripwires,
    which call transitions). An unknown name raises here, inside the transaction."""
    from django.conf import settings

    task = registered_task(task_name)

    def send() -> None:
        if settings.STAGEGATE_SCHEDULER == "celery":
            try:
                task.apply_async(kwargs=kwargs)
                return
            except Exception:
                log.exception("could not enqueue %s; running it in this process", task.name)
        if background:
            run_in_background(task, **kwargs)
            return
        try:
            task(**kwargs)
        except Exception:
            log.exception("task %s failed", task.name)

    transaction.on_commit(send)
