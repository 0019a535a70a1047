"""The audit log: search, keyset pages, each change's before and after, the chain's
verification status, and exports of the selected rows (CSV, JSON lines).

Searching and paging are ``monitoring.audit_log``'s; this module validates the query
(bad values are form errors, never a 500) and renders or streams the answer.
"""

from __future__ import annotations

import csv
import json

from django import forms
from django.contrib import messages
from django.core.validators import RegexValidator
from django.http import HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone

from console.guards import rollout_admin_action, staff_page
from monitoring.audit_log import (
    EXPORT_FIELDS,
    EXPORT_MAX_ROWS,
    TEXT_SEARCH_WINDOW,
    AuditFilters,
    describe,
    export_rows,
    last_verification,
    page,
    run_verification,
    search,
)
from monitoring.checkpoints import last_published
from monitoring.redaction import SECRET_PATTERN

MAX_SEQ = 2**63 - 1
token = RegexValidator(r"^[A-Za-z0-9_.:@+-]+$", "Letters, digits and _ . : @ + - only.")


class AuditFilterForm(forms.Form):
    actor = forms.CharField(required=False, max_length=150, validators=[token])
    action = forms.CharField(
        required=False,
        max_length=64,
        validators=[token],
        help_text="Exact (key.revoked), or a prefix ending in a dot (key.).",
    )
    object_type = forms.CharField(required=False, max_length=32, validators=[token])
    object_id = forms.CharField(required=False, max_length=64, validators=[token])
    q = forms.CharField(
        label="Text",
        required=False,
        max_length=200,
        help_text=f"In the rows' data, among the newest {TEXT_SEARCH_WINDOW:,} rows.",
    )
    before = forms.IntegerField(
        required=False, min_value=1, max_value=MAX_SEQ, widget=forms.HiddenInput
    )
    after = forms.IntegerField(
        required=False, min_value=0, max_value=MAX_SEQ, widget=forms.HiddenInput
    )

    def __init__(self, data=None, **kwargs):
        super().__init__(data.copy() if data is not None else None, **kwargs)

    def clean(self):
        cleaned = super().clean()
        # The log never holds a key's secret (rows are redacted before they are written),
        # so a search for one finds nothing; refuse it and never show it again.
        for name in ("actor", "action", "object_type", "object_id", "q"):
            if SECRET_PATTERN.search(str(self.data.get(name, ""))):
                self.data[name] = ""
                self.errors.pop(name, None)
                self.add_error(
                    name,
                    "This holds an API key's secret, which the audit log never does."
                    " Search by the key's id (sgk_ and 16 characters) instead.",
                )
        return cleaned

    def filters(self) -> AuditFilters:
        data = self.cleaned_data
        return AuditFilters(
            actor=data["actor"],
            action=data["action"],
            object_type=data["object_type"],
            object_id=data["object_id"],
            text=data["q"],
        )


def _filtered(request) -> AuditFilterForm:
    return AuditFilterForm(request.GET or {})


@staff_page
def audit(request):
    form = _filtered(request)
    result, rows = None, []
    if form.is_valid():
        result = page(
            search(form.filters()),
            before=form.cleaned_data["before"],
            after=form.cleaned_data["after"],
        )
        rows = [(event, *describe(event.data)) for event in result.rows]
    query = request.GET.copy()
    for name in ("before", "after"):
        query.pop(name, None)
    return render(
        request,
        "console/audit.html",
        {
            "form": form,
            "page": result,
            "rows": rows,
            "query": query.urlencode(),
            "verification": last_verification(),
            "published": last_published(),
            "export_max": f"{EXPORT_MAX_ROWS:,}",
        },
    )


def _invalid(form: AuditFilterForm) -> HttpResponse:
    lines = [f"{name}: {' '.join(errors)}" for name, errors in form.errors.items()]
    return HttpResponse(
        "Refused: " + "; ".join(lines) + "\n", status=400, content_type="text/plain"
    )


class _Echo:
    """A file-like object whose write returns the line, for csv.writer to stream."""

    def write(self, value: str) -> str:
        return value


def _cell(value: str) -> str:
    # A spreadsheet runs a cell that starts with = + - @ as a formula.
    return f"'{value}" if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def _filename(extension: str) -> str:
    return f"audit-{timezone.now():%Y%m%dT%H%M%SZ}.{extension}"


@staff_page
def audit_csv(request):
    form = _filtered(request)
    if not form.is_valid():
        return _invalid(form)
    writer = csv.writer(_Echo())

    def lines():
        yield writer.writerow(EXPORT_FIELDS)
        for row in export_rows(search(form.filters())):
            yield writer.writerow(
                [
                    _cell(json.dumps(row[name], sort_keys=True, ensure_ascii=False))
                    if name == "data"
                    else _cell(str(row[name]))
                    for name in EXPORT_FIELDS
                ]
            )

    response = StreamingHttpResponse(lines(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{_filename("csv")}"'
    return response


@staff_page
def audit_jsonl(request):
    form = _filtered(request)
    if not form.is_valid():
        return _invalid(form)
    lines = (
        json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n"
        for row in export_rows(search(form.filters()))
    )
    response = StreamingHttpResponse(lines, content_type="application/x-ndjson; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{_filename("jsonl")}"'
    return response


@rollout_admin_action
def audit_verify(request):
    result = run_verification()
    if result.intact:
        messages.success(request, f"The audit chain is intact: {result.checked} rows checked.")
    else:
        messages.error(
            request, f"The audit chain is broken at row #{result.break_seq}: {result.break_reason}"
        )
    return redirect("console:audit")
