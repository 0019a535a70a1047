"""One JSON POST to an operator-configured webhook, for every feature that announces
something (transition notifications, audit checkpoints)."""

from __future__ import annotations

import json
import urllib.request
from typing import Any


class WebhookFailed(Exception):
    """The webhook could not be reached or did not answer 2xx."""


def post_json(url: str, message: dict[str, Any], *, timeout: float = 5.0) -> None:
    """POST ``message`` as JSON to ``url``; WebhookFailed unless it answers 2xx."""
    request = urllib.request.Request(  # noqa: S310 - an operator-configured http(s) URL
        url,
        data=json.dumps(message).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "stagegate"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            status = response.status
    except OSError as exc:
        raise WebhookFailed(f"webhook {url}: {exc}") from exc
    if not 200 <= status < 300:
        raise WebhookFailed(f"webhook {url} answered {status}")
