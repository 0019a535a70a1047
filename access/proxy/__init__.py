"""The OpenAI-compatible inference proxy: a lean ASGI application.

Routes (everything else is Django's, see ``stagegate.asgi``), one module each:

- ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``: ``calls``
- ``GET /v1/models``, ``/v1/models/{id}``, ``/v1/access``: ``listings``
- ``/authz`` and ``/authz/...``: authorization for nginx ``auth_request`` and
  Envoy ``ext_authz`` (docs/gateways.md): ``authz``
- ``GET /healthz``; ``GET /metrics`` (bearer token): ``ops``

``app`` holds the ASGI application (``Proxy``: per-worker resources, lifespan,
routing); ``common`` what the routes share (the error shape, ``Call``, the key check,
``decide_for``, the limits, the usage record); ``access.upstream`` relays answers.

One request: find the key in the in-memory snapshot (no database), decide
(``access.decisions``), take the rate-limit reservation, forward the body to the
upstream with the model name swapped, relay the answer (streams chunk by chunk),
then settle the reservation and buffer a usage event. Django's request machinery
costs more than the whole budget, so this path does not use it; it calls the same
decision code as everything else.
"""

from access.proxy.app import Proxy, ProxyConfig
from access.proxy.common import Call, HTTPError, error_body, presented_key

__all__ = ["Call", "HTTPError", "Proxy", "ProxyConfig", "error_body", "presented_key"]
