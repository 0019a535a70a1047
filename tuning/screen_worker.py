"""Screening a training dataset in a process of its own: ``python -m tuning.screen_worker``.

Screening 10,000 rows takes a core for a quarter of a second or more; in the web
server's process it would hold the GIL the proxy's requests need. So embedded mode's
runner (``tuning.runner``) hands the work to this module in a child process at the
lowest priority, and a Celery worker, a process of its own already, calls
``screen_training_data`` directly. Both judge by the same function.

The protocol: one line of JSON on stdin (``{"plan": <the plan's canonical document>,
"stage": <name>, "api_key": <for the classifier>}``), then the file's bytes until EOF;
the result on stdout as one JSON object (``result_to_json``). The child imports no
Django settings and touches no database: it reads the plan and the file it is given.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from typing import Any

from rollout.plan_schema import DEFAULT_REFUSAL_MARKERS, parse_plan
from tuning.dataset_screening import (
    DatasetResult,
    RowFinding,
    moderation_classifier,
    screen_dataset,
)
from tuning.datasets import parse_dataset

TIMEOUT_SECONDS = 900


class ScreeningFailed(Exception):
    """The child process did not give a result (it crashed, or took too long)."""


def screen_training_data(
    *, plan: dict[str, Any], stage: str, data: bytes, api_key: str, pause_every_ms=None
) -> DatasetResult:
    """Every row of ``data`` judged under ``stage`` of ``plan`` (its rules, its
    classifier, the training-data checks) and the dataset's verdict."""
    from access.screening import compile_screen

    doc = parse_plan(plan)
    policy = doc.stage(stage)
    if policy is None or policy.fine_tuning is None:
        raise ValueError(f"the plan's stage {stage!r} does not allow fine-tuning")
    screen = compile_screen(policy.screening)
    classifier = screen.classifier if screen is not None else None
    return screen_dataset(
        parse_dataset(data),
        screen=screen,
        policy=policy.fine_tuning.dataset,
        refusal_markers=doc.assessment.refusal_markers
        if doc.assessment
        else DEFAULT_REFUSAL_MARKERS,
        classify=moderation_classifier(classifier, api_key=api_key) if classifier else None,
        pause_every_ms=pause_every_ms,
    )


def screen_in_child(
    *, plan: dict[str, Any], stage: str, data: bytes, api_key: str
) -> DatasetResult:
    """``screen_training_data`` in a child process at the lowest priority."""
    header = json.dumps({"plan": plan, "stage": stage, "api_key": api_key}).encode()
    env = {key: value for key, value in os.environ.items() if key != "DJANGO_SETTINGS_MODULE"}
    child = subprocess.Popen(
        [sys.executable, "-m", "tuning.screen_worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or gone already
        os.setpriority(os.PRIO_PROCESS, child.pid, 19)
    try:
        out, err = child.communicate(header + b"\n" + data, timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise ScreeningFailed(f"screening took over {TIMEOUT_SECONDS} s") from None
    if child.returncode != 0:
        last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise ScreeningFailed(f"the screening process failed: {last[0][:300]}")
    return result_from_json(json.loads(out))


def result_to_json(result: DatasetResult) -> dict[str, Any]:
    return {
        "verdict": result.verdict,
        "reason": result.reason,
        "rows_total": result.rows_total,
        "rows_flagged": result.rows_flagged,
        "rows_blocked": result.rows_blocked,
        "kept_lines": list(result.kept_lines),
        "findings": [
            [f.line, f.action, f.source, list(f.categories), f.excerpt] for f in result.findings
        ],
        "categories": result.categories,
    }


def result_from_json(data: dict[str, Any]) -> DatasetResult:
    return DatasetResult(
        verdict=data["verdict"],
        reason=data["reason"],
        rows_total=data["rows_total"],
        rows_flagged=data["rows_flagged"],
        rows_blocked=data["rows_blocked"],
        kept_lines=tuple(data["kept_lines"]),
        findings=tuple(
            RowFinding(line, action, source, tuple(categories), excerpt)
            for line, action, source, categories, excerpt in data["findings"]
        ),
        categories=dict(data["categories"]),
    )


def main() -> None:
    stream = sys.stdin.buffer
    request = json.loads(stream.readline())
    result = screen_training_data(
        plan=request["plan"], stage=request["stage"], data=stream.read(), api_key=request["api_key"]
    )
    sys.stdout.write(json.dumps(result_to_json(result)))


if __name__ == "__main__":
    main()
