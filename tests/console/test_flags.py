"""The flag review queue (console/views/flags.py): who sees it and who decides, the
filters, confirm and dismiss with and without htmx (audited), refusals, hostile input,
a fixed number of queries; and what the release page shows of screening (flags by
category, the samples by status, the category and confirmed-rate criteria)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from console.refusals import SENTENCES
from monitoring.models import AuditEvent, FlaggedSample
from monitoring.rollups import rollup_pending
from monitoring.series import flags_per_bucket
from monitoring.usage import write_events, write_samples
from rollout.models import Release
from rollout.plans import apply_plan
from rollout.reviews import create_review
from tests.factories import EXAMPLE_PLAN, flag_sample, traffic

pytestmark = pytest.mark.django_db

QUEUE = "/console/flags/"
KEY = "sgk_0123456789abcdef_" + "Ab1" * 15
HTMX = {"HX-Request": "true"}


@pytest.fixture
def browser():
    return Client()


def keep(*samples) -> list[FlaggedSample]:
    write_samples(list(samples))
    return list(FlaggedSample.objects.order_by("created_at", "id"))


def sample(minutes_ago: float, **fields):
    return flag_sample(
        at=timezone.now() - timedelta(minutes=minutes_ago),
        release=fields.pop("release", "atlas-2"),
        stage=fields.pop("stage", "research_preview"),
        **fields,
    )


@pytest.fixture
def samples(release):
    return keep(
        sample(30, categories="cyber", text=f"ransomware please, my key {KEY}"),
        sample(20, categories="bio,cyber", org="org_meridian"),
        sample(10, categories="weapons", action="block", text="<script>alert(1)</script> sarin"),
    )


def decide(pk: int) -> str:
    return f"{QUEUE}{pk}/decide/"


def rows(page: str) -> list[str]:
    """The sample ids of the queue's rows, in order."""
    return re.findall(r'data-sample="(\d+)"', page)


# --- who sees it, who decides ------------------------------------------------------------------


def test_anonymous_is_sent_to_sign_in(browser, samples):
    answer = browser.get(QUEUE)
    assert (answer.status_code, answer["Location"]) == (302, f"/console/login/?next={QUEUE}")
    assert browser.post(decide(samples[0].pk), {"decision": "confirmed"}).status_code == 302
    assert FlaggedSample.objects.filter(status="pending").count() == 3


@pytest.mark.parametrize("who", ["oscar", "nobody"])
def test_org_admins_and_users_without_a_role_are_refused(browser, who, request, samples):
    browser.force_login(request.getfixturevalue(who))
    assert browser.get(QUEUE).status_code == 403
    assert browser.post(decide(samples[0].pk), {"decision": "confirmed"}).status_code == 403
    assert FlaggedSample.objects.filter(status="pending").count() == 3


@pytest.mark.parametrize("who", ["vera", "ada"])
def test_viewers_and_rollout_admins_see_the_queue_without_deciding(browser, who, request, samples):
    browser.force_login(request.getfixturevalue(who))
    page = browser.get(QUEUE).content.decode()
    assert rows(page) == [str(s.pk) for s in reversed(samples)]  # newest first
    assert "Confirm</button>" not in page
    for pk in (samples[0].pk, samples[1].pk):
        answer = browser.post(decide(pk), {"decision": "dismissed"}, headers=HTMX)
        assert answer.status_code == 403
    assert FlaggedSample.objects.filter(status="pending").count() == 3
    assert AuditEvent.objects.filter(object_type="flagged_sample").count() == 0


def test_the_queue_is_in_the_navigation_of_staff_only(browser, rita, oscar, release):
    browser.force_login(rita)
    assert f'href="{QUEUE}"' in browser.get("/console/").content.decode()
    browser.force_login(oscar)
    assert f'href="{QUEUE}"' not in browser.get("/console/orgs/").content.decode()


def test_a_release_name_no_url_can_hold_is_shown_as_text(browser, vera, samples):
    FlaggedSample.objects.filter(pk=samples[0].pk).update(release="atlas/2 <b>")
    browser.force_login(vera)
    answer = browser.get(QUEUE)
    assert answer.status_code == 200
    assert "atlas/2 &lt;b&gt;<br>" in answer.content.decode()


def test_excerpts_are_redacted_and_escaped(browser, vera, samples):
    browser.force_login(vera)
    page = browser.get(QUEUE).content.decode()
    assert "my key sgk_0123456789abcdef_[redacted]" in page
    assert KEY not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; sarin" in page
    assert "<script>alert" not in page


