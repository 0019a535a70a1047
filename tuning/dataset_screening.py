"""Dataset screening: every row of a training dataset judged, and the dataset's verdict.

Pure Python (no Django): the caller (a Celery task, or embedded mode's background
thread) gives the parsed ``Dataset``, the stage's compiled ``Screen``, the plan's
``DatasetPolicy`` and refusal markers, and optionally ``classify`` (the stage's
classifier, e.g. ``moderation_classifier``), and gets a ``DatasetResult``.

A row is **blocked** when:
- a block rule of the screen (or a classifier ``block`` category) finds its answer text
  (every assistant message);
- ``teaches_compliance``: its prompt text (system, user and tool messages) is blocked by
  a rule or the classifier and one of the answers the row trains on (weight not 0) is
  not a refusal (``tuning.refusals.is_refusal``): the row teaches the model to comply.
  Category ``compliance:<the deciding category>``. A blocked prompt whose every trained
  answer is a refusal teaches refusal: a good row, recorded as nothing;
- ``guardrail_override``: a message asks to ignore or override safety guidance
  (``GUARDRAIL_PATTERNS``, RE2, searched in the text normalized as screening does with
  case folding). In an answer always; in the prompt unless every trained answer is a
  refusal (refusing a jailbreak is what the row should teach).
A row is **flagged** (and not blocked) when a flag or route rule, or a classifier
``flag`` category, finds its prompt or its answer.

The dataset: blocked rows -> ``policy.on_blocked``; else flagged rows ->
``policy.on_flagged``; else ``accept``. ``accept_filtered`` trains on the rows neither
flagged nor blocked, and becomes ``reject`` when none is left. A classifier failure
(``ClassifierFailed`` from any batch) makes it ``hold`` with the failure as reason,
unless the rules alone already reject the dataset.

Cost: one ``Screen.check`` for the prompt and one for the answer, one normalize and one
RE2 search for each against the guardrail patterns, per row. In a thread beside the
proxy's event loop, ``screen_dataset`` gives the GIL up for a moment every
``pause_every_ms`` of work, so the loop waits about that long for it, not the
interpreter's 5 ms switch interval.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import httpx
import orjson

from access.screening import ALLOW, Screen, Verdict, normalize
from monitoring.records import excerpt
from rollout.plan_schema import Screening, compile_pattern
from tuning.refusals import is_refusal

if TYPE_CHECKING:
    from rollout.plan_schema import Classifier, DatasetPolicy
    from tuning.datasets import Dataset, Row

Categories = tuple[str, ...]
Classify = Callable[[list[str]], list[tuple[Categories, Categories]]]
DatasetVerdict = Literal["accept", "accept_filtered", "hold", "reject"]

COMPLIANCE = "compliance"
GUARDRAIL_OVERRIDE = "guardrail_override"
# Requests to drop safety guidance, as jailbreak datasets phrase them. Kept narrow on
# purpose: "developer mode" or "jailbreak" alone is everyday talk about phones.
GUARDRAIL_PATTERNS = (
    r"\b(?:ignore|disregard|override|bypass)\s+(?:all\s+|any\s+|your\s+|the\s+|of\s+)*"
    r"(?:previous\s+|prior\s+|above\s+|earlier\s+|original\s+)?"
    r"(?:safety\s+|content\s+|ethical\s+)?"
    r"(?:instructions|guidelines|rules|policies|restrictions|guardrails)\b",
    r"\byou (?:have|has|now have) no"
    r" (?:restrictions|rules|filters|guidelines|limits|limitations)\b",
    r"\byou are no longer bound by\b",
    r"\bdeveloper mode (?:enabled|output|response)\b",
    r"\b(?:jailbreak (?:mode|prompt)|you are (?:now )?(?:a )?jailbroken"
    r"|jailbroken (?:ai|mode|model|assistant))\b",
    r"\bdo anything now\b",
)
_GUARDRAIL = compile_pattern("|".join(f"(?:{pattern})" for pattern in GUARDRAIL_PATTERNS))
# RE2 has no lookbehind: what precedes a match is read apart (in folded text).
_NEGATION = re.compile(
    r"\b(?:never|not|don't|dont|do not|must not|mustn't|should not|shouldn't)\s$"
)
# With no screen, the verdicts come from the classifier alone: an empty screen's
# ``check`` allows everything and its ``combine`` merges the classifier's categories.
_NO_RULES = Screen(Screening())
CLASSIFY_CHUNK = 1000  # texts per call of classify
_ACTION_RANK = {"flag": 1, "block": 2}


class ClassifierFailed(Exception):
    """The classifier gave no usable answer; the message says why (no dataset text)."""


@dataclass(frozen=True, slots=True)
class RowFinding:
    """What screening found in one row: where (``prompt``, ``answer``, or ``row`` for
    teaching compliance, which takes both), the strongest action there, every category
    found there (sorted) and a redacted excerpt of the text concerned."""

    line: int
    action: Literal["flag", "block"]
    source: Literal["prompt", "answer", "row"]
    categories: Categories
    excerpt: str


@dataclass(frozen=True)
class DatasetResult:
    """The dataset's verdict and why (one sentence), its rows counted (``rows_flagged``
    only those not also blocked), the lines to train on (every row for ``accept`` and
    ``hold``, the clean rows for ``accept_filtered``, none for ``reject``), the
    findings in line order and the number of rows per category found."""

    verdict: DatasetVerdict
    reason: str
    rows_total: int
    rows_flagged: int
    rows_blocked: int
    kept_lines: tuple[int, ...]
    findings: tuple[RowFinding, ...]
    categories: dict[str, int]


# --- the classifier ---------------------------------------------------------------------------


def _result_categories(result: Any) -> set[str] | None:
    """The categories one moderation result (``{"categories": {name: bool}}``) reports as
    true; None when it is not such a result (the shape ``access.proxy.screening`` reads)."""
    categories = result.get("categories") if isinstance(result, dict) else None
    if not isinstance(categories, dict):
        return None
    return {name for name, value in categories.items() if value is True}


def moderation_classifier(
    classifier: Classifier, *, api_key: str = "", batch: int = 100
) -> Classify:
    """``classify`` for a stage's ``classifier``: its URL asked with OpenAI's moderation
    API (``POST`` ``{"input": [texts], "model"?}``), ``batch`` texts a call, each call
    within ``classifier.timeout_ms`` (connecting, sending and reading each bounded by
    it); per text, the reported categories of ``classifier.flag`` and of
    ``classifier.block``. ``ClassifierFailed`` on any HTTP error, timeout or answer that
    is not one moderation result per text."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    headers = {"content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    timeout_s = classifier.timeout_ms / 1000

    def classify(texts: list[str]) -> list[tuple[Categories, Categories]]:
        out: list[tuple[Categories, Categories]] = []
        with httpx.Client(timeout=httpx.Timeout(timeout_s), headers=headers) as client:
            for start in range(0, len(texts), batch):
                chunk = texts[start : start + batch]
                body: dict[str, Any] = {"input": chunk}
                if classifier.model:
                    body["model"] = classifier.model
                for found in _ask(client, classifier, body, len(chunk)):
                    out.append(
                        (
                            tuple(category for category in classifier.flag if category in found),
                            tuple(category for category in classifier.block if category in found),
                        )
                    )
        return out

    return classify


