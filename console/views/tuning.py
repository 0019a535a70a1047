"""Fine-tuning in the console: the review queue of held datasets and held tuned models,
recent jobs and per-stage figures; one job's page; the reviewers' decisions.

Who sees what: every page is a staff page (staff read every release; org admins see no
release, so no job either). Only the reviewer role decides (``reviewer_action``: 403 for
anyone else, and ``tuning.services`` checks again); viewers and rollout admins see the
same pages without the forms.

A decision is a POST with CSRF to ``.../dataset/`` or ``.../model/`` with a verdict and
a comment (required to reject). ``tuning.services.decide_dataset``/``decide_model``
write it with its audit row; four eyes are ``approvals_needed`` different reviewers.
With htmx the answer is the decision section, swapped in place (200 even when refused
or invalid: htmx swaps only 2xx answers); without it a redirect back to the job's page
with a message, or the page again with the error beside the field (400).
"""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.core.paginator import Paginator
from django.http import HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.urls import reverse

from console import tuning_selectors as selectors
from console.guards import reviewer_action, staff_page
from rollout.models import Release
from stagegate.errors import Refused
from tuning.models import (
    DecisionSubject,
    DecisionVerdict,
    FineTuningJob,
    JobStatus,
    ReviewStatus,
    TunedModel,
    TunedModelStatus,
)
from tuning.services import decide_dataset, decide_model

PAGE_SIZE = 25
FINDINGS_PAGE_SIZE = 100
MAX_PAGE = 100_000
COMMENT_MAX = 2000

SUBJECT_NAMES = {DecisionSubject.DATASET: "held dataset", DecisionSubject.MODEL: "held model"}


class JobFilterForm(forms.Form):
    release = forms.ModelChoiceField(
        queryset=Release.objects.order_by("name"),
        to_field_name="name",
        required=False,
        empty_label="any",
    )
    status = forms.ChoiceField(choices=[("", "any"), *JobStatus.choices], required=False)
    page = forms.IntegerField(
        required=False, min_value=1, max_value=MAX_PAGE, widget=forms.HiddenInput
    )


