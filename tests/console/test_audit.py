"""The audit page: search, keyset pages, before and after, the chain's verification
status, and CSV / JSON lines exports of the selected rows."""

from __future__ import annotations

import csv
import io
import json

import pytest
from django.core.cache import cache
from django.db import transaction
from django.test import Client

from access.organizations import update_organization
from monitoring import audit
from monitoring.audit_log import VERIFICATION_CACHE_KEY, describe

pytestmark = pytest.mark.django_db

URL = "/console/audit/"
KEY_SHAPED = "sgk_0123456789abcdef_" + "A" * 40


@pytest.fixture(autouse=True)
def _no_cached_verification():
    cache.delete(VERIFICATION_CACHE_KEY)
    yield
    cache.delete(VERIFICATION_CACHE_KEY)


@pytest.fixture
def browser():
    return Client()


def rows(count: int, *, action: str = "test.thing", actor: str = "tester") -> None:
    with transaction.atomic():
        for n in range(count):
            audit.record(
                action, actor=actor, object_type="thing", object_id=f"thing_{n}", data={"n": n}
            )


def seqs(page: str) -> list[int]:
    """The row numbers a page shows, in order."""
    import re

    return [int(n) for n in re.findall(r"<tr>\s*<td>(\d+)</td>", page)]


def test_anonymous_is_sent_to_the_login_page(browser):
    for url in (URL, f"{URL}export.csv", f"{URL}export.jsonl"):
        answer = browser.get(url)
        assert (answer.status_code, answer["Location"]) == (302, f"/console/login/?next={url}")


@pytest.mark.parametrize("who", ["oscar", "olga", "nobody"])
def test_the_audit_log_is_for_staff(browser, who, request):
    browser.force_login(request.getfixturevalue(who))
    for url in (URL, f"{URL}export.csv", f"{URL}export.jsonl"):
        assert browser.get(url).status_code == 403
    assert browser.post(f"{URL}verify/").status_code == 403


@pytest.mark.parametrize("who", ["rita", "vera"])
def test_readers_see_the_log_but_cannot_run_the_verification(browser, who, request):
    rows(3)
    browser.force_login(request.getfixturevalue(who))
    page = browser.get(URL).content.decode()
    assert seqs(page)[:3] == [3, 2, 1]
    assert "Verify the chain now" not in page
    assert browser.post(f"{URL}verify/").status_code == 403
    assert cache.get(VERIFICATION_CACHE_KEY) is None


def test_a_rollout_admin_verifies_the_chain_and_the_page_shows_the_result(browser, ada):
    rows(3)
    browser.force_login(ada)
    assert "Not verified since" in browser.get(URL).content.decode()
    answer = browser.post(f"{URL}verify/", follow=True)
    text = answer.content.decode()
    assert "The audit chain is intact: 3 rows checked." in text
    assert "<strong>Intact</strong>: 3 rows checked" in text
    assert "up to row #3" in text


def test_search_by_actor_action_object_and_text(browser, vera, northwind, ada):
    rows(2, action="test.thing", actor="tester")
    rows(1, action="other.thing", actor="someone")
    update_organization(northwind, name="Northwind Labs", actor=ada)
    browser.force_login(vera)

    def found(**query) -> list[int]:
        return seqs(browser.get(URL, query).content.decode())

    # 1: org.created? no: make_org writes no audit row; rows are 1..4
    assert found(actor="someone") == [3]
    assert found(action="test.thing") == [2, 1]
    assert found(action="test.") == [2, 1]
    assert found(object_type="thing", object_id="thing_1") == [2]
    assert found(q="northwind labs") == [4]
    assert found(actor="nobody-at-all") == []


def test_a_change_shows_its_before_and_after(browser, vera, northwind, ada):
    update_organization(northwind, name="Northwind Labs", actor=ada)
    browser.force_login(vera)
    page = browser.get(URL, {"action": "org.updated"}).content.decode()
    assert (
        '<td>name</td><td class="del">Northwind Research</td><td class="add">Northwind Labs</td>'
    ) in page
    assert "<dt>slug</dt><dd>northwind-research</dd>" in page


def test_describe_reads_every_shape_the_services_write():
    assert describe({"from_stage": "a", "to_stage": "b", "reason": "go"}) == (
        [("stage", "a", "b")],
        [("reason", "go")],
    )
    assert describe({"release": "atlas-2", "from": "public", "to": "research_partner"}) == (
        [("value", "public", "research_partner")],
        [("release", "atlas-2")],
    )
    changes, fields = describe({"before": {"a": 1, "b": 2}, "after": {"a": 1, "b": 3}})
    assert (changes, fields) == ([("b", "2", "3")], [])
    assert describe({"nested": {"x": [1, None]}}) == ([], [("nested", '{"x": [1, null]}')])


