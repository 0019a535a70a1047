"""The console's actions on a release (request a review, approve or reject it, pause,
resume, roll back) and the review queue, page by page and role by role, with the
Django test client.

Cast: atlas-mini, two days into the first of three stages of a plan small enough to
pass its exit criteria with a few hundred events (two reviewers' approvals needed).
ada is the rollout admin; rita and ruth reviewers; vera a viewer; oscar an org admin.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from django.test import Client
from django.utils import timezone
from django.utils.html import escape

from console.refusals import SENTENCES
from console.reviewing import awaiting_reviews
from monitoring.models import AuditEvent
from monitoring.usage import write_events
from rollout import transitions
from rollout.models import Approval, Release, Review, StageTransition
from rollout.plans import apply_plan
from rollout.reviews import create_review
from tests.factories import make_user, traffic

pytestmark = pytest.mark.django_db

PLAN = """
release: atlas-mini
upstream: {base_url: "http://127.0.0.1:9/v1", model: atlas-mini-1}
stages:
  - name: research_preview
    tiers:
      research_partner:
        limits: {requests_per_minute: 60, tokens_per_minute: 10000, tokens_per_day: 100000,
                 max_tokens: 1000}
    exit_criteria:
      min_days_in_stage: 1
      min_requests: 200
      min_distinct_orgs: 2
      max_flag_rate: 0.05
      max_error_rate: 0.05
      approvals_needed: 2
    tripwires:
      - {name: flag-spike, metric: flag_rate, threshold: 0.5, window_minutes: 60,
         min_requests: 20, action: pause}
  - name: commercial
    tiers:
      research_partner:
        limits: {requests_per_minute: 60, tokens_per_minute: 10000, tokens_per_day: 100000,
                 max_tokens: 1000}
      verified_commercial:
        limits: {requests_per_minute: 60, tokens_per_minute: 10000, tokens_per_day: 100000,
                 max_tokens: 1000}
    exit_criteria:
      min_days_in_stage: 1
      min_requests: 200
      min_distinct_orgs: 2
      max_flag_rate: 0.05
      max_error_rate: 0.05
      approvals_needed: 2
  - name: general
    tiers:
      public:
        limits: {requests_per_minute: 60, tokens_per_minute: 10000, tokens_per_day: 100000,
                 max_tokens: 1000}
