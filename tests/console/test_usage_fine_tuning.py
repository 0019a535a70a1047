"""The usage page's fine-tuning section and its CSV (console/views/usage.py,
``console.tuning_selectors.fine_tuning_usage``): per (release, stage, tier, organization)
over the page's period and filters, jobs by ``created_at``, screenings by
``screened_at``, assessments by ``created_at``; staff only, in a fixed number of queries.

Cast: atlas-2 in research_preview (the shared ``release``), atlas-mini (the other
release, tests/rollout/mini_cast.py), northwind (research partner) and acme (verified
commercial). Jobs are built with the ORM as the runner leaves them.
"""

from __future__ import annotations

import csv
import hashlib
import io
from datetime import datetime, timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from access.models import Organization
from console.tuning_selectors import FineTuningUsageRow, fine_tuning_usage
from rollout.models import Release
from rollout.plans import apply_plan
from tests import factories
from tests.rollout.mini_cast import PLAN as MINI_PLAN
from tuning.models import Assessment, FineTuningJob, TrainingFile

pytestmark = pytest.mark.django_db

PAGE = "/console/usage/"
CSV = "/console/usage/fine-tuning/csv/"
HEADER = [
    "release",
    "stage",
    "tier",
    "organization",
    "training_files",
    "jobs_created",
    "screened_accept",
    "screened_accept_filtered",
    "screened_hold",
    "screened_reject",
    "held_approved",
    "held_rejected",
    "assessments_passed",
    "assessments_failed",
]


def _ago(hours: float) -> datetime:
    return timezone.now() - timedelta(hours=hours)


def training_file(org: Organization, tag: str) -> TrainingFile:
    data = b'{"messages": [{"role": "user", "content": "' + tag.encode() + b'"}]}\n'
    return TrainingFile.objects.create(
        organization=org,
        filename="train.jsonl",
        bytes=len(data),
        rows=1,
        sha256=hashlib.sha256(data).hexdigest(),
        content=data,
    )


def job(
    release: Release,
    org: Organization,
    *,
    created: float,
    verdict: str = "",
    screened: float | None = None,
    review: str = "",
    stage: str = "research_preview",
    file: TrainingFile | None = None,
) -> FineTuningJob:
    """A job of ``org`` created ``created`` hours ago, screened with ``verdict``
    ``screened`` hours ago (when it was created if not given; never when ``verdict`` is
    ""), its held dataset's review at ``review``."""
    made_at = _ago(created)
    made = FineTuningJob.objects.create(
        organization=org,
        release=release,
        stage=stage,
        tier=org.tier,
        plan_version=1,
        training_file=file or training_file(org, f"{release.name}-{created}-{verdict}"),
        seed=7,
        verdict=verdict,
        screened_at=(made_at if screened is None else _ago(screened)) if verdict else None,
        dataset_review=review,
    )
    FineTuningJob.objects.filter(pk=made.pk).update(created_at=made_at)  # auto_now_add
    made.refresh_from_db()
    return made


def assess(of: FineTuningJob, *, passed: bool, hours: float) -> Assessment:
    """An assessment run ``hours`` ago of the tuned model ``of`` made (made here once)."""
    return factories.assess(of, passed=passed, at=_ago(hours))


@pytest.fixture
def mini(release, ada) -> Release:
    apply_plan(MINI_PLAN, actor=ada)
    return Release.objects.get(name="atlas-mini")


@pytest.fixture
def fine_tuning(release, mini, northwind, acme) -> None:
    """In the last 24 hours, northwind on atlas-2: six jobs on five files (two share
    one), screened accept, accept_filtered and three holds (one released, one rejected,
    one pending), one not screened, an assessment passed and one failed. Before it,
    30 hours ago: a northwind job screened reject and an acme job screened (reject) only
    2 hours ago. acme on atlas-mini in commercial: one job accepted in the period."""
    accepted = job(release, northwind, created=2, verdict="accept")
    job(release, northwind, created=4, verdict="accept_filtered", file=accepted.training_file)
    job(release, northwind, created=3, verdict="hold", review="approved")
    job(release, northwind, created=3, verdict="hold", review="rejected")
    job(release, northwind, created=3, verdict="hold", review="pending")
    job(release, northwind, created=1)
    assess(accepted, passed=True, hours=1)
    assess(accepted, passed=False, hours=0.5)
    old = job(release, northwind, created=30, verdict="reject")
    assess(old, passed=False, hours=29)
    job(release, acme, created=30, verdict="reject", screened=2)
    job(mini, acme, created=1, verdict="accept", stage="commercial")


@pytest.fixture
def viewer(vera) -> Client:
    browser = Client()
    browser.force_login(vera)
    return browser


