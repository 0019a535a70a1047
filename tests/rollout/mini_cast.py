"""The cast of the review, transition, tripwire and incident tests: atlas-mini, a
three-stage plan small enough to pass its exit criteria with a few hundred events:
research_preview (2 orgs, 2 approvals) -> commercial -> general. Reviewers rita (the
shared cast's), ruth and rex; ada is the rollout admin; vera a viewer.

The fixtures are registered for tests/rollout by its conftest.py; tests elsewhere
take them by name (``mini = mini_cast.mini``).
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from monitoring.usage import write_events
from rollout.models import Release, Review
from rollout.plans import apply_plan
from rollout.reviews import create_review
from tests.factories import make_user, traffic

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
      min_distinct_orgs_per_tier: {research_partner: 2}
      max_flag_rate: 0.05
      max_error_rate: 0.05
      block_on_incident_severity: high
      approvals_needed: 2
    tripwires:
      - {name: flag-spike, metric: flag_rate, threshold: 0.5, window_minutes: 60,
         min_requests: 20, action: pause}
      - {name: serious-incident, metric: incident, severity: high, action: pause}
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
    tripwires:
      - {name: flag-spike, metric: flag_rate, threshold: 0.5, window_minutes: 60,
         min_requests: 20, action: rollback}
      - {name: critical-incident, metric: incident, severity: critical, action: rollback}
  - name: general
    tiers:
      public:
        limits: {requests_per_minute: 60, tokens_per_minute: 10000, tokens_per_day: 100000,
                 max_tokens: 1000}
"""


PARTNERS = {"northwind-research": "research_partner", "meridian-lab": "research_partner"}


@pytest.fixture
def mini(db, ada):
    apply_plan(PLAN, actor=ada)
    release = Release.objects.get(name="atlas-mini")
    # Two days into its first stage, so min_days_in_stage (1) can pass.
    Release.objects.filter(pk=release.pk).update(
        stage_entered_at=timezone.now() - timedelta(days=2)
    )
    release.refresh_from_db()
    return release


@pytest.fixture
def ruth(db):
    return make_user("ruth", roles=("reviewer",))


@pytest.fixture
def rex(db):
    return make_user("rex", roles=("reviewer",))


def healthy_traffic(release, *, count=400, flagged_every=0, error_every=0, minutes=600):
    now = timezone.now()
    write_events(
        traffic(
            release=release.name,
            stage=release.current_stage,
            orgs=PARTNERS,
            count=count,
            start=now - timedelta(minutes=minutes),
            end=now - timedelta(seconds=1),
            flagged_every=flagged_every,
            error_every=error_every,
        )
    )


def review_now(release, user=None) -> Review:
    return create_review(release, trigger="api" if user else "schedule", requested_by=user)


def results(review: Review) -> dict[str, bool]:
    return {result["name"]: result["passed"] for result in review.criteria}
