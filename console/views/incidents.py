"""Incidents: the list (filtered by release, stage and status), one page per incident,
and the actions on them: file, update, resolve (reviewers and rollout admins).

Filing one at or above a tripwire's severity pauses or rolls back the release through
that tripwire, as ``rollout.incidents.file_incident`` already does for every caller;
so does raising an incident's severity (``update_incident``).
"""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.core.paginator import Paginator
from django.core.validators import RegexValidator
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse

from console.guards import action, staff_page
from monitoring.audit import ObjectType
from monitoring.models import AuditEvent
from rollout.incidents import (
    TITLE_MAX,
    file_incident,
    list_incidents,
    resolve_incident,
    update_incident,
)
from rollout.models import Incident, IncidentStatus, Release, ReleaseState, Severity
from stagegate.errors import Refused
from stagegate.roles import REVIEWER, ROLLOUT_ADMIN

PAGE_SIZE = 25
MAX_PAGE = 100_000
HISTORY_ROWS = 50  # audit rows shown on an incident's page
DESCRIPTION_MAX = 10_000

stage_name = RegexValidator(
    r"^[a-z0-9][a-z0-9_-]*$", "A stage name: lower-case letters, digits, _ and -."
)
incident_action = action(REVIEWER, ROLLOUT_ADMIN)


def _releases():
    return Release.objects.filter(active_plan__isnull=False).order_by("name")


class IncidentFilterForm(forms.Form):
    release = forms.ModelChoiceField(
        queryset=_releases(), to_field_name="name", required=False, empty_label="any"
    )
    stage = forms.CharField(required=False, max_length=40, validators=[stage_name])
    status = forms.ChoiceField(choices=[("", "any"), *IncidentStatus.choices], required=False)
    page = forms.IntegerField(
        required=False, min_value=1, max_value=MAX_PAGE, widget=forms.HiddenInput
    )


class FileIncidentForm(forms.Form):
    release = forms.ModelChoiceField(
        queryset=_releases().exclude(state=ReleaseState.RETIRED),
        to_field_name="name",
        empty_label="(choose a release)",
    )
    severity = forms.ChoiceField(choices=Severity.choices)
    stage = forms.CharField(
        required=False,
        max_length=40,
        validators=[stage_name],
        help_text="Leave empty for the release's current stage.",
    )
    title = forms.CharField(max_length=TITLE_MAX)
    description = forms.CharField(
        required=False, max_length=DESCRIPTION_MAX, widget=forms.Textarea(attrs={"rows": 3})
    )


class UpdateIncidentForm(forms.Form):
    severity = forms.ChoiceField(choices=Severity.choices)
    title = forms.CharField(max_length=TITLE_MAX)
    description = forms.CharField(
        required=False, max_length=DESCRIPTION_MAX, widget=forms.Textarea(attrs={"rows": 3})
    )


class ResolveIncidentForm(forms.Form):
    resolution = forms.CharField(
        max_length=2000,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="How was it resolved? Kept with the incident and in the audit log.",
    )


def _list_page(request, *, file_form: FileIncidentForm | None = None, status: int = 200):
    filters = IncidentFilterForm(request.GET or None)
    page = None
    if not request.GET or filters.is_valid():
        cleaned = filters.cleaned_data if request.GET else {}
        incidents = list_incidents(
            release=cleaned.get("release"),
            stage=cleaned.get("stage") or None,
            status=cleaned.get("status") or None,
        )
        page = Paginator(incidents, PAGE_SIZE).get_page(cleaned.get("page") or 1)
    query = request.GET.copy()
    query.pop("page", None)
    return render(
        request,
        "console/incidents.html",
        {
            "filters": filters,
            "page": page,
            "query": query.urlencode(),
            "file_form": file_form or FileIncidentForm(prefix="file"),
        },
        status=status,
    )


@staff_page
def incidents(request):
    return _list_page(request)


@incident_action
def incident_file(request):
    form = FileIncidentForm(request.POST, prefix="file")
    if form.is_valid():
        data = form.cleaned_data
        try:
            incident = file_incident(
                data["release"],
                severity=data["severity"],
                title=data["title"],
                description=data["description"],
                stage=data["stage"] or None,
                actor=request.user,
            )
        except Refused as refused:
            form.add_error("stage" if refused.code == "unknown_stage" else None, refused.message)
        else:
            messages.success(request, f"Incident {incident.public_id} filed.")
            return redirect("console:incident", public_id=incident.public_id)
    return _list_page(request, file_form=form)


def _incident_page(request, incident: Incident, *, update_form=None, resolve_form=None):
    history = AuditEvent.objects.filter(
        object_type=ObjectType.INCIDENT, object_id=incident.public_id
    )
    return render(
        request,
        "console/incident.html",
        {
            "incident": incident,
            "history": list(history.order_by("-seq")[:HISTORY_ROWS]),
            "update_form": update_form
            or UpdateIncidentForm(
                initial={
                    "severity": incident.severity,
                    "title": incident.title,
                    "description": incident.description,
                }
            ),
            "resolve_form": resolve_form or ResolveIncidentForm(),
        },
    )


def _incident(public_id: str) -> Incident:
    return get_object_or_404(
        Incident.objects.select_related("release", "opened_by", "resolved_by"),
        public_id=public_id,
    )


@staff_page
def incident(request, public_id: str):
    return _incident_page(request, _incident(public_id))


@incident_action
def incident_update(request, public_id: str):
    found = _incident(public_id)
    form = UpdateIncidentForm(request.POST)
    if form.is_valid():
        try:
            update_incident(found, actor=request.user, **form.cleaned_data)
        except Refused as refused:  # resolved meanwhile: the page no longer offers the form
            messages.error(request, f"Not updated: {refused.message}.")
        else:
            messages.success(request, f"Incident {found.public_id} updated.")
        return redirect(reverse("console:incident", args=[found.public_id]))
    return _incident_page(request, found, update_form=form)


@incident_action
def incident_resolve(request, public_id: str):
    found = _incident(public_id)
    form = ResolveIncidentForm(request.POST)
    if form.is_valid():
        try:
            resolve_incident(found, actor=request.user, resolution=form.cleaned_data["resolution"])
        except Refused as refused:
            form.add_error("resolution", refused.message)
        else:
            messages.success(request, f"Incident {found.public_id} resolved.")
            return redirect(reverse("console:incident", args=[found.public_id]))
    return _incident_page(request, found, resolve_form=form)