# --- deciding ------------------------------------------------------------------------------------


def test_a_reviewer_confirms_a_sample_and_is_sent_back_to_the_queue(browser, rita, samples):
    browser.force_login(rita)
    back = f"{QUEUE}?category=cyber&status=pending"
    answer = browser.post(
        decide(samples[0].pk), {"decision": "confirmed", "note": "clear intent", "next": back}
    )

    assert (answer.status_code, answer["Location"]) == (302, back)
    found = FlaggedSample.objects.get(pk=samples[0].pk)
    assert (found.status, found.decided_by, found.note) == ("confirmed", rita, "clear intent")
    audit = AuditEvent.objects.get(object_type="flagged_sample")
    assert (audit.action, audit.actor, audit.object_id) == ("flag_confirmed", "rita", str(found.pk))
    page = browser.get(back).content.decode()
    assert f"Sample {found.pk} confirmed." in page
    assert rows(page) == [str(samples[1].pk)]


def test_a_reviewer_dismisses_with_htmx_and_gets_the_row_back(browser, rita, samples):
    browser.force_login(rita)
    answer = browser.post(decide(samples[1].pk), {"decision": "dismissed"}, headers=HTMX)

    row = answer.content.decode()
    assert answer.status_code == 200
    assert "<html" not in row
    assert f'id="sample-{samples[1].pk}"' in row
    assert 'data-status="dismissed"' in row
    assert "by rita" in row
    assert "Confirm</button>" not in row
    assert FlaggedSample.objects.get(pk=samples[1].pk).status == "dismissed"
    decisions = AuditEvent.objects.filter(object_type="flagged_sample")
    assert list(decisions.values_list("action", flat=True)) == ["flag_dismissed"]


def test_a_sample_decided_already_says_so_and_keeps_the_first_decision(browser, rita, samples):
    browser.force_login(rita)
    browser.post(decide(samples[0].pk), {"decision": "dismissed"})

    again = browser.post(decide(samples[0].pk), {"decision": "confirmed"}, headers=HTMX)
    plain = browser.post(decide(samples[0].pk), {"decision": "confirmed"}, follow=True)

    assert again.status_code == 200
    assert "This sample was already decided" in again.content.decode()
    assert 'data-status="dismissed"' in again.content.decode()
    assert "This sample was already decided" in plain.content.decode()
    assert FlaggedSample.objects.get(pk=samples[0].pk).status == "dismissed"
    assert AuditEvent.objects.filter(object_type="flagged_sample").count() == 1


@pytest.mark.parametrize(
    "data",
    [
        {"decision": "pending"},
        {"decision": "approve"},
        {},
        {"decision": "confirmed", "note": "x" * 501},
    ],
)
def test_a_decision_that_is_not_confirm_or_dismiss_changes_nothing(browser, rita, samples, data):
    browser.force_login(rita)
    answer = browser.post(decide(samples[0].pk), data, follow=True)
    assert "Choose confirm or dismiss" in answer.content.decode()
    assert FlaggedSample.objects.get(pk=samples[0].pk).status == "pending"
    assert AuditEvent.objects.filter(object_type="flagged_sample").count() == 0


def test_an_unknown_sample_is_404_and_a_get_is_refused(browser, rita, samples):
    browser.force_login(rita)
    assert browser.post(decide(samples[-1].pk + 1), {"decision": "confirmed"}).status_code == 404
    assert browser.get(decide(samples[0].pk)).status_code == 405


def test_a_decision_needs_the_csrf_token(rita, samples):
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(rita)
    assert strict.post(decide(samples[0].pk), {"decision": "confirmed"}).status_code == 403
    assert FlaggedSample.objects.get(pk=samples[0].pk).status == "pending"


def test_next_outside_the_queue_falls_back_to_it(browser, rita, samples):
    browser.force_login(rita)
    for target in ("https://evil.example/", "/console/audit/", "//evil.example/console/flags/"):
        answer = browser.post(decide(samples[0].pk), {"decision": "confirmed", "next": target})
        assert answer["Location"] == QUEUE
        FlaggedSample.objects.filter(pk=samples[0].pk).update(status="pending")


# --- filters -------------------------------------------------------------------------------------