class TuningDecisionForm(forms.Form):
    """A reviewer's verdict on a held dataset or model; the button pressed gives it."""

    verdict = forms.ChoiceField(
        choices=DecisionVerdict.choices, error_messages={"required": "Choose approve or reject."}
    )
    comment = forms.CharField(
        max_length=COMMENT_MAX,
        required=False,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text="Required to reject; kept with your decision and in the audit log.",
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["comment"].label = f"Comment on the {SUBJECT_NAMES[self.prefix]}"

    def clean(self) -> dict:
        cleaned = super().clean()
        if cleaned.get("verdict") == DecisionVerdict.REJECT and not cleaned.get("comment"):
            self.add_error("comment", "Say why you reject it: a comment is required.")
        return cleaned


def _sentence(message: str) -> str:
    """A service's message as a sentence (capitalized, ending with a full stop)."""
    message = message.strip()
    if not message:
        return message
    message = message[:1].upper() + message[1:]
    return message if message.endswith((".", "!", "?")) else message + "."


# --- the queue ------------------------------------------------------------------------------


@staff_page
def tuning(request):
    """The review queue (held datasets, held models, oldest first), recent jobs filtered
    by release and status, and per-stage figures."""
    filters = JobFilterForm(request.GET or None)
    page = None
    release_name = ""
    if not request.GET or filters.is_valid():
        cleaned = filters.cleaned_data if request.GET else {}
        release = cleaned.get("release")
        release_name = release.name if release else ""
        jobs = selectors.recent_jobs(release=release_name, status=cleaned.get("status") or "")
        page = Paginator(jobs, PAGE_SIZE).get_page(cleaned.get("page") or 1)
    query = request.GET.copy()
    query.pop("page", None)
    return render(
        request,
        "console/tuning.html",
        {
            "queue": selectors.review_queue(),
            "filters": filters,
            "page": page,
            "query": query.urlencode(),
            "telemetry": selectors.telemetry(release=release_name) if page is not None else [],
            "release_name": release_name,
            "verdicts": selectors.VERDICTS,
        },
    )


# --- one job ----------------------------------------------------------------------------------


def _job(public_id: str) -> FineTuningJob:
    return get_object_or_404(selectors.job_query(), public_id=public_id)


def _job_url(job: FineTuningJob) -> str:
    return reverse("console:tuning_job", args=[job.public_id])


def _forms(bound: dict[str, TuningDecisionForm] | None = None) -> dict[str, TuningDecisionForm]:
    found = {subject: TuningDecisionForm(prefix=subject) for subject in DecisionSubject.values}
    found.update(bound or {})
    return found


def _job_page(request, job: FineTuningJob, *, bound=None, status: int = 200):
    detail = selectors.job_detail(job)
    findings = Paginator(selectors.findings(job), FINDINGS_PAGE_SIZE).get_page(
        request.GET.get("page") or 1
    )
    return render(
        request,
        "console/tuning_job.html",
        {
            "job": job,
            "detail": detail,
            "findings": findings,
            "forms": _forms(bound),
        },
        status=status,
    )


@staff_page
def tuning_job(request, public_id: str):
    """A job's facts, screening verdict, flagged rows, events, tuned model, assessments
    and decisions; the decision forms for reviewers while something is held."""
    return _job_page(request, _job(public_id))


def _done(
    job: FineTuningJob, tuned: TunedModel | None, subject: str, outcome: str, decisions
) -> str:
    """What a decision did, in a sentence for the reviewer who made it."""
    if subject == DecisionSubject.DATASET:
        what = f"the held dataset of {job.public_id}"
        if outcome == ReviewStatus.APPROVED:
            return f"You approved {what}: the job is queued for training."
        if outcome == ReviewStatus.REJECTED:
            return f"You rejected {what}: the job failed (dataset_rejected)."
    else:
        what = f"the held model {tuned.name if tuned else ''}"
        if outcome == TunedModelStatus.ACTIVE:
            return f"You approved {what}: its organization may call it now."
        if outcome == TunedModelStatus.REJECTED:
            return f"You rejected {what}: it will not be served."
    missing = max(0, decisions.needed - decisions.approvals)
    return (
        f"You approved {what}: {decisions.approvals} of {decisions.needed} approvals;"
        f" {missing} more needed from another reviewer."
    )


def _decide(request, public_id: str, subject: str):
    job = _job(public_id)
    form = TuningDecisionForm(request.POST, prefix=subject)
    outcome = problem = notice = None
    if form.is_valid():
        decide = decide_dataset if subject == DecisionSubject.DATASET else decide_model
        try:
            outcome = decide(
                job=job, reviewer=request.user, verdict=form.cleaned_data["verdict"],
                comment=form.cleaned_data["comment"],
            )  # fmt: skip
        except Refused as refused:
            problem = _sentence(refused.message)
    elif not request.htmx:
        return _job_page(request, job, bound={subject: form}, status=400)
    job = selectors.job_query().get(pk=job.pk)  # as the decision (or another) left it
    tuned = TunedModel.objects.filter(job=job).first()
    decisions = None  # a job with no tuned model has no model to decide on
    if subject == DecisionSubject.DATASET or tuned is not None:
        decisions = selectors.decisions_for(job, subject, tuned)
    if outcome is not None:
        notice = _done(job, tuned, subject, outcome, decisions)
        form = TuningDecisionForm(prefix=subject)
    if request.htmx:
        return render(
            request,
            "console/partials/tuning_decision.html",
            {
                "job": job,
                "subject": subject,
                "decisions": decisions,
                "form": form,
                "problem": problem,
                "notice": notice,
            },
        )
    if problem is None:
        messages.success(request, notice)
    else:
        messages.error(request, problem)
    return HttpResponseRedirect(_job_url(job))


@reviewer_action
def tuning_dataset_decide(request, public_id: str):
    return _decide(request, public_id, DecisionSubject.DATASET)


@reviewer_action
def tuning_model_decide(request, public_id: str):
    return _decide(request, public_id, DecisionSubject.MODEL)


# --- a release's page -------------------------------------------------------------------------


@staff_page
def tuning_release(request, name: str):
    """The fine-tuning section of a release's page (loaded by htmx into it): its tuned
    models and its current stage's jobs by screening verdict."""
    release = get_object_or_404(Release, name=name)
    return render(
        request,
        "console/partials/tuning_release.html",
        {"release": release, "fine_tuning": selectors.release_fine_tuning(release)},
    )