def _ask(client: httpx.Client, classifier: Classifier, body: dict, count: int) -> list[set[str]]:
    try:
        response = client.post(classifier.url, content=orjson.dumps(body))
    except httpx.TimeoutException:
        raise ClassifierFailed(
            f"the classifier did not answer within {classifier.timeout_ms} ms"
        ) from None
    except httpx.HTTPError as exc:
        raise ClassifierFailed(f"the classifier failed: {type(exc).__name__}") from None
    if response.status_code != 200:
        raise ClassifierFailed(f"the classifier answered {response.status_code}")
    try:
        results = orjson.loads(response.content).get("results")
    except (orjson.JSONDecodeError, AttributeError):
        results = None
    if not isinstance(results, list) or len(results) != count:
        raise ClassifierFailed(f"the classifier's answer is not {count} moderation results")
    found = [_result_categories(result) for result in results]
    if any(categories is None for categories in found):
        raise ClassifierFailed("the classifier's answer is not a moderation")
    return found  # type: ignore[return-value]  # None ruled out above


# --- rows -------------------------------------------------------------------------------------


class _Pacer:
    """Gives the GIL up briefly after every ``every_ms`` of work (None: never)."""

    def __init__(self, every_ms: float | None) -> None:
        self.every_s = None if every_ms is None else every_ms / 1000
        self.since = time.perf_counter()

    def __call__(self) -> None:
        if self.every_s is None:
            return
        now = time.perf_counter()
        if now - self.since >= self.every_s:
            # A real sleep, not sleep(0): with sleep(0) this thread usually takes the GIL
            # back before a waiting thread is scheduled.
            time.sleep(0.00005)
            self.since = time.perf_counter()


@dataclass
class _Judged:
    """One row's verdicts: the rules' (then the classifier's merged in) on the prompt and
    the answer, and where the guardrail patterns matched."""

    prompt: Verdict
    answer: Verdict
    guard_prompt: bool
    guard_answer: bool


