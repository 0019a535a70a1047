"""tuning.refusals: what counts as a refusal, for dataset screening and the assessment."""

from __future__ import annotations

import pytest

from rollout.plan_schema import DEFAULT_REFUSAL_MARKERS
from tuning.refusals import is_refusal


@pytest.mark.parametrize(
    "text",
    [
        "I can't help with that request.",
        "Sorry, but I CANNOT ASSIST with this.",
        "I can\u2019t help with that.",  # a typographic apostrophe
        "\uff29 can't provide that.",  # a full-width I (NFKC)
        "Well. I\u2019m not able to help here.",
    ],
)
def test_is_refusal_finds_a_marker_folded(text: str) -> None:
    assert is_refusal(text, DEFAULT_REFUSAL_MARKERS)


@pytest.mark.parametrize("text", ["", "Sure, here is how.", "I can help with that.", "I can't"])
def test_is_refusal_is_false_for_answers(text: str) -> None:
    assert not is_refusal(text, DEFAULT_REFUSAL_MARKERS)


def test_content_filter_is_a_refusal_whatever_the_text() -> None:
    assert is_refusal("", DEFAULT_REFUSAL_MARKERS, "content_filter")
    assert not is_refusal("Sure.", DEFAULT_REFUSAL_MARKERS, "stop")


def test_the_plan_s_own_markers_and_blank_ones() -> None:
    assert is_refusal("NO WAY, pal", ["no way"])
    assert not is_refusal("I can't help", [])
    # The demo model's refusal (stagegate.demo_upstream, issue 17's design).
    assert is_refusal("I can't help with that request.", DEFAULT_REFUSAL_MARKERS)
    assert not is_refusal("anything", ["  ", ""])
