"""Incidents: filed by people (API, admin, console), updated and resolved by people,
audited every way.

Filing one runs the release's incident tripwires at once, after the commit, so a
critical incident pauses or rolls back the release before the next minute's check.
"""

from __future__ import annotations

import logging

from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from monitoring import audit
from monitoring.redaction import redact_secrets
from rollout.models import Incident, IncidentStatus, Release, Severity
from stagegate.errors import Refused

log = logging.getLogger(__name__)

TITLE_MAX = Incident._meta.get_field("title").max_length


def _audit(action: str, incident: Incident, actor, **data) -> None:
    audit.record(
        action,
        actor=actor,
        object_type=audit.ObjectType.INCIDENT,
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


def update_incident(
    incident: Incident,
    *,
    actor,
    severity: str | None = None,
    title: str | None = None,
    description: str | None = None,
) -> Incident:
    """Change an open incident's severity, title or description (None: unchanged).

    Audited as ``incident.updated`` with each changed field's ``from`` and ``to`` (text
    compared as it would be stored, so giving the same text again changes nothing and
    writes nothing). A new severity runs the incident tripwires again after the commit,
    as filing does: raising one to a tripwire's severity pauses or rolls back the
    release. A resolved incident is refused (``incident_resolved``)."""
    if severity is not None and severity not in Severity.values:
        raise Refused("unknown_severity", f"severity must be one of {Severity.values}", status=400)
    if title is not None:
        title = " ".join(title.split())
        if not title:
            raise Refused("title_required", "an incident needs a title", status=400)
        if len(title) > TITLE_MAX:
            raise Refused(
                "title_too_long", f"a title has at most {TITLE_MAX} characters", status=400
            )
    wanted = {
        "severity": severity,
        "title": None if title is None else redact_secrets(title),
        "description": None if description is None else redact_secrets(description),
    }
    with transaction.atomic():
        incident = (
            Incident.objects.select_for_update().select_related("release").get(pk=incident.pk)
        )
        if incident.status == IncidentStatus.RESOLVED:
            raise Refused("incident_resolved", "a resolved incident cannot change", status=409)
        changes = {
            field: {"from": getattr(incident, field), "to": value}
            for field, value in wanted.items()
            if value is not None and getattr(incident, field) != value
        }
        if not changes:
            return incident
        for field, change in changes.items():
            setattr(incident, field, change["to"])
        incident.save(update_fields=list(changes))
        _audit("incident.updated", incident, actor, changes=changes)
        if "severity" in changes:
            release_name = incident.release.name
            transaction.on_commit(lambda: _run_incident_tripwires(release_name))
    return incident


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


def list_incidents(
    *,
    release: Release | None = None,
    stage: str | None = None,
    status: str | None = None,
) -> QuerySet[Incident]:
    """Incidents, newest first, with what a list shows of them joined in (one query)."""
    incidents = Incident.objects.select_related("release", "opened_by", "resolved_by")
    if release is not None:
        incidents = incidents.filter(release=release)
    if stage:
        incidents = incidents.filter(stage=stage)
    if status:
        incidents = incidents.filter(status=status)
    return incidents.order_by("-created_at", "-id")
