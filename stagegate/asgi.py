"""The ASGI entry point: the proxy's routes go to the lean proxy app, the rest to Django.

The proxy (``access.proxy``) answers ``/v1/...``, ``/authz``, ``/healthz`` and
``/metrics`` without Django's request machinery, which alone costs more than the
proxy's whole latency budget (docs/performance.md); the admin, REST API and docs
are Django's. Lifespan events start and stop the proxy's per-worker resources, and
in embedded mode the in-process scheduler of the periodic tasks. Every request's body
must arrive within ``STAGEGATE_BODY_TIMEOUT`` (``stagegate.deadlines``), or it is
answered 408 ``request_timeout``.
"""

import asyncio
import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "stagegate.settings")
django_application = get_asgi_application()

import orjson  # noqa: E402
from django.conf import settings  # noqa: E402

from access.proxy import HTTPError, Proxy  # noqa: E402 - needs Django set up first
from stagegate.deadlines import CONNECTION_CLOSE, BodyDeadline, BodyTimedOut  # noqa: E402
from stagegate.scheduler import scheduler_from_settings  # noqa: E402

proxy = Proxy.from_settings()
PROXY_PREFIXES = ("/v1/", "/authz", "/healthz", "/metrics")
# OpenAI's files and fine-tuning routes read and write the database: Django's
# (tuning.views), not the proxy's.
DJANGO_V1_PREFIXES = ("/v1/files", "/v1/fine_tuning/")
BODY_TIMEOUT = settings.STAGEGATE_BODY_TIMEOUT
_BODY_LATE = f"The request body did not arrive within {BODY_TIMEOUT:g} s."
# Django's 408, in the REST API's error shape; the connection is closed after it, since
# the rest of the body may still be on its way.
# (stagegate.api.error_body's shape, written out: DRF's settings name classes in
# stagegate.api, so importing it before Django has loaded DRF can be circular.)
_DJANGO_TIMEOUT = orjson.dumps({"error": {"code": "request_timeout", "message": _BODY_LATE}})
_DJANGO_TIMEOUT_START = {
    "type": "http.response.start",
    "status": 408,
    "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(_DJANGO_TIMEOUT)),
        CONNECTION_CLOSE,
    ],
}
_DJANGO_TIMEOUT_BODY = {"type": "http.response.body", "body": _DJANGO_TIMEOUT}


def _proxy_body_late() -> HTTPError:
    # Raised inside the proxy's body read, so the call is answered and recorded as any
    # other refusal (status 408, reason request_timeout).
    return HTTPError(408, "request_timeout", _BODY_LATE, headers=[CONNECTION_CLOSE])


def _freeze_heap_when_started(send):
    """``send`` for the lifespan, which moves everything start-up made (Django, the
    apps, the first policy snapshot: about 130,000 objects) out of the garbage
    collector's sight before the first request. A full collection then scans only
    what requests made since: 40 ms of a paused event loop becomes well under 1 ms
    (docs/performance.md, "Tail")."""

    async def send_and_freeze(message):
        if message["type"] == "lifespan.startup.complete":
            gc.collect()
            gc.freeze()
        await send(message)

    return send_and_freeze


async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        # The embedded mode's periodic tasks run in this process (stagegate/scheduler.py).
        scheduler = scheduler_from_settings()
        try:
            await proxy.lifespan(receive, _freeze_heap_when_started(send))
        finally:
            if scheduler is not None:
                await asyncio.to_thread(scheduler.stop)
    elif scope["type"] != "http":
        await django_application(scope, receive, send)
    elif scope["path"].startswith(PROXY_PREFIXES) and not scope["path"].startswith(
        DJANGO_V1_PREFIXES
    ):
        await proxy(scope, BodyDeadline(receive, BODY_TIMEOUT, _proxy_body_late).receive, send)
    else:
        body = BodyDeadline(receive, BODY_TIMEOUT, BodyTimedOut)
        await django_application(scope, body.receive, send)
        if body.expired:  # Django returned without answering (stagegate/deadlines.py)
            await send(_DJANGO_TIMEOUT_START)
            await send(_DJANGO_TIMEOUT_BODY)