def test_filters_by_release_category_and_status(browser, rita, samples, ada):
    apply_plan(EXAMPLE_PLAN.read_text().replace("release: atlas-2", "release: boreas-1"), actor=ada)
    (other,) = set(keep(sample(5, release="boreas-1", categories="cyber"))) - set(samples)
    browser.force_login(rita)
    browser.post(decide(samples[0].pk), {"decision": "confirmed"})

    def shown(query: str) -> list[int]:
        return [int(pk) for pk in rows(browser.get(f"{QUEUE}?{query}").content.decode())]

    assert shown("") == [other.pk, samples[2].pk, samples[1].pk]  # pending by default
    assert shown("status=") == [other.pk, samples[2].pk, samples[1].pk, samples[0].pk]
    assert shown("category=cyber&status=") == [other.pk, samples[1].pk, samples[0].pk]
    assert shown("category=cyber&status=confirmed") == [samples[0].pk]
    assert shown("release=atlas-2&category=bio") == [samples[1].pk]
    assert shown("release=boreas-1") == [other.pk]
    assert shown("category=cyb") == []  # whole category names only


@pytest.mark.parametrize(
    "query",
    [
        "release=no-such",
        "category=%3Cscript%3Ealert(1)%3C/script%3E",
        "category=%00",
        f"category={'x' * 10_000}",
        f"category={KEY}",
        "status=maybe",
        "page=0",
        "page=99999999999999999999",
    ],
)
def test_hostile_filters_are_form_errors(browser, vera, samples, query):
    browser.force_login(vera)
    answer = browser.get(f"{QUEUE}?{query}")
    assert answer.status_code == 200
    page = answer.content.decode()
    assert 'role="alert"' in page
    assert rows(page) == []
    assert "<script>alert" not in page


def test_queries_do_not_grow_with_the_samples(browser, rita, release, django_assert_num_queries):
    keep(*(sample(n, request_id=f"req-{n}") for n in range(3)))
    browser.force_login(rita)
    browser.get(QUEUE)
    with CaptureQueriesContext(connection) as few:
        browser.get(QUEUE)
    keep(*(sample(n + 10, request_id=f"req-more-{n}", categories="bio") for n in range(40)))
    FlaggedSample.objects.filter(request_id="req-more-1").update(status="confirmed")
    with django_assert_num_queries(len(few)):
        page = browser.get(QUEUE).content.decode()
    assert len(rows(page)) == 25
    assert "page 1 of 2" in page


# --- the release page --------------------------------------------------------------------------


@pytest.fixture
def screened(release, ada):
    """atlas-2's first stage screening and keeping samples, judged per category and on
    the confirmed rate, 3 days into the stage."""
    doc = yaml.safe_load(EXAMPLE_PLAN.read_text())
    first = doc["stages"][0]
    first["screening"] = {
        "rules": [
            {"category": "cyber", "action": "flag", "keywords": ["ransomware"]},
            {"category": "weapons", "action": "block", "keywords": ["sarin"]},
        ],
        "retain_flagged": {"days": 30},
    }
    first["exit_criteria"]["max_flag_rate_by_category"] = {"cyber": 0.05, "weapons": 0.01}
    first["exit_criteria"]["max_confirmed_flag_rate"] = 0.02
    first["tripwires"].append(
        {
            "name": "cyber-spike",
            "metric": "flag_rate",
            "category": "cyber",
            "threshold": 0.2,
            "window_minutes": 60,
            "min_requests": 20,
            "action": "pause",
        }
    )
    apply_plan(yaml.safe_dump(doc), actor=ada)
    Release.objects.filter(pk=release.pk).update(
        stage_entered_at=timezone.now() - timedelta(days=3)
    )
    release.refresh_from_db()
    return release


