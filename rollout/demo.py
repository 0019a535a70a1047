"""The demo's releases follow the demo model server wherever it listens.

``python -m stagegate.serve --demo-upstream --demo-port N`` calls
``follow_demo_upstream`` before serving: a release whose upstream is the demo model
server on another port gets a new plan version pointing at port N, through
``apply_plan`` (validated, versioned and audited like any change). A release counts
as the demo's when its upstream is a loopback address and its upstream model is one
the demo server lists (``STAGEGATE_DEMO_MODELS``); any other upstream is left alone,
so a real model server on this machine is never repointed. A stage's screening
classifier on the same demo server (its URL under the old base URL, as the demo
plan's ``/v1/moderations``) moves with it; a classifier elsewhere is left alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from urllib.parse import urlsplit

from rollout.models import Release, ReleaseState
from rollout.plans import apply_plan

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
ACTOR = "system:serve"


def is_demo_upstream(base_url: str, model: str, demo_models: Iterable[str]) -> bool:
    return urlsplit(base_url).hostname in LOOPBACK and model in set(demo_models)


def follow_demo_upstream(base_url: str, demo_models: Iterable[str]) -> list[str]:
    """Point every demo release at ``base_url``; returns the names of those changed."""
    demo_models = tuple(demo_models)
    changed = []
    releases = Release.objects.exclude(state=ReleaseState.RETIRED).select_related("active_plan")
    for release in releases:
        if (
            release.active_plan is None
            or release.upstream_base_url.rstrip("/") == base_url.rstrip("/")
            or not is_demo_upstream(release.upstream_base_url, release.upstream_model, demo_models)
        ):
            continue
        document = json.loads(json.dumps(release.active_plan.document))
        old = document["upstream"]["base_url"].rstrip("/")
        document["upstream"]["base_url"] = base_url
        for stage in document["stages"]:
            classifier = (stage.get("screening") or {}).get("classifier") or {}
            if classifier.get("url", "").startswith(f"{old}/"):
                classifier["url"] = base_url.rstrip("/") + classifier["url"][len(old) :]
        apply_plan(
            json.dumps(document),
            actor=ACTOR,
            comment=f"the demo model server listens at {base_url}",
        )
        changed.append(release.name)
    return changed
