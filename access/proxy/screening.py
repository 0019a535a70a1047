"""Screening in the proxy: a stage's rules and classifier, on prompts and on answers.

``screen_prompt`` runs once the decision has admitted a request and before its limits
are taken: the stage's rules (``access.screening.Screen.check``, in process), then its
classifier if it has one and the rules did not already block (``classify``: OpenAI's
``POST /v1/moderations`` through the worker's upstream session, within the stage's
``timeout_ms``). It writes the categories onto the ``Call``, keeps a flagged sample when
the stage says ``retain_flagged``, and:

- block: raises the 400 ``content_blocked`` (the category named, never the text);
- flag: returns, the request goes on;
- route: decides for the ``route_to`` release with the same key and organization
  (``decide_for``) and returns that release and its decision, which the call is then
  forwarded to, under its limits; if it does not admit the caller, the 400 as blocked;
- a classifier that fails (timeout, connection, a status other than 200, an answer
  that is not a moderation) raises the 503 ``screening_unavailable`` when the stage
  says ``on_failure: refuse``, and flags the request ``screening_unavailable`` when it
  says ``admit_and_flag``.

``AnswerScreen`` screens what the upstream answers when the stage's ``responses`` is
``buffer`` or ``audit``; ``access.upstream`` feeds it while relaying and the call reads
its categories and refusal afterwards. A whole (non-stream) answer is screened before it
is sent in both modes: there is nothing to stream. For a stream, ``buffer`` holds every
event until the whole answer is screened (rules and classifier), so a blocked answer is
a plain 400 and the client received nothing; ``audit`` sends each event once the text
so far passes the rules (each check reads the new text and up to ``AUDIT_OVERLAP``
characters before it, where a match across the pieces can start), checks the whole text
again at the end with the rules and the classifier before the last events, and a block
ends the stream with a ``finish_reason: "content_filter"`` chunk, an error event (code
``content_blocked``) and ``[DONE]``. A ``route`` rule that matches an answer flags it:
the answer is already the asked model's.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import aiohttp
import orjson

from access.decisions import Decision, KeyEntry, ReleaseEntry, RequestInfo
from access.proxy.common import Call, HTTPError, decide_for, error_body
from access.screening import ALLOW, Screen, Verdict, completion_text, prompt_text
from monitoring import metrics
from monitoring.records import FlagSample, excerpt

if TYPE_CHECKING:
    from access.proxy.app import Proxy
    from access.snapshot import Snapshot
    from access.upstream import Upstream
    from rollout.plan_schema import Classifier

UNAVAILABLE = "screening_unavailable"  # the category a classifier failure flags
# How far back, in characters, an audited stream's check reads before the new text: a
# match that ends in the new text and starts earlier than this is found by the check of
# the whole answer at the end instead.
AUDIT_OVERLAP = 256
WHITESPACE = re.compile(r"\s")
# A content chunk (its text to screen), as in access.upstream.
CONTENT = re.compile(rb'"(?:content|text)"\s*:\s*"[^"]')
DONE = b"data: [DONE]"


class ClassifierFailure(Exception):
    """The classifier gave no usable answer; the message says why (no request text)."""


def blocked(category: str | None, what: str = "request") -> HTTPError:
    """The refusal of a blocked prompt or answer: it names the category, never the text."""
    return HTTPError(
        400,
        "content_blocked",
        f"This {what} was blocked by the screening of this model's current stage"
        f" (category: {category}).",
        category=category,
    )


def unavailable(failure: ClassifierFailure) -> HTTPError:
    metrics.UNAVAILABLE.labels("classifier").inc()
    return HTTPError(
        503,
        UNAVAILABLE,
        f"Stagegate could not screen this request ({failure}); this model's current stage"
        " refuses what it cannot screen. Try again shortly.",
    )


# --- the classifier ---------------------------------------------------------------------------


async def classify(
    upstream: Upstream, call: Call, classifier: Classifier, text: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The categories of ``classifier.flag`` and of ``classifier.block`` that the
    classifier reports for ``text``; ``ClassifierFailure`` if it gives no usable answer
    within ``timeout_ms`` (the whole call, connecting included)."""
    body = {"input": text}
    if classifier.model:
        body["model"] = classifier.model
    try:
        async with upstream.session.post(
            classifier.url,
            data=orjson.dumps(body),
            headers=upstream.headers_for(call, identity=True),
            timeout=aiohttp.ClientTimeout(total=classifier.timeout_ms / 1000),
        ) as response:
            if response.status != 200:
                raise ClassifierFailure(f"the classifier answered {response.status}")
            payload = await response.read()
    except ClassifierFailure:
        raise
    except TimeoutError:
        raise ClassifierFailure(
            f"the classifier did not answer within {classifier.timeout_ms} ms"
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise ClassifierFailure(f"the classifier failed: {type(exc).__name__}") from None
    found = reported_categories(payload)
    if found is None:
        raise ClassifierFailure("the classifier's answer is not a moderation")
    return (
        tuple(category for category in classifier.flag if category in found),
        tuple(category for category in classifier.block if category in found),
    )


def reported_categories(payload: bytes) -> set[str] | None:
    """The categories a moderation answer (``{"results": [{"categories": {name: bool}}]}``)
    reports as true in any of its results; None when it is not such an answer."""
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    results = document.get("results") if isinstance(document, dict) else None
    if not isinstance(results, list) or not results:
        return None
    found: set[str] = set()
    for result in results:
        categories = result.get("categories") if isinstance(result, dict) else None
        if not isinstance(categories, dict):
            return None
        found.update(name for name, value in categories.items() if value is True)
    return found


async def judge(
    upstream: Upstream, call: Call, screen: Screen, text: str, *, refuse: bool
) -> Verdict:
    """The rules' verdict on ``text`` combined with the classifier's, if the stage has
    one and the rules did not block. A classifier failure raises the 503 when ``refuse``
    (the stage's ``on_failure: refuse`` and a refusal still possible), and otherwise
    flags ``screening_unavailable``."""
    verdict = screen.check(text)
    classifier = screen.classifier
    if classifier is None or verdict.action == "block" or not text:
        return verdict
    try:
        flagged, blocking = await classify(upstream, call, classifier, text)
    except ClassifierFailure as failure:
        if refuse and classifier.on_failure == "refuse":
            raise unavailable(failure) from None
        return screen.combine(verdict, (UNAVAILABLE,), ())
    if not flagged and not blocking:
        return verdict
    return screen.combine(verdict, flagged, blocking)


# --- prompts ----------------------------------------------------------------------------------


def unreadable_prompt(endpoint: str, document: dict) -> bool:
    """Whether the prompt comes as token ids (completions' ``prompt``, embeddings'
    ``input``): text screening cannot read them, so a screening stage refuses them."""
    if endpoint == "completions":
        value = document.get("prompt")
    elif endpoint == "embeddings":
        value = document.get("input")
    else:
        return False
    return isinstance(value, list) and any(not isinstance(item, str) for item in value)


async def screen_prompt(
    proxy: Proxy,
    call: Call,
    screen: Screen,
    snapshot: Snapshot,
    key: KeyEntry,
    document: dict,
    request: RequestInfo,
    now: float,
) -> tuple[ReleaseEntry, Decision] | None:
    """Screen an admitted request's prompt (see the module's docstring): None to go on
    as decided, the release and decision to route it to, or an ``HTTPError`` raised."""
    if unreadable_prompt(call.endpoint, document):
        raise HTTPError(
            400,
            "invalid_request",
            "This model's current stage screens prompts, and a prompt given as token ids"
            " cannot be screened: send it as text.",
        )
    text = prompt_text(call.endpoint, document)
    verdict = await judge(proxy.upstream, call, screen, text, refuse=True)
    if verdict.action == "allow":
        return None
    call.flags = verdict.categories
    routed = None
    if verdict.action == "route":
        fallback, decision = decide_for(snapshot, key, call.org, verdict.route_to, request, now)
        if decision.allowed:
            call.routed_to = fallback.name
            routed = fallback, decision
        else:  # the caller may not use the fallback: blocked after all
            verdict = Verdict("block", verdict.categories, verdict.category, None)
    keep_sample(proxy, call, screen, verdict, "prompt", text)
    if verdict.action == "block":
        raise blocked(verdict.category)
    return routed


def keep_sample(
    proxy: Proxy, call: Call, screen: Screen, verdict: Verdict, source: str, text: str
) -> None:
    """Keep a redacted excerpt of what screening flagged, blocked or routed, when the
    stage retains flagged requests. A classifier outage alone keeps nothing: it says
    nothing about the text."""
    if screen.retain_days is None or verdict.categories == (UNAVAILABLE,):
        return
    decision = call.decision
    proxy.recorder.record_sample(
        FlagSample(
            created_at=call.wall,
            request_id=call.request_id,
            release=call.model,
            stage=(decision.stage or "") if decision else "",
            tier=(decision.tier or "") if decision else "",
            org=call.org.public_id if call.org else "",
            key=call.key.public_id if call.key else "",
            categories=",".join(verdict.categories),
            source=source,
            action=verdict.action,
            excerpt=excerpt(text),
            retain_days=screen.retain_days,
        )
    )


def add_flags(call: Call, categories: tuple[str, ...]) -> None:
    if categories:
        call.flags = tuple(sorted({*call.flags, *categories}))


# --- answers ----------------------------------------------------------------------------------


class AnswerScreen:
    """Screens one call's answer as ``access.upstream`` relays it (``buffer`` or
    ``audit``, the stage's ``responses``).

    For a whole answer, ``passes(document)``. For a stream, ``take(event)`` for every
    event, then ``passes_whole()`` (``buffer``, before anything is sent) or ``cut()``
    after each batch of events and ``finish()`` at the end (``audit``); ``closing()``
    is what ends a cut stream. Afterwards ``verdict`` holds every category found and
    ``refusal`` the error to answer when nothing was sent.
    """

    __slots__ = (
        "_last",
        "_tails",
        "_texts",
        "_unchecked",
        "call",
        "mode",
        "refusal",
        "screen",
        "upstream",
        "verdict",
    )

    def __init__(self, upstream: Upstream, call: Call, screen: Screen) -> None:
        self.upstream = upstream
        self.call = call
        self.screen = screen
        self.mode = screen.responses  # buffer | audit
        self.verdict = ALLOW  # the worst found so far, with every category
        self.refusal: HTTPError | None = None  # answered instead when nothing was sent
        self._texts: dict[int, list[str]] = {}  # choice index -> its text, in pieces
        self._unchecked: dict[int, list[str]] = {}  # audit: the pieces not checked yet
        self._tails: dict[int, str] = {}  # audit: the end of the text checked so far
        self._last: dict | None = None  # the last content chunk, for the closing chunk

    # what was found

    def _note(self, verdict: Verdict) -> None:
        if verdict.action == "allow":
            return
        action = "block" if "block" in (verdict.action, self.verdict.action) else "flag"
        category = self.verdict.category if self.verdict.action == "block" else None
        if category is None and verdict.action == "block":
            category = verdict.category
        self.verdict = Verdict(
            action, tuple(sorted({*self.verdict.categories, *verdict.categories})), category, None
        )

    @property
    def blocked(self) -> bool:
        return self.verdict.action == "block"

    def text(self) -> str:
        """The answer so far, its choices one after the other."""
        return "\n".join("".join(self._texts[index]) for index in sorted(self._texts))

    async def _judge_whole(self, text: str, *, refuse: bool) -> bool:
        """Screen ``text`` with the rules and the classifier; False when it may not go
        out, with ``refusal`` set when ``refuse`` (nothing was sent yet)."""
        try:
            self._note(await judge(self.upstream, self.call, self.screen, text, refuse=refuse))
        except HTTPError as exc:  # the classifier failed and the stage refuses
            self.refusal = exc
            return False
        if self.blocked:
            if refuse:
                self.refusal = blocked(self.verdict.category, "answer")
            return False
        return True

    # a whole answer

    async def passes(self, document: dict) -> bool:
        """Screen a whole answer before it is sent: False to send nothing (``refusal``)."""
        text = completion_text(document)
        self._texts = {0: [text]}
        return await self._judge_whole(text, refuse=True)

    # a stream

    def take(self, event: bytes) -> bool:
        """Read the text an event carries; False if it carried none."""
        if not CONTENT.search(event):
            return False
        try:
            document = orjson.loads(event[event.find(b"{") :])
        except orjson.JSONDecodeError:
            return False
        choices = document.get("choices") if isinstance(document, dict) else None
        if not isinstance(choices, list):
            return False
        self._last = document
        found = False
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            index = choice.get("index", 0)
            if isinstance(piece, str) and piece and isinstance(index, int):
                self._texts.setdefault(index, []).append(piece)
                self._unchecked.setdefault(index, []).append(piece)
                found = True
        return found

    async def passes_whole(self) -> bool:
        """``buffer``: screen the held stream whole; False to send none of it."""
        return await self._judge_whole(self.text(), refuse=True)

    def cut(self) -> bool:
        """``audit``: check the text taken since the last check (and up to
        ``AUDIT_OVERLAP`` characters before it) with the rules; True to end the stream."""
        for index, pieces in self._unchecked.items():
            if not pieces:
                continue
            tail = self._tails.get(index, "")
            text = tail + "".join(pieces)
            pieces.clear()
            start = 0
            if len(tail) == AUDIT_OVERLAP:  # text came before the tail: start at a word
                space = WHITESPACE.search(tail)  # (a window cut mid-word could match
                if space is not None:  # the end of a word as a whole one)
                    start = space.end()
            self._tails[index] = text[-AUDIT_OVERLAP:]
            self._note(self.screen.check(text[start:] if start else text))
        return self.blocked

    async def finish(self) -> bool:
        """``audit``: screen the whole answer at its end (every rule on all of it, then
        the classifier); True to end the stream as cut. The text was sent already, so a
        classifier failure can only flag."""
        return not await self._judge_whole(self.text(), refuse=False)

    def closing(self) -> bytes:
        """The events that end a cut stream: a chunk with ``finish_reason:
        "content_filter"`` for every choice, an error event and ``[DONE]``."""
        last = self._last or {}
        chat = last.get("object") == "chat.completion.chunk" or any(
            isinstance(choice, dict) and "delta" in choice for choice in last.get("choices") or ()
        )
        indexes = sorted(self._texts) or [0]
        if chat:
            choices = [
                {"index": index, "delta": {}, "finish_reason": "content_filter"}
                for index in indexes
            ]
        else:
            choices = [
                {"index": index, "text": "", "finish_reason": "content_filter", "logprobs": None}
                for index in indexes
            ]
        chunk = {
            "id": last.get("id", self.call.request_id),
            "object": last.get("object", "chat.completion.chunk" if chat else "text_completion"),
            "created": last.get("created", int(self.call.wall)),
            "model": last.get("model", ""),
            "choices": choices,
        }
        refusal = blocked(self.verdict.category, "answer")
        error = error_body(400, refusal.code, refusal.message, category=refusal.category)
        return b"data: " + orjson.dumps(chunk) + b"\n\ndata: " + error + b"\n\n" + DONE + b"\n\n"
