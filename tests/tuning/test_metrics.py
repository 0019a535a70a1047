"""Fine-tuning's Prometheus series (monitoring.metrics.FineTuningCollector): jobs by
status and what waits for reviewers, per release, read from the database on scrape."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from monitoring.metrics import FineTuningCollector
from rollout.models import Release
from rollout.plans import apply_plan
from tests.factories import EXAMPLE_PLAN, assess, fine_tuning_job, make_org
from tuning.models import FineTuningJob, TunedModel

# The collector closes stale connections first, which inside a test's transaction
# would close it under the test: committed data, as tests/monitoring/test_metrics.py.
pytestmark = pytest.mark.usefixtures("live_db")


def samples(name: str) -> dict[tuple[str, ...], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FineTuningCollector(ttl=0))
    return {
        tuple(sample.labels.values()): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
        if sample.name == name
    }


def test_jobs_by_status_and_what_awaits_review():
    apply_plan(EXAMPLE_PLAN.read_text(), actor=None)
    atlas = Release.objects.get(name="atlas-2")
    northwind = make_org("northwind-research", "research_partner")
    held = fine_tuning_job(atlas, northwind, verdict="hold")
    FineTuningJob.objects.filter(pk=held.pk).update(dataset_review="pending")
    fine_tuning_job(atlas, northwind)  # validating, not screened yet
    failed = fine_tuning_job(atlas, northwind, verdict="accept")
    FineTuningJob.objects.filter(pk=failed.pk).update(status="succeeded")
    assess(failed, passed=False)
    TunedModel.objects.filter(job=failed).update(status="held")

    assert samples("stagegate_fine_tuning_jobs") == {
        ("atlas-2", "succeeded"): 1.0,
        ("atlas-2", "validating_files"): 2.0,
    }
    assert samples("stagegate_fine_tuning_awaiting_review") == {
        ("atlas-2", "dataset"): 1.0,
        ("atlas-2", "model"): 1.0,
    }
