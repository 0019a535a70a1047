"""Screening a training dataset in a child process (tuning/screen_worker.py): the same
result as in this process, and a failure that says so."""

from __future__ import annotations

import json

import pytest
import yaml

from rollout.plan_schema import canonical_dict, parse_plan
from tests.factories import EXAMPLE_PLAN
from tuning.screen_worker import ScreeningFailed, screen_in_child, screen_training_data


def plan_without_classifier() -> dict:
    document = yaml.safe_load(EXAMPLE_PLAN.read_text())
    for stage in document["stages"]:
        stage["screening"].pop("classifier", None)
    return canonical_dict(parse_plan(document))


def row(prompt: str, answer: str) -> bytes:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return json.dumps({"messages": messages}).encode() + b"\n"


DATA = (
    row("Explain photosynthesis.", "Plants make sugar from light.") * 20
    + row("Summarise gain of function research.", "It is debated.")
    + row("Give the synthesis route for sarin.", "Sure: first you take...")
)


def test_the_child_gives_the_same_result_as_this_process():
    request = {"plan": plan_without_classifier(), "stage": "research_preview", "data": DATA}

    here = screen_training_data(**request, api_key="")
    there = screen_in_child(**request, api_key="")

    assert there == here
    assert (there.verdict, there.rows_flagged, there.rows_blocked) == ("reject", 1, 1)
    assert [finding.line for finding in there.findings] == [21, 22]


def test_a_child_that_fails_says_why():
    with pytest.raises(ScreeningFailed, match="does not allow fine-tuning"):
        screen_in_child(plan=plan_without_classifier(), stage="nowhere", data=DATA, api_key="")
