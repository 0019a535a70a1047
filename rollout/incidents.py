"""Incidents: filed by people (API, admin), resolved by people, audited both ways.

Filing one runs the release's incident tripwires at once, after the commit, so a
critical incident pauses or rolls back the release before the next minute's check.
"""

from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone

from monitoring import audit
from rollout.models import Incident, IncidentStatus, Release
from stagegate.errors import Refused

log = logging.getLogger(__name__)


def _audit(action: str, incident: Incident, actor, **data) -> None:
    audit.record(
        action,
        actor=actor,
        object_type="incident",
        object_id=incident.public_id,
        data={
            "release": incident.release.name,
            "stage": incident.stage,
            "severity": incident.severity,
            "title": incident.title,
            **data,
        },
    )


def file_incident(
    release: Release,
    *,
    severity: str,
    title: str,
    description: str = "",
    stage: str | None = None,
    actor,
) -> Incident:
    """Open an incident on ``release`` (in its current stage unless ``stage`` is given)."""
    stage = stage or release.current_stage
    if release.active_plan is not None:
        from rollout.plans import plan_doc

        if plan_doc(release.active_plan).stage(stage) is None:
            raise Refused(
                "unknown_stage", f"{release.name}'s plan has no stage {stage!r}", status=400
            )
    with transaction.atomic():
        incident = Incident.objects.create(
            release=release,
            stage=stage,
            severity=severity,
            title=title,
            description=description,
            opened_by=actor if getattr(actor, "pk", None) else None,
        )
        _audit("incident.opened", incident, actor)
        transaction.on_commit(lambda: _run_incident_tripwires(release.name))
    return incident


def _run_incident_tripwires(release_name: str) -> None:
    from rollout.tripwires import check_tripwires

    try:
        check_tripwires(release=release_name, incidents_only=True)
    except Exception:  # the periodic check runs within a minute anyway
        log.exception("incident tripwires of %s failed", release_name)


def resolve_incident(incident: Incident, *, actor, resolution: str) -> Incident:
    """Close an open incident, saying how. Resolving a resolved one changes nothing."""
    resolution = " ".join((resolution or "").split())
    if not resolution:
        raise Refused("resolution_required", "say how the incident was resolved", status=400)
    with transaction.atomic():
        incident = (
            Incident.objects.select_for_update().select_related("release").get(pk=incident.pk)
        )
        if incident.status == IncidentStatus.RESOLVED:
            return incident
        incident.status = IncidentStatus.RESOLVED
        incident.resolved_at = timezone.now()
        incident.resolved_by = actor if getattr(actor, "pk", None) else None
        incident.resolution = resolution[:2000]
        incident.save(update_fields=["status", "resolved_at", "resolved_by", "resolution"])
        _audit("incident.resolved", incident, actor, resolution=incident.resolution)
    return incident
