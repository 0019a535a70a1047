"""The board with a review waiting for approvals (found by the browser tests: the
board read the approvals needed from the plan document, which has no such field)."""

from __future__ import annotations

import pytest
from django.test import Client
from django.utils import timezone

from rollout.models import Review

pytestmark = pytest.mark.django_db


def test_the_board_counts_the_approvals_an_advance_still_needs(release, vera):
    Review.objects.create(
        release=release,
        plan=release.active_plan,
        stage=release.current_stage,
        stage_entered_at=release.stage_entered_at,
        next_stage="commercial",
        recommendation="advance",
        summary="every exit criterion passes",
        approvals_needed=2,
        trigger="schedule",
        created_at=timezone.now(),
    )
    browser = Client()
    browser.force_login(vera)

    answer = browser.get("/console/")

    assert answer.status_code == 200
    assert b"<dt>Approvals waiting</dt><dd>2 more needed</dd>" in answer.content