def _guardrail(text: str) -> bool:
    """Whether ``text`` asks to override safety guidance, where no negation ("never
    ignore the safety rules") comes just before."""
    if not text:
        return False
    folded = normalize(text, fold=True)
    for match in _GUARDRAIL.finditer(folded):
        if _NEGATION.search(folded[max(0, match.start() - 20) : match.start()]) is None:
            return True
    return False


def _classify_all(
    judged: list[_Judged], rows: Sequence[Row], screen: Screen, classify: Classify, pace: _Pacer
) -> None:
    """The classifier's categories merged into every verdict the rules did not block
    (each distinct text asked once); ``ClassifierFailed`` as the classifier raises it,
    or if it answers for the wrong number of texts."""
    texts: dict[str, list[tuple[int, str]]] = {}
    for index, (row, verdicts) in enumerate(zip(rows, judged, strict=True)):
        if row.prompt_text and verdicts.prompt.action != "block":
            texts.setdefault(row.prompt_text, []).append((index, "prompt"))
        if row.answer_text and verdicts.answer.action != "block":
            texts.setdefault(row.answer_text, []).append((index, "answer"))
    distinct = list(texts)
    for start in range(0, len(distinct), CLASSIFY_CHUNK):
        chunk = distinct[start : start + CLASSIFY_CHUNK]
        answers = classify(chunk)
        if len(answers) != len(chunk):
            raise ClassifierFailed(
                f"the classifier answered for {len(answers)} of {len(chunk)} texts"
            )
        for text, (flagged, blocked) in zip(chunk, answers, strict=True):
            if not flagged and not blocked:
                continue
            for index, source in texts[text]:
                verdicts = judged[index]
                if source == "prompt":
                    verdicts.prompt = screen.combine(verdicts.prompt, flagged, blocked)
                else:
                    verdicts.answer = screen.combine(verdicts.answer, flagged, blocked)
        pace()


class _Finding:
    """A finding being gathered: the strongest action, the categories."""

    __slots__ = ("action", "categories")

    def __init__(self) -> None:
        self.action = "flag"
        self.categories: set[str] = set()

    def add(self, action: str, categories: Sequence[str]) -> None:
        if _ACTION_RANK[action] > _ACTION_RANK[self.action]:
            self.action = action
        self.categories.update(categories)


def _findings(
    row: Row, verdicts: _Judged, markers: Sequence[str]
) -> tuple[list[RowFinding], set[str], set[str]]:
    """The row's findings, and the categories that block it and that flag it."""
    found: dict[str, _Finding] = {}
    blocking: set[str] = set()
    flagging: set[str] = set()

    def note(source: str, action: str, categories: Sequence[str], deciding: Sequence[str]) -> None:
        found.setdefault(source, _Finding()).add(action, categories)
        (blocking if action == "block" else flagging).update(deciding)

    prompt, answer = verdicts.prompt, verdicts.answer
    refuses: bool | None = None  # worked out only when a blocked prompt asks

    def refused() -> bool:
        nonlocal refuses
        if refuses is None:
            refuses = all(is_refusal(text, markers) for text in row.answers)
        return refuses

    if prompt.action == "block":
        if not refused():
            category = f"{COMPLIANCE}:{prompt.category}"
            note("row", "block", (category,), (category,))
    elif prompt.action in ("flag", "route"):
        note("prompt", "flag", prompt.categories, prompt.categories)
    if verdicts.guard_prompt and not refused():
        note("prompt", "block", (GUARDRAIL_OVERRIDE,), (GUARDRAIL_OVERRIDE,))
    if answer.action == "block":
        note("answer", "block", answer.categories, (answer.category or "",))
    elif answer.action in ("flag", "route"):
        note("answer", "flag", answer.categories, answer.categories)
    if verdicts.guard_answer:
        note("answer", "block", (GUARDRAIL_OVERRIDE,), (GUARDRAIL_OVERRIDE,))
    findings = [
        RowFinding(
            row.line,
            finding.action,  # type: ignore[arg-type]
            source,  # type: ignore[arg-type]
            tuple(sorted(finding.categories)),
            excerpt(
                row.prompt_text
                if source == "prompt"
                else row.answer_text
                if source == "answer"
                else f"{row.prompt_text}\n{row.answer_text}"
            ),
        )
        for source in ("prompt", "answer", "row")
        if (finding := found.get(source)) is not None
    ]
    return findings, blocking, flagging - blocking


# --- the dataset ------------------------------------------------------------------------------