def test_keyset_pages_walk_the_whole_log(browser, vera):
    rows(120)
    browser.force_login(vera)
    first = browser.get(URL).content.decode()
    assert seqs(first) == list(range(120, 70, -1))
    assert "after=" not in first
    second = browser.get(URL, {"before": 71}).content.decode()
    assert seqs(second) == list(range(70, 20, -1))
    third = browser.get(URL, {"before": 21}).content.decode()
    assert seqs(third) == list(range(20, 0, -1))
    assert "before=" not in third
    back = browser.get(URL, {"after": 70}).content.decode()
    assert seqs(back) == list(range(120, 70, -1))
    assert "after=" not in back


def test_pages_keep_the_search(browser, vera):
    rows(60, action="test.a")
    rows(60, action="test.b")
    browser.force_login(vera)
    page = browser.get(URL, {"action": "test.a"}).content.decode()
    assert seqs(page) == list(range(60, 10, -1))
    assert "?action=test.a&amp;before=11" in page


def test_csv_export_holds_the_selected_rows(browser, vera):
    rows(3, action="test.a")
    rows(2, action="test.b")
    browser.force_login(vera)
    answer = browser.get(f"{URL}export.csv", {"action": "test.a"})
    assert answer.status_code == 200
    assert answer["Content-Type"] == "text/csv; charset=utf-8"
    assert answer["Content-Disposition"].startswith('attachment; filename="audit-')
    table = list(csv.reader(io.StringIO(b"".join(answer.streaming_content).decode())))
    assert table[0] == [
        "seq",
        "created_at",
        "actor",
        "action",
        "object_type",
        "object_id",
        "data",
        "hash",
    ]
    assert [(r[0], r[3], r[5], r[6]) for r in table[1:]] == [
        ("3", "test.a", "thing_2", '{"n": 2}'),
        ("2", "test.a", "thing_1", '{"n": 1}'),
        ("1", "test.a", "thing_0", '{"n": 0}'),
    ]


def test_csv_export_defuses_formulas(browser, vera):
    with transaction.atomic():
        audit.record("test.a", actor="=cmd()", object_type="thing", object_id="@x", data={})
    browser.force_login(vera)
    table = list(
        csv.reader(
            io.StringIO(b"".join(browser.get(f"{URL}export.csv").streaming_content).decode())
        )
    )
    assert (table[1][2], table[1][5]) == ("'=cmd()", "'@x")


def test_jsonl_export_holds_the_selected_rows(browser, vera):
    rows(3, action="test.a")
    rows(2, action="test.b", actor="other")
    browser.force_login(vera)
    answer = browser.get(f"{URL}export.jsonl", {"actor": "other"})
    assert answer["Content-Type"] == "application/x-ndjson; charset=utf-8"
    lines = [json.loads(line) for line in b"".join(answer.streaming_content).splitlines()]
    assert [(line["seq"], line["action"], line["data"]) for line in lines] == [
        (5, "test.b", {"n": 1}),
        (4, "test.b", {"n": 0}),
    ]


def test_a_bad_export_filter_is_a_400(browser, vera):
    browser.force_login(vera)
    answer = browser.get(f"{URL}export.jsonl", {"actor": "\x00"})
    assert answer.status_code == 400
    assert answer.content.startswith(b"Refused: actor:")


HOSTILE = [
    "\x00",
    "x" * 10_000,
    KEY_SHAPED,
    "<script>alert(1)</script>",
    "99999999999999999999999",
    "-1",
]


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize(
    "name", ["actor", "action", "object_type", "object_id", "q", "before", "after"]
)
def test_hostile_filters_are_form_errors_or_empty(browser, vera, name, value):
    rows(2)
    browser.force_login(vera)
    for url in (URL, f"{URL}export.csv", f"{URL}export.jsonl"):
        answer = browser.get(url, {name: value})
        assert answer.status_code in (200, 400)
        body = (b"".join(answer.streaming_content) if answer.streaming else answer.content).decode()
        assert "<script>alert" not in body
        assert "A" * 40 not in body  # a secret is never echoed back
        if url == URL and answer.status_code == 200 and 'role="alert"' not in body:
            assert seqs(body) == []  # accepted: a search that finds nothing


@pytest.mark.parametrize("count", [5, 60])
def test_the_page_runs_a_fixed_number_of_queries(browser, vera, count, django_assert_num_queries):
    rows(count)
    browser.force_login(vera)
    browser.get(URL)
    with django_assert_num_queries(QUERIES):
        assert browser.get(URL, {"action": "test.thing"}).status_code == 200
    with django_assert_num_queries(QUERIES + 1):  # free text first reads the chain's tail
        assert browser.get(URL, {"q": "thing", "before": 3}).status_code == 200


QUERIES = 4  # session, user, roles, the page
