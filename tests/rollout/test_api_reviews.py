"""The reviews of the REST API (``rollout.api``): listing newest first, a review's
approvals until it is superseded, and query counts that do not grow with the rows.

Cast: tests/rollout/mini_cast.py (atlas-mini).
"""

from __future__ import annotations

from rollout import transitions
from tests.rollout.mini_cast import healthy_traffic, review_now


def test_review_list_of_a_release_is_newest_first(mini, release, login_as, vera):
    first, second, third = review_now(mini), review_now(mini), review_now(mini)
    review_now(release)

    response = login_as(vera).get("/api/reviews/", {"release": "atlas-mini"})

    assert response.status_code == 200
    assert [r["public_id"] for r in response.json()["results"]] == [
        third.public_id,
        second.public_id,
        first.public_id,
    ]


def test_review_detail_shows_approvals_until_superseded(mini, login_as, ada, rita, vera):
    healthy_traffic(mini)
    review = review_now(mini, ada)
    transitions.approve(review, reviewer=rita, comment="numbers look fine")
    client = login_as(vera)

    current = client.get(f"/api/reviews/{review.public_id}/").json()
    review_now(mini)
    superseded = client.get(f"/api/reviews/{review.public_id}/").json()

    assert [
        (a["reviewer"], a["verdict"], a["comment"], a["stage"], a["plan_version"])
        for a in current["approvals"]
    ] == [("rita", "approve", "numbers look fine", "research_preview", 1)]
    assert (current["approvals_counted"], current["stale"], current["transition"]) == (
        1,
        None,
        None,
    )
    assert (superseded["approvals_counted"], superseded["stale"]) == (1, "review_superseded")


def test_review_list_queries_do_not_grow_with_the_rows(
    mini, login_as, ada, vera, django_assert_max_num_queries
):
    client = login_as(vera)
    review_now(mini, ada)
    client.get("/api/reviews/")  # warm up: later requests make the same session lookups

    with django_assert_max_num_queries(4) as one:
        listed_one = client.get("/api/reviews/", {"release": "atlas-mini"})
    for _ in range(4):
        review_now(mini, ada)
    with django_assert_max_num_queries(4) as five:
        listed_five = client.get("/api/reviews/", {"release": "atlas-mini"})

    assert (len(listed_one.json()["results"]), len(listed_five.json()["results"])) == (1, 5)
    assert len(five) == len(one)
