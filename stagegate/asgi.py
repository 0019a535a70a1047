"""The ASGI entry point: the proxy's routes go to the lean proxy app, the rest to Django.

The proxy (``access.proxy``) answers ``/v1/...``, ``/authz``, ``/healthz`` and
``/metrics`` without Django's request machinery, which alone costs more than the
proxy's whole latency budget (docs/performance.md); the admin, REST API and docs
are Django's. Lifespan events start and stop the proxy's per-worker resources, and
in embedded mode the in-process scheduler of the periodic tasks.
"""

import asyncio
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "stagegate.settings")
django_application = get_asgi_application()

from access.proxy import Proxy  # noqa: E402 - needs Django set up first
from stagegate.scheduler import scheduler_from_settings  # noqa: E402

proxy = Proxy.from_settings()
PROXY_PREFIXES = ("/v1/", "/authz", "/healthz", "/metrics")


async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        # The embedded mode's periodic tasks run in this process (stagegate/scheduler.py).
        scheduler = scheduler_from_settings()
        try:
            await proxy.lifespan(receive, send)
        finally:
            if scheduler is not None:
                await asyncio.to_thread(scheduler.stop)
    elif scope["type"] == "http" and scope["path"].startswith(PROXY_PREFIXES):
        await proxy(scope, receive, send)
    else:
        await django_application(scope, receive, send)