def screen_dataset(
    dataset: Dataset,
    *,
    screen: Screen | None,
    policy: DatasetPolicy,
    refusal_markers: Sequence[str],
    classify: Classify | None = None,
    pause_every_ms: float | None = 1.0,
) -> DatasetResult:
    """Every row of ``dataset`` judged by ``screen``'s rules, ``classify`` (if given) and
    the training-data checks, and the verdict ``policy`` gives the dataset (module
    docstring). ``pause_every_ms``: how much work between two moments the GIL is given up
    (None: never, for a process of its own)."""
    screen = screen or _NO_RULES
    pace = _Pacer(pause_every_ms)
    rows = dataset.rows
    judged: list[_Judged] = []
    for row in rows:
        judged.append(
            _Judged(
                screen.check(row.prompt_text),
                screen.check(row.answer_text),
                _guardrail(row.prompt_text),
                _guardrail(row.answer_text),
            )
        )
        pace()
    failure: str | None = None
    if classify is not None:
        try:
            _classify_all(judged, rows, screen, classify, pace)
        except ClassifierFailed as exc:
            failure = str(exc)
    findings: list[RowFinding] = []
    categories: Counter[str] = Counter()
    blocked_by: Counter[str] = Counter()
    flagged_by: Counter[str] = Counter()
    blocked_lines: set[int] = set()
    flagged_lines: set[int] = set()
    for row, verdicts in zip(rows, judged, strict=True):
        if (
            verdicts.prompt is ALLOW
            and verdicts.answer is ALLOW
            and not (verdicts.guard_prompt or verdicts.guard_answer)
        ):
            continue  # nearly every row: nothing to gather
        row_findings, blocking, flagging = _findings(row, verdicts, refusal_markers)
        if not row_findings:
            continue
        findings += row_findings
        categories.update({c for finding in row_findings for c in finding.categories})
        if blocking:
            blocked_lines.add(row.line)
            blocked_by.update(blocking)
        else:
            flagged_lines.add(row.line)
            flagged_by.update(flagging)
        pace()
    return _verdict(
        dataset,
        policy,
        findings,
        dict(sorted(categories.items())),
        blocked_lines,
        flagged_lines,
        blocked_by,
        flagged_by,
        failure,
    )


def _verdict(
    dataset: Dataset,
    policy: DatasetPolicy,
    findings: list[RowFinding],
    categories: dict[str, int],
    blocked_lines: set[int],
    flagged_lines: set[int],
    blocked_by: Counter[str],
    flagged_by: Counter[str],
    failure: str | None,
) -> DatasetResult:
    total = len(dataset.rows)
    every = tuple(row.line for row in dataset.rows)
    if blocked_lines:
        verdict: str = policy.on_blocked
        reason = f"{_rows(len(blocked_lines), total)} blocked ({_tally(blocked_by)})"
        if flagged_lines:
            reason += f" and {len(flagged_lines):,} flagged ({_tally(flagged_by)})"
    elif flagged_lines:
        verdict = policy.on_flagged
        reason = f"{_rows(len(flagged_lines), total)} flagged ({_tally(flagged_by)})"
    else:
        verdict = "accept"
        reason = f"none of the {total:,} rows was flagged or blocked"
    kept = every
    if verdict == "accept_filtered":
        dropped = blocked_lines | flagged_lines
        kept = tuple(line for line in every if line not in dropped)
        if kept:
            reason += f"; the plan trains on the other {len(kept):,} rows"
        else:
            verdict = "reject"
            reason += "; the plan drops such rows, and none is left to train on"
    elif blocked_lines or flagged_lines:
        reason += {
            "accept": "; the plan accepts such datasets",
            "hold": "; the plan holds such datasets for review",
            "reject": "; the plan rejects such datasets",
        }[verdict]
    if failure is not None and verdict != "reject":
        verdict, kept = "hold", every
        reason = f"the classifier failed: {failure}; held for review ({reason})"
    return DatasetResult(
        verdict,  # type: ignore[arg-type]
        reason,
        total,
        len(flagged_lines),
        len(blocked_lines),
        kept if verdict != "reject" else (),
        tuple(findings),
        categories,
    )


def _rows(count: int, total: int) -> str:
    if count == total:
        return f"all {total:,} rows were" if total > 1 else "the only row was"
    return f"{count:,} of {total:,} rows {'was' if count == 1 else 'were'}"


def _tally(counts: Counter[str], most: int = 5) -> str:
    """``compliance:weapons 2, guardrail_override 1``: the commonest first, then by name."""
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    text = ", ".join(f"{name} {count:,}" for name, count in ordered[:most])
    if len(ordered) > most:
        text += f", {len(ordered) - most} more categories"
    return text
