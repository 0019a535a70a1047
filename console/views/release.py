"""One release: where it stands, its exit criteria and its tripwires, judged now."""

from __future__ import annotations

from django.shortcuts import get_object_or_404, render

from console.guards import staff_page
from rollout.models import Release
from rollout.reviews import evaluate


@staff_page
def release(request, name: str):
    found = get_object_or_404(
        Release.objects.select_related("active_plan"), name=name, active_plan__isnull=False
    )
    evaluation = evaluate(found)
    return render(
        request,
        "console/release.html",
        {
            "release": found,
            "evaluation": evaluation,
            "stages": evaluation.doc.stage_names,
        },
    )
