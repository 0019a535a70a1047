"""Human review of flags in a real browser (tests/e2e/conftest.py): a reviewer works the
flag queue of atlas-2, confirming one flagged sample and dismissing another, and the
next review, requested from the release page, judges the confirmed flag rate on them.

Cast: atlas-2 with its first stage screening prompts and keeping flagged samples 30
days, judged on ``max_confirmed_flag_rate``; 400 requests of the three research
partners in the stage, 8 flagged ``cyber``, two of them kept as samples as the proxy
keeps them (``monitoring.usage``); rita the reviewer, vera a viewer.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import yaml
from django.db import transaction
from django.utils import timezone

from monitoring.models import FlaggedSample
from monitoring.rollups import rollup_pending
from monitoring.usage import write_events, write_samples
from rollout.models import Release, Review
from rollout.plans import apply_plan
from rollout.reviews import create_review
from tests.factories import EXAMPLE_PLAN, flag_sample, make_org, make_user, traffic

pytestmark = pytest.mark.usefixtures("live_db")

PARTNERS = {
    "northwind-research": "research_partner",
    "meridian-safety-lab": "research_partner",
    "oxbridge-alignment": "research_partner",
}
CONFIRMED = "max_confirmed_flag_rate"


def screened_plan(base_url: str) -> str:
    """The example plan, its first stage screening for cyber and keeping samples."""
    doc = yaml.safe_load(EXAMPLE_PLAN.read_text().replace("http://127.0.0.1:8001/v1", base_url))
    first = doc["stages"][0]
    first["screening"] = {
        "rules": [{"category": "cyber", "action": "flag", "keywords": ["ransomware"]}],
        "retain_flagged": {"days": 30},
    }
    first["exit_criteria"]["max_confirmed_flag_rate"] = 0.02
    return yaml.safe_dump(doc)


def people(*users):
    from tests.e2e.test_console_e2e import set_browser_password

    for user in users:
        set_browser_password(user)
    return users


@pytest.fixture
def flagged(proxy_server, demo_upstream) -> list[FlaggedSample]:
    """atlas-2 three days into its first stage, with its traffic rolled up and two
    flagged samples pending."""
    for slug, tier in PARTNERS.items():
        make_org(slug, tier)
    ada = make_user("ada", roles=("rollout_admin",))
    apply_plan(screened_plan(demo_upstream.base_url), actor=ada)
    release = Release.objects.get(name="atlas-2")
    with transaction.atomic():
        Release.objects.filter(pk=release.pk).update(
            stage_entered_at=timezone.now() - timedelta(days=3)
        )
    now = timezone.now()
    events = traffic(
        release="atlas-2",
        stage="research_preview",
        orgs=PARTNERS,
        count=400,
        start=now - timedelta(days=2),
        end=now - timedelta(days=1),
    )
    events = [e._replace(flags="cyber") if n % 50 == 0 else e for n, e in enumerate(events)]
    write_events(events)
    rollup_pending()
    write_samples(
        [
            flag_sample(
                at=datetime.fromtimestamp(event.created_at, UTC),
                release="atlas-2",
                stage="research_preview",
                request_id=event.request_id,
                org=event.org,
                text=text,
            )
            for event, text in zip(
                [e for e in events if e.flags],
                ["how do I deploy ransomware on a hospital network", "ransomware history essay"],
                strict=False,
            )
        ]
    )
    proxy_server.wait_synced()
    return list(FlaggedSample.objects.order_by("created_at"))


def confirmed_rate(review: Review) -> dict:
    return next(result for result in review.criteria if result["name"] == CONFIRMED)


def test_a_reviewer_confirms_a_flag_and_the_next_review_counts_it(flagged, console):
    rita, _vera = people(
        make_user("rita", roles=("reviewer",)), make_user("vera", roles=("viewer",))
    )
    before = confirmed_rate(create_review(Release.objects.get(), trigger="schedule"))
    assert before["passed"] is False
    assert "(0 of 400, point rate 0.0%)" in before["explanation"]
    assert before["explanation"].endswith("2 flagged requests still awaiting a reviewer's decision")
    harmful, benign = flagged
    page = console.page

    console.sign_in("rita")
    console.goto("/console/")
    page.get_by_role("link", name="Flags").click()
    page.wait_for_url("**/console/flags/")
    queue = page.locator("table.flags tbody tr")
    assert queue.count() == 2
    row = page.locator(f"#sample-{harmful.pk}")
    assert "deploy ransomware on a hospital network" in row.locator("blockquote").inner_text()
    row.get_by_label(f"Note on sample {harmful.pk}").fill("operational intent")
    row.get_by_role("button", name="Confirm").click()
    page.locator(f"#sample-{harmful.pk}[data-status='confirmed']").wait_for()
    assert "by rita" in page.locator(f"#sample-{harmful.pk}").inner_text()
    page.locator(f"#sample-{benign.pk}").get_by_role("button", name="Dismiss").click()
    page.locator(f"#sample-{benign.pk}[data-status='dismissed']").wait_for()

    console.goto("/console/releases/atlas-2/")
    counts = page.locator("dl.sample-counts").inner_text()
    assert counts.split() == ["pending", "0", "confirmed", "1", "dismissed", "1"]
    with page.expect_navigation():
        page.get_by_role("button", name="Request a review").click()

    review = Review.objects.order_by("-created_at", "-id").first()
    after = confirmed_rate(review)
    assert review.telemetry["samples"]["confirmed"] == review.telemetry["samples"]["dismissed"] == 1
    assert after["observed"] > before["observed"]
    assert after["explanation"].startswith("confirmed flag rate 95% upper bound")
    assert "(1 of 400, point rate 0.25%) is within the 2.0% maximum" in after["explanation"]
    assert after["passed"] is True
    confirmed = FlaggedSample.objects.get(pk=harmful.pk)
    assert (confirmed.status, confirmed.decided_by, confirmed.note) == (
        "confirmed",
        rita,
        "operational intent",
    )
    criterion = page.locator("#criterion-max_confirmed_flag_rate")
    assert criterion.locator("td.pass").count() == 1


def test_a_viewer_sees_the_queue_without_buttons(flagged, console):
    people(make_user("vera", roles=("viewer",)))

    console.sign_in("vera")
    console.goto("/console/flags/?category=cyber")

    assert console.page.locator("table.flags tbody tr").count() == 2
    assert console.page.get_by_role("button", name="Confirm").count() == 0
    assert FlaggedSample.objects.filter(status="pending").count() == 2
