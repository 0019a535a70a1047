"""Tripwires: the plan's conditions that act without waiting for people.

``check_tripwires`` runs every minute (``stagegate.schedule``) and right after an
incident is filed. For each active release it judges the current stage's tripwires
on the freshest rollups; when one fires it pauses the release or rolls it back one
stage, as the tripwire says (a rollback wins over a pause), through the same audited
transitions people use, and the transition notifies (``rollout.notifications``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from django.utils import timezone

from monitoring.rollups import rollup_pending
from rollout import transitions
from rollout.criteria import TripwireResult
from rollout.models import Release, ReleaseState, StageTransition
from rollout.plans import plan_doc
from rollout.reviews import check_tripwires as judge_tripwires
from rollout.reviews import open_incidents

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fired:
    release: str
    stage: str
    tripwires: list[TripwireResult]
    action: str  # pause | rollback
    transition: StageTransition | None  # None: another check acted first


def check_tripwires(
    *,
    release: str | None = None,
    now: datetime | None = None,
    roll_up: bool = True,
    incidents_only: bool = False,
) -> list[Fired]:
    """Judge every active release's tripwires (or only ``release``'s) and act on the
    ones that fire. ``incidents_only`` skips the rate tripwires (after an incident is
    filed, when the rates have not changed)."""
    if roll_up and not incidents_only:
        rollup_pending()
    now = now or timezone.now()
    releases = Release.objects.filter(state=ReleaseState.ACTIVE, active_plan__isnull=False)
    if release is not None:
        releases = releases.filter(name=release)
    fired = []
    for candidate in releases.select_related("active_plan"):
        try:
            result = _check(candidate, now=now, incidents_only=incidents_only)
        except Exception:
            log.exception("tripwire check of %s failed", candidate.name)
            continue
        if result is not None:
            fired.append(result)
    return fired


def _check(release: Release, *, now: datetime, incidents_only: bool) -> Fired | None:
    stage = plan_doc(release.active_plan).stage(release.current_stage)
    if stage is None or not stage.tripwires:
        return None
    incidents = open_incidents(release)
    results = [
        result
        for result in judge_tripwires(
            release, stage, incidents=incidents, now=now, incidents_only=incidents_only
        )
        if result.fired
    ]
    if not results:
        return None
    action = "rollback" if any(r.action == "rollback" for r in results) else "pause"
    acting = [r for r in results if r.action == action]
    names = ", ".join(r.name for r in acting)
    reason = f"tripwire {names}: " + "; ".join(r.explanation for r in acting)
    actor = f"system:tripwire:{acting[0].name}"
    if action == "rollback":
        transition = transitions.rollback(
            release, actor=actor, reason=reason, from_stage=stage.name
        )
    else:
        transition = transitions.pause(release, actor=actor, reason=reason)
    if transition is not None:
        log.warning("%s: %s (%s)", release.name, action, reason)
    return Fired(release.name, stage.name, results, action, transition)
