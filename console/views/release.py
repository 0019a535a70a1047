"""One release: its timeline, exit criteria, tripwires and charts (from rollups), and
its rollout plan with every version and the diff between any two."""

from __future__ import annotations

from django import forms
from django.http import Http404
from django.shortcuts import get_object_or_404, render

from console import releases
from console.guards import staff_page
from monitoring.series import hourly_usage
from rollout.models import Release, RolloutPlan
from rollout.plans import plan_doc
from rollout.reviews import evaluate
from rollout.timeline import release_timeline

TIMELINE_LIMIT = 50


def _release(name: str) -> Release:
    return get_object_or_404(
        Release.objects.select_related("active_plan"), name=name, active_plan__isnull=False
    )


@staff_page
def release(request, name: str):
    found = _release(name)
    evaluation = evaluate(found)
    span = releases.chart_range(request.GET.get("range"), found, evaluation.now)
    usage = hourly_usage(release=found.name, since=span.since, until=span.until)
    timeline = release_timeline(found, limit=TIMELINE_LIMIT)
    return render(
        request,
        "console/release.html",
        {
            "release": found,
            "evaluation": evaluation,
            "stages": evaluation.doc.stage_names,
            "stage": evaluation.stage,
            "criteria": releases.criterion_rows(
                evaluation, approvals=releases.standing_approvals(found)
            ),
            "tiles": releases.tripwire_tiles(found, evaluation, span, usage),
            "screening": releases.screening_summary(evaluation),
            "charts": releases.release_charts(evaluation.stage, span, usage),
            "span": span,
            "ranges": releases.RANGE_CHOICES,
            "timeline": [
                ("This stint", [item for item in timeline if item.at >= found.stage_entered_at]),
                ("Before", [item for item in timeline if item.at < found.stage_entered_at]),
            ],
            "timeline_limit": TIMELINE_LIMIT,
        },
    )


def _versions(found: Release) -> list[RolloutPlan]:
    return list(
        RolloutPlan.objects.filter(release=found)
        .select_related("created_by")
        .defer("source")
        .order_by("-version")
    )


def _version_number(text: str | None) -> int | None:
    """A version number from the query string, or None for anything else."""
    if text is None or not text.isascii() or not text.isdigit() or len(text) > 9:
        return None
    return int(text)


@staff_page
def plans(request, name: str):
    """The plan shown readably (the active version, or ``?version=``), every version
    with who applied it, when and why, and a form to diff two of them."""
    found = _release(name)
    versions = _versions(found)
    wanted = _version_number(request.GET.get("version"))
    shown = next((plan for plan in versions if plan.version == wanted), None)
    if wanted is not None and shown is None:
        raise Http404("no such plan version")
    shown = shown or next(plan for plan in versions if plan.pk == found.active_plan_id)
    return render(
        request,
        "console/release_plans.html",
        {
            "release": found,
            "plan": shown,
            "doc": plan_doc(shown),
            "versions": versions,
            "form": PlanDiffForm(versions=versions, initial=_default_pair(versions)),
        },
    )


def _default_pair(versions: list[RolloutPlan]) -> dict:
    """The newest version against the one before it."""
    if not versions:
        return {}
    newest = versions[0].version
    return {"a": versions[1].version if len(versions) > 1 else newest, "b": newest}


class PlanDiffForm(forms.Form):
    a = forms.TypedChoiceField(label="From version", coerce=int)
    b = forms.TypedChoiceField(label="To version", coerce=int)

    def __init__(self, *args, versions: list[RolloutPlan], **kwargs):
        super().__init__(*args, **kwargs)
        choices = [(plan.version, f"v{plan.version}") for plan in versions]
        self.fields["a"].choices = choices
        self.fields["b"].choices = choices


@staff_page
def plan_diff(request, name: str):
    """The unified diff between versions ``?a=`` and ``?b=`` of the plan's canonical
    YAML; without them, the newest version against the one before."""
    found = _release(name)
    versions = _versions(found)
    data = request.GET if ("a" in request.GET or "b" in request.GET) else None
    form = PlanDiffForm(data, versions=versions, initial=_default_pair(versions))
    pair = None
    if data is None:
        pair = _default_pair(versions)
    elif form.is_valid():
        pair = form.cleaned_data
    diff = lines = None
    older = newer = None
    if pair:
        by_version = {plan.version: plan for plan in versions}
        older, newer = by_version[pair["a"]], by_version[pair["b"]]
        diff = releases.plan_diff(older, newer)
        lines = releases.diff_lines(diff)
    return render(
        request,
        "console/release_plan_diff.html",
        {
            "release": found,
            "versions": versions,
            "form": form,
            "older": older,
            "newer": newer,
            "diff": diff,
            "lines": lines,
        },
    )