NORTHWIND_DAY = FineTuningUsageRow(
    "atlas-2",
    "research_preview",
    "research_partner",
    "northwind-research",
    files=5,
    jobs=6,
    screened={"accept": 1, "accept_filtered": 1, "hold": 3, "reject": 0},
    datasets_approved=1,
    datasets_rejected=1,
    assessments_passed=1,
    assessments_failed=1,
)
ACME_DAY = FineTuningUsageRow(
    "atlas-2",
    "research_preview",
    "verified_commercial",
    "acme-commercial",
    screened={"accept": 0, "accept_filtered": 0, "hold": 0, "reject": 1},
)
ACME_MINI_DAY = FineTuningUsageRow(
    "atlas-mini",
    "commercial",
    "verified_commercial",
    "acme-commercial",
    files=1,
    jobs=1,
    screened={"accept": 1, "accept_filtered": 0, "hold": 0, "reject": 0},
)


# --- What it counts --------------------------------------------------------------------------


def test_the_page_counts_a_day_per_release_stage_tier_and_org(viewer, fine_tuning):
    answer = viewer.get(PAGE, {"range": "24h"})
    assert answer.status_code == 200
    assert answer.context["fine_tuning"] == [NORTHWIND_DAY, ACME_DAY, ACME_MINI_DAY]
    assert answer.context["fine_tuning_total"] == [6, 7, 2, 1, 3, 1, 1, 1, 1, 1]
    text = answer.content.decode()
    section = text[text.index('id="usage-fine-tuning"') :]
    assert "northwind-research" in section
    assert "atlas-mini" in section
    assert "No fine-tuning in this range" not in section


def test_a_job_before_the_period_is_counted_only_in_a_longer_one(viewer, fine_tuning):
    """northwind's job of 30 hours ago (screened reject then, assessed 29 hours ago) is
    outside the last day and inside the last week."""
    week = viewer.get(PAGE, {"range": "7d"}).context["fine_tuning"]
    northwind = week[0]
    assert (northwind.org, northwind.files, northwind.jobs) == ("northwind-research", 6, 7)
    assert northwind.screened == {"accept": 1, "accept_filtered": 1, "hold": 3, "reject": 1}
    assert (northwind.assessments_passed, northwind.assessments_failed) == (1, 2)
    acme = week[1]  # its job created 30 hours ago now counts as created
    assert (acme.org, acme.files, acme.jobs, acme.screened["reject"]) == (
        "acme-commercial",
        1,
        1,
        1,
    )


def test_the_period_bounds_are_half_open(release, northwind):
    """A job created at ``until`` is not counted; one created at ``since`` is."""
    at_start = job(release, northwind, created=10, verdict="accept")
    at_end = job(release, northwind, created=5)
    rows = fine_tuning_usage(since=at_start.created_at, until=at_end.created_at)
    assert [(row.jobs, row.screened["accept"]) for row in rows] == [(1, 1)]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"release": "atlas-mini"}, [ACME_MINI_DAY]),
        ({"stage": "research_preview"}, [NORTHWIND_DAY, ACME_DAY]),
        ({"tier": "research_partner"}, [NORTHWIND_DAY]),
        ({"org": "acme-commercial"}, [ACME_DAY, ACME_MINI_DAY]),
        ({"release": "atlas-2", "org": "acme-commercial"}, [ACME_DAY]),
        ({"tier": "public"}, []),
    ],
)
def test_the_page_filters_apply(viewer, fine_tuning, params, expected):
    answer = viewer.get(PAGE, {"range": "24h", **params})
    assert answer.status_code == 200
    assert answer.context["fine_tuning"] == expected


def test_nothing_in_the_range_says_so(viewer, release):
    answer = viewer.get(PAGE)
    assert answer.context["fine_tuning"] == []
    assert answer.context["fine_tuning_total"] == [0] * 10
    assert b"No fine-tuning in this range for these filters." in answer.content


def test_dates_choose_whole_days(viewer, fine_tuning):
    """Two days ago (from its midnight, at least 48 hours back) to today: the jobs of
    30 hours ago are in."""
    today = timezone.now().date()
    since = (today - timedelta(days=2)).isoformat()
    answer = viewer.get(PAGE, {"start": since, "end": today.isoformat()})
    assert answer.status_code == 200
    assert answer.context["fine_tuning"][0].jobs == 7


# --- Bounded queries ---------------------------------------------------------------------------


def _queries(client, params, url: str = PAGE) -> list[str]:
    with CaptureQueriesContext(connection) as captured:
        assert client.get(url, params).status_code == 200
    return [query["sql"] for query in captured.captured_queries]


