"""Reviewing a held fine-tuning dataset in a real browser (tests/e2e/conftest.py): a
reviewer finds the held dataset in the fine-tuning queue, reads the flagged row's
excerpt on the job's page and approves it, and the job is queued; a reject without a
comment is refused beside the field, with one it fails the job.

Cast: atlas-2 on the example plan; northwind-research (research partner) with a job
whose screening held its training file (tests/console/test_tuning.py builds it as the
runner leaves it); rita the reviewer.

The approval enqueues the job's next step on the server's background thread (embedded
mode). The job is claimed as a runner would claim it, so that runner finds it taken and
leaves it alone: the test sees what the review did (``queued``), not how far training
then went, which is the runner's tests' business.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from rollout.models import Release
from rollout.plans import apply_plan
from tests.console.test_tuning import EXCERPT, held_job
from tests.factories import EXAMPLE_PLAN, make_org, make_user
from tuning.models import FineTuningJob, TuningDecision

pytestmark = pytest.mark.usefixtures("live_db")


@pytest.fixture
def held(proxy_server) -> FineTuningJob:
    """atlas-2's held dataset, claimed by a runner for the next hour."""
    from tests.e2e.test_console_e2e import set_browser_password

    northwind = make_org("northwind-research", "research_partner")
    apply_plan(EXAMPLE_PLAN.read_text(), actor=make_user("ada", roles=("rollout_admin",)))
    job = held_job(Release.objects.get(name="atlas-2"), northwind)
    FineTuningJob.objects.filter(pk=job.pk).update(
        claimed_until=timezone.now() + timedelta(hours=1)
    )
    set_browser_password(make_user("rita", roles=("reviewer",)))
    proxy_server.wait_synced()
    return job


def test_a_reviewer_approves_a_held_dataset_and_the_job_is_queued(held, console, artifacts_dir):
    page = console.page

    console.sign_in("rita")
    console.goto("/console/")
    page.get_by_role("link", name="Fine-tuning").click()
    page.wait_for_url("**/console/tuning/")
    queue = page.locator("#held-datasets tbody tr")
    assert queue.count() == 1
    assert "3 / 0" in queue.inner_text()
    if artifacts_dir is not None:
        artifacts_dir.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(artifacts_dir / "console-tuning.png"), full_page=True)
    queue.get_by_role("link", name=held.public_id).click()
    page.wait_for_url(f"**/console/tuning/jobs/{held.public_id}/")
    console.check_ids()

    if artifacts_dir is not None:
        page.screenshot(path=str(artifacts_dir / "console-tuning-job.png"), full_page=True)
    excerpt = page.locator("table.findings tr[data-line='4'] blockquote").inner_text()
    assert excerpt == EXCERPT  # shown as text, the markup in it never run
    decision = page.locator("#decision-dataset")
    decision.get_by_label("Comment on the held dataset").fill("security training, no intrusion")
    decision.get_by_role("button", name="Approve").click()
    page.locator("#decision-dataset[data-held='false']").wait_for()

    assert "the job is queued for training" in page.locator("#decision-dataset").inner_text()
    assert page.locator("#decision-dataset button").count() == 0
    job = FineTuningJob.objects.get(pk=held.pk)
    assert (job.status, job.dataset_review) == ("queued", "approved")
    assert TuningDecision.objects.get().comment == "security training, no intrusion"

    console.goto("/console/releases/atlas-2/")
    section = page.locator("#release-fine-tuning[data-loaded='true']")
    section.wait_for()
    assert section.locator("dl.job-verdicts dt:text-is('hold') + dd").inner_text() == "1"


def test_a_reject_needs_a_comment_and_then_fails_the_job(held, console):
    page = console.page

    console.sign_in("rita")
    console.goto(f"/console/tuning/jobs/{held.public_id}/")
    decision = page.locator("#decision-dataset")
    decision.get_by_role("button", name="Reject").click()
    page.locator("#id_dataset-comment-error").wait_for()
    assert page.locator("#id_dataset-comment-error").inner_text() == (
        "Say why you reject it: a comment is required."
    )
    assert FineTuningJob.objects.get(pk=held.pk).dataset_review == "pending"

    page.get_by_label("Comment on the held dataset").fill("teaches intrusion")
    page.locator("#decision-dataset").get_by_role("button", name="Reject").click()
    page.locator("#decision-dataset[data-held='false']").wait_for()

    job = FineTuningJob.objects.get(pk=held.pk)
    assert (job.status, job.error_code) == ("failed", "dataset_rejected")


def test_after_a_reviewers_approval_in_the_console_the_job_trains_on_the_demo_model(
    proxy_server, demo_upstream, console
):
    # atlas-2 trained by the demo model, no runner holding the job: the approval's
    # background step screens nothing more (the verdict stands), trains and assesses.
    from tests.access.proxy_cast import plan_text
    from tests.e2e.test_console_e2e import set_browser_password
    from tests.live import wait_until

    northwind = make_org("northwind-research", "research_partner")
    apply_plan(plan_text(demo_upstream.base_url), actor=None)
    job = held_job(Release.objects.get(name="atlas-2"), northwind)
    set_browser_password(make_user("rita", roles=("reviewer",)))
    proxy_server.wait_synced()
    page = console.page

    console.sign_in("rita")
    console.goto(f"/console/tuning/jobs/{job.public_id}/")
    page.get_by_label("Comment on the held dataset").fill("security training, reviewed")
    page.locator("#decision-dataset").get_by_role("button", name="Approve").click()
    page.locator("#decision-dataset[data-held='false']").wait_for()

    trained = wait_until(
        lambda: found if (found := FineTuningJob.objects.get(pk=job.pk)).finished else None,
        timeout=60,
        what="the approved job to finish",
    )
    assert (trained.status, trained.dataset_review) == ("succeeded", "approved")
    assert trained.fine_tuned_model.startswith("ft:atlas-2:northwind-research:")
    assert trained.tuned_model.status in {"active", "held"}  # assessed either way
