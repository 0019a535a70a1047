"""The flag review queue: the samples screening kept for human review (redacted
excerpts, ``monitoring.flags``), filtered by release, category and status, pending
ones first by default; reviewers confirm or dismiss each.

Who sees what: the queue is a staff page (staff read every release, as on the release
pages; an org admin sees no release, so no sample either). Only the reviewer role
decides (``reviewer_action``: 403 for anyone else, and the service checks again);
viewers and rollout admins see the queue without the buttons.

A decision is a POST with CSRF (one form per sample, a button per decision). With
htmx the answer is the sample's row, decided, swapped in place; without it, a
redirect back to the queue with a message. Either way the change and its audit row
are one transaction (``monitoring.flags.decide_sample``).
"""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.core.paginator import Paginator
from django.core.validators import RegexValidator
from django.http import HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme

from console.guards import reviewer_action, staff_page
from console.refusals import explain
from monitoring.flags import NOTE_MAX, decide_sample, review_queue
from monitoring.models import FlaggedSample
from rollout.models import Release
from stagegate.errors import Refused

PAGE_SIZE = 25
MAX_PAGE = 100_000
Status = FlaggedSample.Status

category_name = RegexValidator(
    r"^[a-z][a-z0-9_/-]{0,63}$", "A screening category, such as cyber or violence/graphic."
)


class FlagFilterForm(forms.Form):
    release = forms.ModelChoiceField(
        queryset=Release.objects.order_by("name"),
        to_field_name="name",
        required=False,
        empty_label="any",
    )
    category = forms.CharField(required=False, max_length=64, validators=[category_name])
    status = forms.ChoiceField(
        choices=[*Status.choices, ("", "any")], required=False, initial=Status.PENDING
    )
    page = forms.IntegerField(
        required=False, min_value=1, max_value=MAX_PAGE, widget=forms.HiddenInput
    )


class DecisionForm(forms.Form):
    decision = forms.ChoiceField(
        choices=[(Status.CONFIRMED, "confirm"), (Status.DISMISSED, "dismiss")]
    )
    note = forms.CharField(
        required=False,
        max_length=NOTE_MAX,
        help_text="Optional; kept with the decision and in the audit log.",
    )


@staff_page
def flags(request):
    filters = FlagFilterForm(request.GET or None)
    page = None
    if not request.GET or filters.is_valid():
        cleaned = filters.cleaned_data if request.GET else {}
        # An empty status is "any"; a first visit (no query) shows the pending ones.
        status = cleaned["status"] if "status" in request.GET else Status.PENDING
        release = cleaned.get("release")
        samples = review_queue(
            release=release.name if release else "",
            category=cleaned.get("category") or "",
            status=status,
        )
        page = Paginator(samples, PAGE_SIZE).get_page(cleaned.get("page") or 1)
    query = request.GET.copy()
    query.pop("page", None)
    return render(
        request,
        "console/flags.html",
        {
            "filters": filters,
            "page": page,
            "query": query.urlencode(),
            "next": request.get_full_path(),
        },
    )


def _back(request) -> HttpResponseRedirect:
    """To the queue as the reviewer left it (``next``), else the pending queue."""
    target = request.POST.get("next", "")
    if not (
        target.startswith(reverse("console:flags"))
        and url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()})
    ):
        target = reverse("console:flags")
    return HttpResponseRedirect(target)


@reviewer_action
def flag_decide(request, pk: int):
    sample = get_object_or_404(FlaggedSample, pk=pk)
    form = DecisionForm(request.POST)
    problem = None
    if not form.is_valid():
        problem = "Choose confirm or dismiss; a note is at most 500 characters."
    else:
        try:
            sample = decide_sample(
                sample,
                decision=form.cleaned_data["decision"],
                actor=request.user,
                note=form.cleaned_data["note"],
            )
        except Refused as refused:
            problem = explain(refused)
            sample.refresh_from_db()
    if request.htmx:  # the row, decided or saying why not (htmx swaps 2xx answers only)
        return render(
            request,
            "console/partials/flag_row.html",
            {"sample": sample, "problem": problem, "next": request.POST.get("next", "")},
        )
    if problem is None:
        messages.success(request, f"Sample {sample.pk} {sample.status}.")
    else:
        messages.error(request, problem)
    return _back(request)