def test_the_release_page_shows_flags_by_category_and_the_samples(browser, vera, rita, screened):
    now = timezone.now()
    events = traffic(
        release="atlas-2",
        stage="research_preview",
        orgs={"northwind-research": "research_partner"},
        count=400,
        start=now - timedelta(days=2),
        end=now - timedelta(days=1),
    )
    flagged = [e._replace(flags="cyber") for e in events[:8]]
    blocked = events[8]._replace(decision="deny", reason="content_blocked", flags="weapons")
    write_events([*flagged, blocked, *events[9:]])
    rollup_pending()
    kept = keep(
        *(
            flag_sample(
                at=datetime.fromtimestamp(e.created_at, UTC),
                release="atlas-2",
                stage="research_preview",
                request_id=e.request_id,
            )
            for e in flagged[:3]
        )
    )
    browser.force_login(rita)
    browser.post(decide(kept[0].pk), {"decision": "confirmed"})
    browser.post(decide(kept[1].pk), {"decision": "dismissed"})
    browser.force_login(vera)

    page = browser.get("/console/releases/atlas-2/").content.decode()

    assert "Screening in research_preview" in page
    cyber = page[page.index('id="category-cyber"') :].split("</tr>")[0]
    weapons = page[page.index('id="category-weapons"') :].split("</tr>")[0]
    assert [cell.split(">")[-1] for cell in cyber.split("</td>")[:-1]] == ["8", "2.01%", "5%", "0"]
    assert [cell.split(">")[-1] for cell in weapons.split("</td>")[:-1]] == ["0", "0%", "1%", "1"]
    assert "Kept 30 days for human review" in page
    assert f'{QUEUE}?release=atlas-2&amp;status=pending">1</a>' in page
    assert f'{QUEUE}?release=atlas-2&amp;status=confirmed">1</a>' in page
    assert f'{QUEUE}?release=atlas-2&amp;status=dismissed">1</a>' in page
    assert '<th scope="row">cyber flag rate</th>' in page
    assert '<th scope="row">confirmed flag rate</th>' in page
    assert (
        "1 confirmed in 399 requests: observed 0.25%; with 95% confidence the true rate is"
        " below 1.41%, which is under the 2% maximum."
    ) in page
    assert "1 flagged request still awaiting a reviewer&#x27;s decision" in page
    tile = page[page.index('data-tripwire="cyber-spike"') :].split("</article>")[0]
    assert "cyber flag rate ≥ 20%" in tile
    assert "cyber-spike: cyber flag rate, the last 7d" in tile  # its chart, from its rollup


def test_flags_per_bucket_reads_one_category_of_one_stage(screened):
    start = timezone.now().replace(minute=0, second=0, microsecond=0) - timedelta(hours=5)
    events = traffic(
        release="atlas-2",
        stage="research_preview",
        orgs={"northwind-research": "research_partner"},
        count=30,
        start=start,
        end=start + timedelta(hours=3),
    )
    events = [
        e._replace(flags="cyber" if n % 3 == 0 else "bio,cyber" if n % 3 == 1 else "bio")
        for n, e in enumerate(events)
    ]
    events.append(events[0]._replace(request_id="req-x", stage="commercial"))
    write_events(events)
    rollup_pending()

    cyber = flags_per_bucket(
        release="atlas-2",
        stage="research_preview",
        category="cyber",
        since=start,
        until=timezone.now(),
    )

    # ten requests an hour; n % 3 in (0, 1) carry cyber: 7, 7 and 6 of them
    assert cyber == {start + timedelta(hours=h): n for h, n in enumerate((7, 7, 6))}


def test_every_refusal_of_deciding_a_sample_has_a_sentence():
    source = (Path(__file__).resolve().parents[2] / "monitoring" / "flags.py").read_text()
    codes = set(re.findall(r'Refused\(\s*"(\w+)"', source))
    assert codes == {"not_a_reviewer", "sample_not_found", "sample_decided"}
    assert codes - set(SENTENCES) == set()


def test_a_review_page_shows_screening_as_the_review_saw_it(browser, vera, screened):
    now = timezone.now()
    events = traffic(
        release="atlas-2",
        stage="research_preview",
        orgs={"northwind-research": "research_partner"},
        count=40,
        start=now - timedelta(days=2),
        end=now - timedelta(days=1),
    )
    events[0] = events[0]._replace(flags="cyber")
    events[1] = events[1]._replace(decision="deny", reason="content_blocked", flags="weapons")
    write_events(events)
    keep(
        flag_sample(
            at=now - timedelta(days=1, hours=1), release="atlas-2", stage="research_preview"
        )
    )
    review = create_review(screened, trigger="schedule")
    browser.force_login(vera)

    page = browser.get(f"/console/reviews/{review.public_id}/").content.decode()

    section = page[page.index("Screening, as the review saw it") :].split("</section>")[0]
    assert '<th scope="row">cyber</th><td>1</td><td>0</td>' in section
    assert '<th scope="row">weapons</th><td>0</td><td>1</td>' in section
    assert "<dt>samples pending</dt><dd>1</dd>" in section