"""
PARTNERS = {"northwind-research": "research_partner", "meridian-lab": "research_partner"}
KEY_SHAPED = "sgk_0123456789abcdef_" + "k" * 40
SECRET = "k" * 40


def make_release(ada, name: str = "atlas-mini") -> Release:
    apply_plan(PLAN.replace("atlas-mini", name), actor=ada)
    release = Release.objects.get(name=name)
    # Two days into its first stage, so min_days_in_stage (1) can pass.
    Release.objects.filter(pk=release.pk).update(
        stage_entered_at=timezone.now() - timedelta(days=2)
    )
    release.refresh_from_db()
    return release


def healthy_traffic(release: Release) -> None:
    now = timezone.now()
    write_events(
        traffic(
            release=release.name,
            stage=release.current_stage,
            orgs=PARTNERS,
            count=400,
            start=now - timedelta(minutes=600),
            end=now - timedelta(seconds=1),
        )
    )


@pytest.fixture
def mini(ada):
    return make_release(ada)


@pytest.fixture
def ruth(db):
    return make_user("ruth", roles=("reviewer",))


@pytest.fixture
def advance_review(mini, ada) -> Review:
    """A review of atlas-mini recommending advance, requested by ada."""
    healthy_traffic(mini)
    review = create_review(mini, trigger="api", requested_by=ada)
    assert review.recommendation == "advance", review.summary
    return review


@pytest.fixture
def browser():
    return Client()


def signed_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def said(answer) -> list[str]:
    """The messages a redirected action left, as the page it redirects to shows them
    (reading them there consumes them)."""
    assert answer.status_code == 302, answer.status_code
    page = answer.client.get(answer["Location"])
    assert page.status_code == 200
    shown = [str(message) for message in page.context["messages"]]
    for message in shown:
        assert escape(message) in page.text
    return shown


def state(release: Release) -> tuple[str, str, datetime]:
    release.refresh_from_db()
    return release.current_stage, release.state, release.updated_at


def reasons(kind: str, text: str) -> dict[str, str]:
    return {f"{kind}-reason": text}


# --- who sees what --------------------------------------------------------------------------


def action_urls(release: Release, review: Review) -> list[str]:
    return [
        f"/console/releases/{release.name}/review/",
        f"/console/releases/{release.name}/pause/",
        f"/console/releases/{release.name}/resume/",
        f"/console/releases/{release.name}/rollback/",
        f"/console/reviews/{review.public_id}/approve/",
        f"/console/reviews/{review.public_id}/reject/",
    ]


def test_anonymous_is_sent_to_the_login_page_from_every_page_and_action(
    browser, mini, advance_review
):
    pages = ["/console/reviews/", f"/console/reviews/{advance_review.public_id}/"]
    for url in pages:
        answer = browser.get(url)
        assert (answer.status_code, answer["Location"]) == (302, f"/console/login/?next={url}")
    for url in action_urls(mini, advance_review):
        answer = browser.post(url, reasons("pause", "because"))
        assert (answer.status_code, answer["Location"]) == (302, f"/console/login/?next={url}")
    assert state(mini) == ("research_preview", "active", mini.updated_at)
    assert Review.objects.count() == 1


def test_an_org_admin_cannot_open_the_review_pages(oscar, advance_review):
    client = signed_in(oscar)
    assert client.get("/console/reviews/").status_code == 403
    assert client.get(f"/console/reviews/{advance_review.public_id}/").status_code == 403


def test_a_viewer_sees_the_queue_the_review_and_the_release_without_any_action(
    vera, mini, advance_review
):
    client = signed_in(vera)
    queue = client.get("/console/reviews/")
    review = client.get(f"/console/reviews/{advance_review.public_id}/")
    release = client.get("/console/releases/atlas-mini/")

    assert (queue.status_code, review.status_code, release.status_code) == (200, 200, 200)
    assert advance_review.public_id in queue.text
    assert "2 more approvals" in queue.text
    for page in (queue, review, release):
        assert 'method="post" action="/console/releases/' not in page.text
        assert 'action="/console/reviews/' not in page.text
        assert "data-confirm" not in page.text  # no action form at all


def test_a_viewer_posting_any_action_is_refused_and_nothing_changes(vera, mini, advance_review):
    client = signed_in(vera)
    before = (state(mini), AuditEvent.objects.count())
    for url in action_urls(mini, advance_review):
        answer = client.post(url, {**reasons("pause", "x"), **reasons("rollback", "x")})
        assert answer.status_code == 403, url
    assert (state(mini), AuditEvent.objects.count()) == before
    assert (Review.objects.count(), Approval.objects.count()) == (1, 0)


def test_the_release_page_shows_each_role_its_own_actions(ada, rita, mini, advance_review):
    admin_page = signed_in(ada).get("/console/releases/atlas-mini/").text
    reviewer_page = signed_in(rita).get("/console/releases/atlas-mini/").text

    assert 'action="/console/releases/atlas-mini/pause/"' in admin_page
    assert 'action="/console/releases/atlas-mini/review/"' in admin_page
    assert "/approve/" not in admin_page  # ada requested it, and is no reviewer
    assert 'action="/console/releases/atlas-mini/pause/"' not in reviewer_page
    assert 'action="/console/releases/atlas-mini/rollback/"' not in admin_page  # first stage
    assert f'action="/console/reviews/{advance_review.public_id}/approve/"' in reviewer_page
    assert f'action="/console/reviews/{advance_review.public_id}/reject/"' in reviewer_page
    assert 'action="/console/releases/atlas-mini/review/"' in reviewer_page
    assert "Still needs: <strong>2 more approvals</strong>" in reviewer_page
    # every action form asks before it is sent
    forms = re.findall(
        r"<form method=\"post\" action=\"/console/(?:releases|reviews)/[^>]*>",
        reviewer_page + admin_page,
    )
    assert forms and all("data-confirm=" in form for form in forms)


# --- requesting a review ----------------------------------------------------------------------


def test_a_reviewer_requests_a_review(rita, mini):
    healthy_traffic(mini)
    answer = signed_in(rita).post("/console/releases/atlas-mini/review/")

    review = Review.objects.get()
    assert (answer.status_code, answer["Location"]) == (302, "/console/releases/atlas-mini/")
    assert (review.requested_by, review.trigger, review.recommendation) == (rita, "api", "advance")
    assert said(answer) == [
        f"Review {review.public_id} recommends advancing to commercial. It needs 2 approvals "
        "from reviewers other than you."
    ]
    assert (
        AuditEvent.objects.filter(action="review.created", object_id=review.public_id).count() == 1
    )


def test_a_review_without_traffic_says_it_holds(ada, mini):
    answer = signed_in(ada).post("/console/releases/atlas-mini/review/")
    review = Review.objects.get()
    assert review.recommendation == "hold"
    assert said(answer) == [f"Review {review.public_id} recommends Hold: {review.summary}"]


@pytest.mark.parametrize("name", ["no-such-release", "atlas-mini%00", "<script>", "x" * 300])
def test_an_action_on_an_unknown_release_is_404(ada, rita, mini, name):
    assert signed_in(rita).post(f"/console/releases/{name}/review/").status_code == 404
    for kind in ("pause", "resume", "rollback"):
        answer = signed_in(ada).post(f"/console/releases/{name}/{kind}/", reasons(kind, "x"))
        assert answer.status_code == 404
    assert StageTransition.objects.exclude(kind="create").count() == 0


# --- four eyes ---------------------------------------------------------------------------------


def test_two_reviewers_approving_an_advance_move_the_release_on(rita, ruth, mini, advance_review):
    first = signed_in(rita).post(
        f"/console/reviews/{advance_review.public_id}/approve/", {"approve-comment": "looks good"}
    )
    assert (first.status_code, first["Location"]) == (302, "/console/releases/atlas-mini/")
    assert said(first) == [
        f"You approved review {advance_review.public_id}: 1 of 2 approvals; 1 more needed."
    ]
    assert state(mini)[0] == "research_preview"

    second = signed_in(ruth).post(
        f"/console/reviews/{advance_review.public_id}/approve/",
        {"next": f"/console/reviews/{advance_review.public_id}/"},
    )

    assert (second.status_code, second["Location"]) == (
        302,
        f"/console/reviews/{advance_review.public_id}/",
    )
    assert said(second) == [
        f"You approved review {advance_review.public_id}; that completes its approvals: "
        "atlas-mini advanced to commercial."
    ]
    assert state(mini)[:2] == ("commercial", "active")
    assert [a.comment for a in Approval.objects.order_by("id")] == ["looks good", ""]
    assert list(
        AuditEvent.objects.filter(action__in=["review.approved", "release.advance"])
        .order_by("id")
        .values_list("action", flat=True)
    ) == ["review.approved", "review.approved", "release.advance"]
    # The review is carried out: it leaves the queue.
    assert awaiting_reviews() == []


def test_self_approval_is_refused_with_the_reason(rita, mini):
    healthy_traffic(mini)
    client = signed_in(rita)
    said(client.post("/console/releases/atlas-mini/review/"))
    review = Review.objects.get()

    answer = client.post(f"/console/reviews/{review.public_id}/approve/", follow=True)

    assert answer.status_code == 200
    sentence = SENTENCES["self_approval"]
    assert [str(m) for m in answer.context["messages"]] == [sentence]
    assert "You requested this review, so you cannot approve it" in answer.text
    assert Approval.objects.count() == 0
    # and the page does not offer rita a vote on her own review
    assert f"/console/reviews/{review.public_id}/approve/" not in answer.text


def test_a_rollout_admin_cannot_approve(ada, advance_review):
    answer = signed_in(ada).post(f"/console/reviews/{advance_review.public_id}/approve/")
    assert answer.status_code == 403
    assert Approval.objects.count() == 0


def test_a_second_vote_is_refused_with_the_reason(rita, advance_review):
    client = signed_in(rita)
    said(client.post(f"/console/reviews/{advance_review.public_id}/approve/"))
    answer = client.post(f"/console/reviews/{advance_review.public_id}/reject/")
    assert said(answer) == [SENTENCES["already_decided"]]
    again = client.post(f"/console/reviews/{advance_review.public_id}/approve/")
    assert said(again) == ["You had already given this verdict; nothing changed."]
    assert Approval.objects.count() == 1


def test_a_rejection_blocks_the_advance_and_the_queue_says_so(rita, ruth, mini, advance_review):
    rejected = signed_in(rita).post(
        f"/console/reviews/{advance_review.public_id}/reject/", {"reject-comment": "too early"}
    )
    assert said(rejected) == [
        f"You rejected review {advance_review.public_id}: atlas-mini cannot advance on it. "
        "A new review is needed once the problem is fixed."
    ]
    signed_in(ruth).post(f"/console/reviews/{advance_review.public_id}/approve/")
    assert state(mini)[0] == "research_preview"
    queue = signed_in(ruth).get("/console/reviews/")
    assert "rejected: it cannot advance; request a new review" in queue.text
    assert AuditEvent.objects.filter(action="review.rejected").count() == 1


def test_a_vote_on_a_review_whose_plan_changed_says_so(ada, rita, mini, advance_review):
    apply_plan(PLAN.replace("max_tokens: 1000}", "max_tokens: 900}"), actor=ada)

    answer = signed_in(rita).post(f"/console/reviews/{advance_review.public_id}/approve/")

    assert said(answer) == [SENTENCES["plan_changed"]]
    assert Approval.objects.count() == 0
    queue = signed_in(rita).get("/console/reviews/")
    assert "stale: the plan changed; request a new review" in queue.text


def test_a_vote_on_a_superseded_review_says_a_newer_one_exists(rita, ruth, mini, advance_review):
    signed_in(ruth).post("/console/releases/atlas-mini/review/")
    answer = signed_in(rita).post(f"/console/reviews/{advance_review.public_id}/approve/")
    assert said(answer) == [SENTENCES["review_superseded"]]
    assert Approval.objects.count() == 0


def test_a_vote_on_a_paused_release_says_it_is_not_active(ada, rita, mini, advance_review):
    transitions.pause(mini, actor=ada, reason="incident drill")
    answer = signed_in(rita).post(f"/console/reviews/{advance_review.public_id}/approve/")
    assert said(answer) == [SENTENCES["release_not_active"]]


def test_forged_review_ids_are_404(rita, advance_review):
    client = signed_in(rita)
    forged = ["rev_doesnotexist", advance_review.public_id + "x", "%00", "<script>"]
    for public_id in forged:
        assert client.get(f"/console/reviews/{public_id}/").status_code == 404
        assert client.post(f"/console/reviews/{public_id}/approve/").status_code == 404
        assert client.post(f"/console/reviews/{public_id}/reject/").status_code == 404
    assert Approval.objects.count() == 0


# --- pause, resume, roll back -------------------------------------------------------------------


def test_a_rollout_admin_pauses_and_resumes_with_a_reason(ada, mini):
    client = signed_in(ada)
    paused = client.post("/console/releases/atlas-mini/pause/", reasons("pause", "flag spike"))
    assert (paused.status_code, paused["Location"]) == (302, "/console/releases/atlas-mini/")
    assert said(paused) == [
        "atlas-mini is paused: the proxy refuses its requests until it is resumed."
    ]
    assert state(mini)[1] == "paused"
    again = client.post("/console/releases/atlas-mini/pause/", reasons("pause", "flag spike"))
    assert said(again) == ["atlas-mini was already paused; nothing changed."]

    page = client.get("/console/releases/atlas-mini/").text
    assert 'action="/console/releases/atlas-mini/resume/"' in page
    assert 'action="/console/releases/atlas-mini/pause/"' not in page

    resumed = client.post("/console/releases/atlas-mini/resume/", reasons("resume", "fixed"))
    assert said(resumed) == ["atlas-mini is served again, in stage research_preview."]
    assert state(mini)[1] == "active"
    assert list(
        StageTransition.objects.exclude(kind="create")
        .order_by("id")
        .values_list("kind", "reason", "actor__username")
    ) == [("pause", "flag spike", "ada"), ("resume", "fixed", "ada")]
    assert list(
        AuditEvent.objects.filter(object_type="release", object_id=mini.public_id)
        .order_by("id")
        .values_list("action", flat=True)
    )[-2:] == ["release.pause", "release.resume"]


def test_a_rollout_admin_rolls_back_once_after_an_advance(ada, rita, ruth, mini, advance_review):
    transitions.approve(advance_review, reviewer=rita)
    transitions.approve(advance_review, reviewer=ruth)
    assert state(mini)[0] == "commercial"
    client = signed_in(ada)
    page = client.get("/console/releases/atlas-mini/").text
    assert "Roll back to research_preview" in page
    form = {**reasons("rollback", "error spike"), "rollback-from_stage": "commercial"}

    first = said(client.post("/console/releases/atlas-mini/rollback/", form))
    second = said(client.post("/console/releases/atlas-mini/rollback/", form))

    assert first == ["atlas-mini is rolled back to stage research_preview."]
    assert second == ["atlas-mini is no longer in the stage you saw; nothing changed."]
    assert state(mini)[0] == "research_preview"
    assert AuditEvent.objects.filter(action="release.rollback").count() == 1


def test_rolling_back_from_the_first_stage_says_why(ada, mini):
    answer = signed_in(ada).post(
        "/console/releases/atlas-mini/rollback/", reasons("rollback", "oops")
    )
    assert said(answer) == [SENTENCES["first_stage"]]
    assert StageTransition.objects.exclude(kind="create").count() == 0


def test_a_reviewer_cannot_pause_resume_or_roll_back(rita, mini):
    client = signed_in(rita)
    for kind in ("pause", "resume", "rollback"):
        answer = client.post(f"/console/releases/atlas-mini/{kind}/", reasons(kind, "because"))
        assert answer.status_code == 403
    assert state(mini)[1] == "active"
    assert StageTransition.objects.exclude(kind="create").count() == 0


@pytest.mark.parametrize("reason", ["", "   ", "\x00", "a\x00b", "x" * 10_000])
def test_a_bad_reason_is_a_form_error_and_changes_nothing(ada, mini, reason):
    before = (state(mini), AuditEvent.objects.count())
    answer = signed_in(ada).post("/console/releases/atlas-mini/pause/", reasons("pause", reason))

    assert answer.status_code == 400
    assert 'class="field invalid"' in answer.text
    assert 'id="id_pause-reason-error"' in answer.text
    assert any(
        error in answer.text
        for error in ("Say why: a reason is required.", "Null characters", "at most 1000")
    )
    assert 'action="/console/releases/atlas-mini/pause/"' in answer.text
    assert (state(mini), AuditEvent.objects.count()) == before


def test_a_key_in_a_reason_is_stored_redacted(ada, mini):
    signed_in(ada).post(
        "/console/releases/atlas-mini/pause/", reasons("pause", f"leaked {KEY_SHAPED} <b>x</b>")
    )
    transition = StageTransition.objects.get(kind="pause")
    assert transition.reason == "leaked sgk_0123456789abcdef_[redacted] <b>x</b>"
    event = AuditEvent.objects.get(action="release.pause")
    assert SECRET not in str(event.data)
    page = signed_in(ada).get("/console/releases/atlas-mini/").text
    assert SECRET not in page
    assert "<b>x</b>" not in page


@pytest.mark.parametrize("comment", ["\x00", "x" * 10_000])
def test_a_bad_comment_is_a_form_error_and_records_no_vote(rita, advance_review, comment):
    answer = signed_in(rita).post(
        f"/console/reviews/{advance_review.public_id}/approve/", {"approve-comment": comment}
    )
    assert answer.status_code == 400
    assert 'id="id_approve-comment-error"' in answer.text
    assert Approval.objects.count() == 0


def test_a_hostile_comment_is_stored_redacted_and_shown_escaped(rita, advance_review):
    client = signed_in(rita)
    comment = f"<script>alert(1)</script> {KEY_SHAPED}"
    client.post(
        f"/console/reviews/{advance_review.public_id}/approve/", {"approve-comment": comment}
    )

    approval = Approval.objects.get()
    assert approval.comment == "<script>alert(1)</script> sgk_0123456789abcdef_[redacted]"
    page = client.get(f"/console/reviews/{advance_review.public_id}/").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert" not in page
    assert SECRET not in page


def test_a_post_without_a_csrf_token_is_refused(ada, mini):
    client = Client(enforce_csrf_checks=True)
    client.force_login(ada)
    answer = client.post("/console/releases/atlas-mini/pause/", reasons("pause", "x"))
    assert answer.status_code == 403
    assert state(mini)[1] == "active"


def test_actions_are_posts_only(ada, mini):
    assert signed_in(ada).get("/console/releases/atlas-mini/pause/").status_code == 405


# --- the queue and the review page ----------------------------------------------------------------


def test_the_review_page_shows_criteria_and_tripwires_as_tables(vera, advance_review):
    page = signed_in(vera).get(f"/console/reviews/{advance_review.public_id}/").text
    for criterion in advance_review.criteria:
        assert f"<td>{criterion['name']}</td>" in page
    assert "<td>flag-spike</td><td>flag_rate</td>" in page
    assert '"passed":' not in page and "'passed':" not in page  # no raw JSON
    assert "2 more approvals" in page


def test_the_queue_is_oldest_first_and_says_what_each_needs(ada, rita, vera):
    older, newer = make_release(ada, "atlas-old"), make_release(ada, "atlas-new")
    for release in (older, newer):
        healthy_traffic(release)
    first = create_review(older, trigger="schedule")
    second = create_review(newer, trigger="api", requested_by=ada)
    transitions.approve(second, reviewer=rita)

    page = signed_in(vera).get("/console/reviews/").text

    assert page.index("atlas-old") < page.index("atlas-new")
    assert [(row.review, row.counted, row.needs) for row in awaiting_reviews()] == [
        (first, 0, "2 more approvals"),
        (second, 1, "1 more approval"),
    ]
    assert "research_preview → commercial" in page
    assert "1 / 2" in page


def test_the_queue_counts_approvals_as_the_four_eyes_rule_does(ada, rita, ruth, mini):
    healthy_traffic(mini)
    review = create_review(mini, trigger="api", requested_by=ada)
    transitions.approve(review, reviewer=rita, verdict="reject")
    transitions.approve(review, reviewer=ruth)
    # A reviewer who loses the role no longer counts.
    ruth.groups.clear()

    (row,) = awaiting_reviews()

    assert row.counted == len(transitions.counted_approvals(review)) == 0
    assert row.rejected is True


def test_the_queue_query_count_does_not_grow_with_its_rows(
    ada, rita, vera, django_assert_num_queries
):
    client = signed_in(vera)
    client.get("/console/reviews/")  # the session and roles settle

    def add_waiting_review(name: str) -> None:
        release = make_release(ada, name)
        healthy_traffic(release)
        review = create_review(release, trigger="api", requested_by=ada)
        transitions.approve(review, reviewer=rita)

    add_waiting_review("atlas-a")
    with django_assert_num_queries(4):
        one = client.get("/console/reviews/")
    for name in ("atlas-b", "atlas-c", "atlas-d"):
        add_waiting_review(name)
    with django_assert_num_queries(4):
        four = client.get("/console/reviews/")
    assert one.text.count("1 / 2") == 1
    assert four.text.count("1 / 2") == 4


# --- the sentences -----------------------------------------------------------------------------


def test_every_refusal_code_of_the_actions_has_a_sentence():
    root = Path(__file__).resolve().parents[2] / "rollout"
    codes = set()
    for module in ("transitions.py", "reviews.py"):
        codes |= set(re.findall(r'Refused\(\s*"(\w+)"', (root / module).read_text()))
    assert codes - set(SENTENCES) == set()