def test_queries_do_not_grow_with_the_jobs(
    viewer, release, mini, northwind, acme, django_assert_num_queries
):
    def add(count: int) -> None:
        for n in range(count):
            made = job(release if n % 2 else mini, northwind if n % 3 else acme, created=1 + n % 5)
            if n % 4 == 0:
                assess(made, passed=bool(n % 8), hours=1)

    add(3)
    few = _queries(viewer, {"range": "7d"})
    few_csv = _queries(viewer, {"range": "7d"}, CSV)
    add(30)
    many = _queries(viewer, {"range": "7d"})
    assert len(many) == len(few)
    tuning = [sql for sql in many if "tuning_finetuningjob" in sql or "tuning_assessment" in sql]
    assert len(tuning) == 2  # one grouped query on the jobs, one on the assessments
    # the usage page's own ten at most (tests/console/test_usage.py), and these two
    assert len(few) <= 12
    with django_assert_num_queries(len(few)):
        viewer.get(PAGE, {"range": "7d"})
    with django_assert_num_queries(len(few_csv)):
        viewer.get(CSV, {"range": "7d"})
    assert len(few_csv) < len(few)  # no rollups read


# --- Who may see it ------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["oscar", "olga", "nobody"])
def test_org_admins_and_users_without_a_role_are_refused(who, request, fine_tuning):
    """The usage page is for staff: an org admin sees no fine-tuning there, not even
    their own organization's."""
    browser = Client()
    browser.force_login(request.getfixturevalue(who))
    assert browser.get(PAGE, {"range": "24h"}).status_code == 403
    answer = browser.get(CSV, {"range": "24h"})
    assert answer.status_code == 403
    assert b"northwind-research" not in answer.content


def test_anonymous_is_sent_to_the_login_page():
    answer = Client().get(CSV)
    assert (answer.status_code, answer["Location"]) == (
        302,
        "/console/login/?next=/console/usage/fine-tuning/csv/",
    )


@pytest.mark.parametrize("who", ["ada", "rita", "vera"])
def test_every_staff_role_sees_the_section(who, request, fine_tuning):
    browser = Client()
    browser.force_login(request.getfixturevalue(who))
    answer = browser.get(PAGE, {"range": "24h"})
    assert answer.status_code == 200
    assert answer.context["fine_tuning"] == [NORTHWIND_DAY, ACME_DAY, ACME_MINI_DAY]


# --- CSV ---------------------------------------------------------------------------------------


def test_the_csv_holds_the_table(viewer, fine_tuning):
    answer = viewer.get(CSV, {"range": "24h"})
    assert answer.status_code == 200
    assert answer["Content-Type"] == "text/csv; charset=utf-8"
    assert answer["Content-Disposition"].startswith('attachment; filename="usage-fine-tuning-')
    rows = list(csv.reader(io.StringIO(answer.content.decode())))
    assert rows == [
        HEADER,
        [
            "atlas-2",
            "research_preview",
            "research_partner",
            "northwind-research",
            *["5", "6", "1", "1", "3", "0", "1", "1", "1", "1"],
        ],
        [
            "atlas-2",
            "research_preview",
            "verified_commercial",
            "acme-commercial",
            *["0", "0", "0", "0", "0", "1", "0", "0", "0", "0"],
        ],
        [
            "atlas-mini",
            "commercial",
            "verified_commercial",
            "acme-commercial",
            *["1", "1", "1", "0", "0", "0", "0", "0", "0", "0"],
        ],
        ["total", "", "", "", *["6", "7", "2", "1", "3", "1", "1", "1", "1", "1"]],
    ]


def test_the_csv_applies_the_filters(viewer, fine_tuning):
    answer = viewer.get(CSV, {"range": "24h", "tier": "research_partner"})
    rows = list(csv.reader(io.StringIO(answer.content.decode())))
    assert [row[3] for row in rows] == ["organization", "northwind-research", ""]


def test_the_totals_csv_keeps_its_shape(viewer, fine_tuning):
    """Fine-tuning has a CSV of its own: the totals CSV's header is unchanged."""
    rows = list(csv.reader(io.StringIO(viewer.get("/console/usage/csv/").content.decode())))
    assert rows[0] == [
        "tier",
        "requests",
        "admitted",
        "refused",
        "errors",
        "error_rate",
        "flagged",
        "flag_rate",
        "prompt_tokens",
        "completion_tokens",
    ]


def test_the_page_links_to_the_csv_of_its_filters(viewer, fine_tuning):
    answer = viewer.get(PAGE, {"range": "24h", "org": "acme-commercial"})
    assert (
        b'href="/console/usage/fine-tuning/csv/?org=acme-commercial&amp;group_by=tier&amp;range=24h"'
        in answer.content
    )


@pytest.mark.parametrize("field", ["release", "stage", "tier", "org", "range"])
def test_hostile_filters_get_a_form_error(viewer, release, field):
    answer = viewer.get(CSV, {field: "<script>alert(1)</script>"})
    assert answer.status_code == 400
    assert answer.context["form"].errors[field]
    assert b"<script>alert" not in answer.content
