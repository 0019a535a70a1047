"""The usage page: per release, stage, tier and org over a period, from the rollups only."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from monitoring.models import UsageEvent, UsageRollup
from monitoring.rollups import rollup_pending
from monitoring.usage import write_events
from monitoring.usage_report import UsageFigures, usage_report
from tests.factories import usage_event

pytestmark = pytest.mark.django_db

KEY_SHAPED = "sgk_0123456789abcdef_" + "A" * 40


@pytest.fixture
def browser():
    return Client()


@pytest.fixture
def viewer(browser, vera):
    browser.force_login(vera)
    return browser


def _hour_ago(hours: float) -> datetime:
    now = timezone.now().astimezone(UTC)
    return now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours)


@pytest.fixture
def traffic(release, northwind, acme):
    """A known set of events over the last few hours, rolled up: northwind admitted 6
    times (1 error, 2 flagged), refused once; acme refused twice (its tier is not in the
    first stage); and one northwind request outside the last 24 hours."""
    stage = release.current_stage

    def event(at, org, **fields):
        return usage_event(
            at=at,
            release=release.name,
            stage=stage,
            org=org.public_id,
            tier=org.tier,
            request_id=f"req-{at.timestamp():.0f}-{org.slug[:4]}",
            **fields,
        )

    base = _hour_ago(3)
    events = [
        event(base + timedelta(minutes=5), northwind),
        event(base + timedelta(minutes=7), northwind, flagged=True),
        event(base + timedelta(minutes=65), northwind, status=502, error="upstream_error"),
        event(base + timedelta(minutes=66), northwind, flagged=True, prompt_tokens=100),
        event(base + timedelta(minutes=130), northwind),
        event(base + timedelta(minutes=131), northwind),
        event(
            base + timedelta(minutes=70),
            northwind,
            decision="deny",
            reason="rate_limited",
            status=429,
            prompt_tokens=0,
            completion_tokens=0,
        ),
        *(
            event(
                base + timedelta(minutes=10 + n),
                acme,
                decision="deny",
                reason="model_not_available",
                status=404,
                prompt_tokens=0,
                completion_tokens=0,
            )
            for n in range(2)
        ),
        event(_hour_ago(30), northwind),
    ]
    write_events(events)
    rollup_pending(now=timezone.now())
    return events


def _table(content: bytes) -> str:
    text = content.decode()
    return text[text.index('id="usage-totals"') :]


# --- Who may open it ------------------------------------------------------------------------


def test_anonymous_is_sent_to_the_login_page(browser):
    answer = browser.get("/console/usage/")
    assert (answer.status_code, answer["Location"]) == (
        302,
        "/console/login/?next=/console/usage/",
    )


def test_anonymous_cannot_download_the_csv(browser):
    assert browser.get("/console/usage/csv/").status_code == 302


@pytest.mark.parametrize("who", ["oscar", "olga", "nobody"])
def test_org_admins_and_users_without_a_role_are_refused(browser, who, request):
    browser.force_login(request.getfixturevalue(who))
    assert browser.get("/console/usage/").status_code == 403
    assert browser.get("/console/usage/csv/").status_code == 403


@pytest.mark.parametrize("who", ["ada", "rita", "vera"])
def test_every_staff_role_sees_the_page(browser, who, request, traffic):
    browser.force_login(request.getfixturevalue(who))
    answer = browser.get("/console/usage/")
    assert answer.status_code == 200
    assert b"<svg" in answer.content
    assert b"<title>Requests per hour</title>" in answer.content


# --- What it shows ---------------------------------------------------------------------------


def test_totals_by_tier_count_the_known_events(viewer, traffic):
    answer = viewer.get("/console/usage/", {"range": "24h", "group_by": "tier"})
    assert answer.status_code == 200
    report = answer.context["report"]
    assert report.groups == [
        (
            "research_partner",
            UsageFigures(
                requests=7,
                allowed=6,
                denied=1,
                errors=1,
                flagged=2,
                prompt_tokens=150,
                completion_tokens=120,
            ),
        ),
        ("verified_commercial", UsageFigures(requests=2, denied=2)),
    ]
    assert report.total == UsageFigures(
        requests=9,
        allowed=6,
        denied=3,
        errors=1,
        flagged=2,
        prompt_tokens=150,
        completion_tokens=120,
    )
    table = _table(answer.content)
    assert "research_partner" in table
    assert "16.7%" in table  # 1 error in 6 admitted
    assert "33.3%" in table  # 2 flagged in 6 admitted


def test_totals_match_the_rollups(viewer, traffic):
    """The page's total over a week equals the sum of every hour row written (every
    event is within the week, some at partial hours)."""
    report = viewer.get("/console/usage/", {"range": "7d"}).context["report"]
    hours = UsageRollup.objects.filter(bucket_seconds=UsageRollup.HOUR)
    assert report.total.requests == sum(hours.values_list("requests", flat=True)) == 10
    assert report.total.allowed == sum(hours.values_list("allowed", flat=True)) == 7


def test_the_period_edges_read_minute_rows(traffic, release):
    """A period that starts and ends inside hours counts the minutes at its edges."""
    base = _hour_ago(3)
    report = usage_report(since=base + timedelta(minutes=6), until=base + timedelta(minutes=66))
    # 07 (flagged) and 10, 11 (acme), 65 (error), 70 is outside; the one at 66 too.
    assert (report.total.requests, report.total.allowed, report.total.denied) == (4, 2, 2)


def test_totals_by_organization_name_them_by_slug(viewer, traffic):
    answer = viewer.get("/console/usage/", {"range": "24h", "group_by": "org"})
    report = answer.context["report"]
    assert [key for key, _ in report.groups] == [
        traffic[0][2],  # northwind's public id
        traffic[7][2],  # acme's
    ]
    table = _table(answer.content)
    assert "northwind-research" in table
    assert "acme-commercial" in table


def test_filters_narrow_by_org_and_tier(viewer, traffic):
    by_org = viewer.get("/console/usage/", {"range": "24h", "org": "acme-commercial"})
    assert by_org.context["report"].total == UsageFigures(requests=2, denied=2)
    by_tier = viewer.get("/console/usage/", {"range": "24h", "tier": "verified_commercial"})
    assert by_tier.context["report"].total == UsageFigures(requests=2, denied=2)
    by_stage = viewer.get("/console/usage/", {"range": "24h", "stage": "general"})
    assert by_stage.context["report"].total == UsageFigures()


def test_the_requests_chart_stacks_admitted_and_refused(viewer, traffic):
    answer = viewer.get("/console/usage/", {"range": "24h"})
    text = answer.content.decode()
    chart = text[text.index("<title>Requests per hour</title>") :]
    chart = chart[: chart.index("</svg>")]
    assert chart.count("<title>admitted ") == 3  # three hours with admitted requests
    assert chart.count("<title>refused ") == 2
    assert len(answer.context["report"].series) in (24, 25)  # partial hours at both ends


def test_a_month_is_drawn_in_days(viewer, traffic):
    answer = viewer.get("/console/usage/", {"range": "30d"})
    assert answer.status_code == 200
    assert len(answer.context["report"].series) in (30, 31)  # the first day is partial
    assert b"<title>Requests per day</title>" in answer.content


def test_dates_choose_whole_days(viewer, traffic):
    today = timezone.now().date()
    answer = viewer.get(
        "/console/usage/",
        {"start": (today - timedelta(days=2)).isoformat(), "end": today.isoformat()},
    )
    report = answer.context["report"]
    assert report.since == datetime.combine(today - timedelta(days=2), datetime.min.time(), UTC)
    assert report.total.requests == 10


def test_an_empty_range_says_so(viewer, release):
    answer = viewer.get("/console/usage/")
    assert answer.status_code == 200
    assert b"No data in this range yet." in answer.content
    assert b"No usage in this range for these filters." in answer.content


# --- Never the raw events, and bounded queries -----------------------------------------------


def _queries(client, params) -> list[str]:
    with CaptureQueriesContext(connection) as captured:
        answer = client.get("/console/usage/", params)
        assert answer.status_code == 200
    return [query["sql"] for query in captured.captured_queries]


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"range": "24h", "group_by": "org"},
        {"range": "30d", "tier": "research_partner", "org": "northwind-research"},
    ],
)
def test_the_page_never_reads_raw_usage_events(viewer, traffic, params):
    table = UsageEvent._meta.db_table
    assert table == "monitoring_usageevent"
    queries = _queries(viewer, params)
    assert [sql for sql in queries if table in sql] == []
    assert any(UsageRollup._meta.db_table in sql for sql in queries)


def test_the_csv_never_reads_raw_usage_events(viewer, traffic):
    with CaptureQueriesContext(connection) as captured:
        assert viewer.get("/console/usage/csv/").status_code == 200
    assert [q["sql"] for q in captured if "monitoring_usageevent" in q["sql"]] == []


def test_queries_do_not_grow_with_the_events(viewer, release, northwind, django_assert_num_queries):
    def add(count: int) -> None:
        start = _hour_ago(20)
        write_events(
            [
                usage_event(
                    at=start + timedelta(seconds=37 * n),
                    release=release.name,
                    stage=release.current_stage,
                    org=northwind.public_id,
                    tier=northwind.tier,
                    request_id=f"r{count}-{n}",
                )
                for n in range(count)
            ]
        )
        rollup_pending(now=timezone.now())

    add(10)
    few = _queries(viewer, {"range": "7d", "group_by": "org"})
    add(1000)
    many = _queries(viewer, {"range": "7d", "group_by": "org"})
    assert len(many) == len(few)
    # session, user, roles (guard and navigation), releases, orgs, series, groups, cursor
    with django_assert_num_queries(len(few)):
        viewer.get("/console/usage/", {"range": "7d", "group_by": "org"})
    assert len(few) <= 10


# --- Hostile input -----------------------------------------------------------------------------

HOSTILE = [
    "nul\x00byte",
    "9" * 400,
    "1e309",
    "-1",
    "x" * 10_000,
    KEY_SHAPED,
    "<script>alert(1)</script>",
    "' OR 1=1 --",
]


@pytest.mark.parametrize("field", ["release", "stage", "tier", "org", "range", "group_by"])
@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_filters_get_a_form_error(viewer, release, northwind, field, value):
    answer = viewer.get("/console/usage/", {field: value})
    assert answer.status_code == 400
    assert answer.context["form"].errors[field]
    assert "report" not in answer.context
    assert b"<script>alert" not in answer.content
    assert KEY_SHAPED.encode() not in answer.content
    assert viewer.get("/console/usage/csv/", {field: value}).status_code == 400


@pytest.mark.parametrize("field", ["start", "end"])
@pytest.mark.parametrize(
    "value",
    [*HOSTILE, "0001-01-01", "9999-12-31", "1999-12-31", "2026-02-30", "99999-01-01", "2026-1"],
)
def test_hostile_dates_get_a_form_error(viewer, release, field, value):
    today = timezone.now().date().isoformat()
    params = {"start": today, "end": today, field: value}
    answer = viewer.get("/console/usage/", params)
    assert answer.status_code == 400
    assert answer.context["form"].errors[field]
    assert b"<script>alert" not in answer.content


@pytest.mark.parametrize(
    ("params", "field", "message"),
    [
        ({"start": "2026-01-10"}, "end", "Give both dates, or neither."),
        ({"end": "2026-01-10"}, "start", "Give both dates, or neither."),
        ({"start": "2026-01-10", "end": "2026-01-09"}, "end", "The To date is before"),
        ({"start": "2026-01-01", "end": "2026-06-01"}, "end", "Choose at most 92 days."),
    ],
)
def test_inconsistent_dates_get_a_form_error(viewer, release, params, field, message):
    answer = viewer.get("/console/usage/", params)
    assert answer.status_code == 400
    assert message in " ".join(answer.context["form"].errors[field])


def test_repeated_and_unknown_parameters_are_harmless(viewer, release):
    answer = viewer.get("/console/usage/?range=24h&range=7d&unknown=%00&group_by=tier")
    assert answer.status_code == 200


# --- CSV ----------------------------------------------------------------------------------------


def test_the_csv_holds_the_table(viewer, traffic):
    answer = viewer.get("/console/usage/csv/", {"range": "24h", "group_by": "org"})
    assert answer.status_code == 200
    assert answer["Content-Type"] == "text/csv; charset=utf-8"
    assert answer["Content-Disposition"].startswith('attachment; filename="usage-')
    assert answer["Content-Disposition"].endswith('-by-org.csv"')
    rows = list(csv.reader(io.StringIO(answer.content.decode())))
    assert rows == [
        [
            "organization",
            "requests",
            "admitted",
            "refused",
            "errors",
            "error_rate",
            "flagged",
            "flag_rate",
            "prompt_tokens",
            "completion_tokens",
        ],
        ["northwind-research", "7", "6", "1", "1", "0.166667", "2", "0.333333", "150", "120"],
        ["acme-commercial", "2", "0", "2", "0", "", "0", "", "0", "0"],
        ["total", "9", "6", "3", "1", "0.166667", "2", "0.333333", "150", "120"],
    ]


def test_the_page_links_to_the_csv_of_its_filters(viewer, traffic):
    answer = viewer.get("/console/usage/", {"range": "24h", "group_by": "org", "tier": ""})
    assert b'href="/console/usage/csv/?group_by=org&amp;range=24h"' in answer.content


def test_csv_cells_never_start_a_formula(viewer, release):
    """A group key from the rollups (an org id no organization has any more) that looks
    like a formula is written as text."""
    write_events(
        [
            usage_event(
                at=_hour_ago(1),
                release=release.name,
                stage=release.current_stage,
                org="=HYPERLINK(1)",
                tier="public",
                request_id="req-formula",
            )
        ]
    )
    rollup_pending(now=timezone.now())
    answer = viewer.get("/console/usage/csv/", {"range": "24h", "group_by": "org"})
    rows = list(csv.reader(io.StringIO(answer.content.decode())))
    assert rows[1][0] == "'=HYPERLINK(1)"


def test_chart_text_is_escaped_and_numbers_keep_their_format():
    from console.charts import Series, bar_chart

    moment = datetime(2026, 11, 1, tzinfo=UTC)
    svg = bar_chart(
        title="<script>t</script>",
        series=[Series("<b>admitted</b>", [(moment, 2.5), (moment + timedelta(hours=1), 1)])],
        bucket_seconds=3600,
    )
    assert "<script>" not in svg
    assert "&lt;script&gt;t&lt;/script&gt;" in svg
    assert "&lt;b&gt;admitted&lt;/b&gt; 2026-11-01 00:00: 2.5" in svg
    assert ' y="' in svg
    assert ".0000" not in svg  # coordinates to one decimal
