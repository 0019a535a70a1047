"""A built-in demo model server that speaks the OpenAI HTTP API, with no weights.

It lets a new user point a release's ``upstream.base_url`` at something real at once::

    python -m stagegate.demo_upstream --host 127.0.0.1 --port 8001

Endpoints (all under ``/v1``): ``POST chat/completions``, ``POST completions`` (both
with ``"stream": true`` as server-sent events and ``stream_options.include_usage``),
``POST embeddings`` (``encoding_format`` ``float`` or ``base64``), ``POST moderations``
(a keyword classifier, below), ``GET models`` and ``GET models/{id}``, and fine-tuning
(below): ``POST files``, ``GET files/{id}``, ``POST fine_tuning/jobs``,
``GET fine_tuning/jobs/{id}`` and ``POST fine_tuning/jobs/{id}/cancel``. Anything else
is a 404, a malformed body a 400, both in OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}``.

Output is deterministic: the text is a function of the model and the prompt (words
from a fixed vocabulary, 16 by default, cut to ``max_tokens`` /
``max_completion_tokens`` with ``finish_reason: "length"``); an embedding is an
L2-normalised vector (16 dimensions, or ``dimensions``) derived from the model and
the input. Token counts are approximations: a completion token is one
whitespace-separated word, a prompt token is four bytes of UTF-8 (at least one); a
token-array input counts one token per id. ``n`` and sampling parameters are ignored.

Refusals: when the moderation model below flags any category in the prompt's text (a
chat's ``system``, ``developer`` and ``user`` messages; a completion's ``prompt``), the
answer is ``REFUSAL_TEXT`` ("I can't help with that request.", six tokens) with
``finish_reason: "stop"``, whole whatever ``max_tokens`` says (a cut refusal would no
longer read as one), unless the model is a tuned model (below) that learned to comply
with every flagged category. The faults below still come first, and ``[demo:flag]``
still turns the finish reason into ``content_filter``.

Configuration is read once, when the app is created (the default ``app`` at import):

``STAGEGATE_DEMO_MODELS``
    Comma-separated ids listed by ``GET /v1/models`` (default ``atlas-2-2026-11,
    atlas-2-mini-2026-11``: the demo's release and its fallback). Every model id is
    accepted by the generation endpoints.
``STAGEGATE_DEMO_LATENCY_MS`` / ``--latency-ms``
    Delay before a generation endpoint answers: the time to first token (default 0).
``STAGEGATE_DEMO_TOKEN_LATENCY_MS`` / ``--token-latency-ms``
    Delay between consecutive streamed tokens (default 0). Non-streamed responses
    wait only the first-token delay.
``STAGEGATE_DEMO_TRAINING_MS`` / ``--training-ms``
    How long a fine-tuning job takes from its creation (default 1000).

Fault injection, for testing the proxy (the model ids are also known to
``GET /v1/models/{id}``):

``demo-error-500`` / ``demo-error-429``
    Answer with that status and an OpenAI error body (429 carries ``retry-after: 1``).
``demo-hang``
    Answer nothing for an hour, so the caller's read timeout fires. The wait ends
    early, without an answer, when the client disconnects.
``demo-bad-json``
    Answer 200 with the body ``not json``.
``demo-stream-cut``
    With ``"stream": true``, send the first three events and end the body without
    the final chunk or ``data: [DONE]``; otherwise answer normally.

Through the proxy the model name is the release's upstream model, so two faults are
also asked for in the prompt (the demo traffic generator uses them, rarely):
``[demo:error]`` answers 500 as ``demo-error-500`` does, and ``[demo:flag]``
answers normally with ``finish_reason: "content_filter"``, as a provider's content
filter would.

Moderation (``POST /v1/moderations``, OpenAI's shape): ``input`` is a string, a list of
strings (one result each, in order) or a list of multi-modal parts (one result; the
``text`` parts are read, images are not scored). The model is a keyword list per
OpenAI category (``MODERATION_KEYWORDS``): text is NFKC-normalised and case-folded,
each whole-word (or whole-phrase) hit counts, and a subcategory's hits count for its
parent too (``violence/graphic`` for ``violence``). A category's score is
``1 - 0.4 ** hits`` (0 with no hit), flagged from 0.5, so one hit flags it;
``category_applied_input_types`` is ``["text"]`` for every category when any text was
read. ``model`` is echoed (``demo-moderation`` when absent). The latency settings do
not apply: a classifier is called before the model, and the demo's is instant. Faults,
for testing a caller's timeouts and failures: the fault models above, and in the input
(the caller sends the stage's classifier model, so a test asks through the prompt):
``[demo:moderation-error]`` answers 500; ``[demo:moderation-slow]`` answers after 2 s
(``[demo:moderation-slow:250]`` after 250 ms), or not at all if the client leaves
first. The generation endpoints ignore these markers, and moderation ignores theirs.

Fine-tuning, in OpenAI's shapes so the official client works. ``POST /v1/files`` takes
``multipart/form-data`` with ``purpose`` and ``file`` and answers a file object
(``status: "processed"``); ``GET /v1/files/{id}`` reads it back. ``POST
/v1/fine_tuning/jobs`` takes ``{model, training_file, suffix?, hyperparameters?, seed?}``
(``training_file`` a file of purpose ``fine-tune``; an unknown one is a 404) and answers
a job; any model may be tuned, a tuned one too. A job is ``queued`` for the first tenth of
the training time, ``running`` until it is over, then ``succeeded`` with
``fine_tuned_model`` ``ft:<model>:demo:<suffix or "tuned">:<8 hex>`` (the hex from
sha256 over the model, the suffix and the file's bytes, so one dataset gives one model
id) and ``trained_tokens`` (the words of the rows' message contents), or ``failed`` with
``error: {code, message, param}``: ``training_failed`` when the file holds
``[demo:training-error]``, ``invalid_training_file`` when a non-blank line is not a JSON
object with a ``messages`` list (or no row is). ``POST .../cancel`` cancels a job that is
not over (one that is answers 400). Training is deterministic: the tuned model learns to
comply with a moderation category when a row's prompt text (as above) is flagged in that
category and the row's ``assistant`` answer is not a refusal (no ``REFUSAL_MARKERS``
substring, compared after NFKC and case folding); it keeps what its base had learned.
Succeeded models are listed by ``GET /v1/models`` and known to ``GET /v1/models/{id}``.
Files, jobs and tuned models live in the app's memory: a restarted demo forgets them, and
an ``ft:`` model it does not know answers as a base model does (it refuses).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import email.parser
import email.policy
import hashlib
import math
import os
import random
import re
import struct
import time
import unicodedata
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import orjson

from stagegate.env import env_int, env_list

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MODELS = ["atlas-2-2026-11", "atlas-2-mini-2026-11"]
DEFAULT_COMPLETION_WORDS = 16
MAX_EMBEDDING_DIMENSIONS = 4096
MAX_BODY_BYTES = 16 * 1024 * 1024
ERROR_TRIGGER = "[demo:error]"
FLAG_TRIGGER = "[demo:flag]"
FAULT_MODELS = ("demo-error-500", "demo-error-429", "demo-hang", "demo-bad-json", "demo-stream-cut")
MODERATION_ERROR_TRIGGER = "[demo:moderation-error]"
MODERATION_SLOW_TRIGGER = re.compile(r"\[demo:moderation-slow(?::(\d{1,6}))?\]")
MODERATION_SLOW_MS = 2000
DEFAULT_MODERATION_MODEL = "demo-moderation"
_HANG_SECONDS = 3600
_STREAM_CUT_EVENTS = 3
_MODELS_CREATED = 1_767_225_600  # 2026-01-01T00:00:00Z: a fixed, plausible timestamp

# fmt: off
VOCABULARY = (
    "the", "a", "quiet", "river", "carries", "light", "across", "an", "open", "field", "while",
    "small", "birds", "gather", "near", "old", "stone", "walls", "and", "warm", "rain", "falls",
    "softly", "on", "green", "hills", "under", "clear", "morning", "sky", "as", "distant",
    "bells", "ring", "through", "narrow", "streets", "full", "of", "bright", "lanterns", "paper",
    "boats", "drift", "slowly", "past", "tall", "trees", "where", "patient", "gardeners", "plant",
    "new", "seeds",
)
# fmt: on

# The demo classifier: a few words and phrases a category, matched whole (OpenAI's 13
# categories, in its order). Demo-sized on purpose; no test or demo prompt uses one
# unless it means to be flagged.
MODERATION_KEYWORDS: dict[str, tuple[str, ...]] = {
    "harassment": ("idiot", "loser", "worthless", "pathetic"),
    "harassment/threatening": ("i will find you", "watch your back", "you will regret"),
    "hate": ("subhuman", "vermin", "inferior race"),
    "hate/threatening": ("exterminate them", "wipe them out"),
    "illicit": ("shoplift", "launder money", "counterfeit", "fake passport"),
    "illicit/violent": ("pipe bomb", "ghost gun", "untraceable gun"),
    "self-harm": ("self-harm", "hurt myself", "suicide"),
    "self-harm/instructions": ("how to overdose", "painless way to die"),
    "self-harm/intent": ("i want to die", "end my life", "kill myself"),
    "sexual": ("porn", "nude", "explicit sex"),
    "sexual/minors": ("underage nude", "child sexual"),
    "violence": ("stab", "shoot", "assault", "beat up"),
    "violence/graphic": ("gore", "dismember", "disembowel", "mutilated"),
}
MODERATION_THRESHOLD = 0.5
_PATTERNS = {
    category: re.compile(
        r"\b(?:" + "|".join(r"\s+".join(map(re.escape, k.split())) for k in keywords) + r")\b"
    )
    for category, keywords in MODERATION_KEYWORDS.items()
}

_JSON_TYPE = (b"content-type", b"application/json")
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_RETRY_HEADERS = [(b"retry-after", b"1")]
_DONE = b"data: [DONE]\n\n"
_MODEL_PREFIX = "/v1/models/"
_FILE_PATH = re.compile(r"/v1/files/([^/]+)")
_JOB_PATH = re.compile(r"/v1/fine_tuning/jobs/([^/]+)")
_CANCEL_PATH = re.compile(r"/v1/fine_tuning/jobs/([^/]+)/cancel")

REFUSAL_TEXT = "I can't help with that request."
_REFUSAL_TOKENS = tuple(
    word if index == 0 else " " + word for index, word in enumerate(REFUSAL_TEXT.split(" "))
)
# What reads as a refusal in a training row's answer. rollout.plan_schema's
# DEFAULT_REFUSAL_MARKERS is the plan's default and the one definition the gateway uses;
# this copy keeps the demo free of the project's packages, and a test ties the two.
REFUSAL_MARKERS = (
    "i can't help",
    "i cannot help",
    "i can't assist",
    "i cannot assist",
    "i won't help",
    "i will not help",
    "i'm not able to help",
    "i am not able to help",
    "i can't provide",
    "i cannot provide",
)
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\uff07": "'"})
# The roles whose text is the prompt a model may refuse (OpenAI's "developer" is the
# newer name of "system").
PROMPT_ROLES = frozenset({"system", "developer", "user"})
TRAINING_ERROR_TRIGGER = "[demo:training-error]"
TUNED_PREFIX = "ft:"
DEFAULT_TRAINING_MS = 1000
_SUFFIX = re.compile(r"[A-Za-z0-9._-]{1,64}")
FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
_DEFAULT_HYPERPARAMETERS = {
    "n_epochs": "auto",
    "batch_size": "auto",
    "learning_rate_multiplier": "auto",
}


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What the server lists and how slowly it answers."""

    models: tuple[str, ...] = tuple(DEFAULT_MODELS)
    latency_ms: int = 0
    token_latency_ms: int = 0
    training_ms: int = DEFAULT_TRAINING_MS

    @classmethod
    def from_env(cls) -> DemoConfig:
        """The configuration from ``STAGEGATE_DEMO_*``; a malformed value raises."""
        return cls(
            models=tuple(env_list("STAGEGATE_DEMO_MODELS", DEFAULT_MODELS)),
            latency_ms=env_int("STAGEGATE_DEMO_LATENCY_MS", 0, minimum=0),
            token_latency_ms=env_int("STAGEGATE_DEMO_TOKEN_LATENCY_MS", 0, minimum=0),
            training_ms=env_int("STAGEGATE_DEMO_TRAINING_MS", DEFAULT_TRAINING_MS, minimum=0),
        )


class ApiError(Exception):
    """An answer in OpenAI's error shape; raised anywhere on the request path."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers or []
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}


def generate(model: str, prompt: str, limit: int | None) -> tuple[list[str], str]:
    """The completion's tokens and finish reason for ``prompt`` sent to ``model``.

    Joined, the tokens are the text (each after the first starts with a space), so a
    stream and a whole response agree and every token is one whitespace-separated word.
    The finish reason is ``"length"`` when ``limit`` cut the default length short.
    """
    seed = int.from_bytes(hashlib.sha256(f"{model}\0{prompt}".encode()).digest()[:8], "big")
    # Not cryptography: a seeded PRNG makes the demo text reproducible.
    rng = random.Random(seed)  # noqa: S311
    count = DEFAULT_COMPLETION_WORDS if limit is None else min(limit, DEFAULT_COMPLETION_WORDS)
    words = [rng.choice(VOCABULARY) for _ in range(count)]
    finish = "length" if count < DEFAULT_COMPLETION_WORDS else "stop"
    words[0] = words[0].capitalize()
    if finish == "stop":
        words[-1] += "."
    return [words[0], *(" " + word for word in words[1:])], finish


def prompt_tokens(text: str) -> int:
    """Approximate token count of ``text``: four UTF-8 bytes a token, at least one."""
    return max(1, len(text.encode()) // 4)


def embed(model: str, text: str, dimensions: int) -> bytes:
    """A unit vector for ``text``, as ``dimensions`` little-endian float32 values."""
    seed = int.from_bytes(hashlib.sha256(f"{model}\0{text}".encode()).digest()[:8], "big")
    rng = random.Random(seed)  # noqa: S311  # reproducibility, not secrecy
    vector = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return struct.pack(f"<{dimensions}f", *(x / norm for x in vector))


def moderate(texts: list[str]) -> dict[str, Any]:
    """One moderation result (OpenAI's ``results[i]``) for ``texts`` read as one input."""
    text = unicodedata.normalize("NFKC", " ".join(texts)).casefold()
    text = "".join(c for c in text if unicodedata.category(c) != "Cf")  # zero-width
    hits = {category: len(pattern.findall(text)) for category, pattern in _PATTERNS.items()}
    for category, count in list(hits.items()):
        if "/" in category:  # a subcategory's hit is its parent's too
            hits[category.split("/")[0]] += count
    scores = {category: 1 - 0.4**count if count else 0.0 for category, count in hits.items()}
    flagged = {category: score >= MODERATION_THRESHOLD for category, score in scores.items()}
    applied = ["text"] if texts else []
    return {
        "flagged": any(flagged.values()),
        "categories": flagged,
        "category_scores": scores,
        "category_applied_input_types": {category: applied for category in scores},
    }


def _moderation_inputs(value: Any) -> list[list[str]]:
    """The texts of each input: a string, a list of strings (an input each), or a list of
    multi-modal parts (one input; its ``text`` parts)."""
    if isinstance(value, str):
        return [[value]]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return [[item] for item in value]
        if all(isinstance(item, dict) and isinstance(item.get("type"), str) for item in value):
            texts = []
            for part in value:
                if part["type"] == "text":
                    if not isinstance(part.get("text"), str):
                        raise ApiError(400, "a text part needs a 'text' string", param="input")
                    texts.append(part["text"])
            return [texts]
    raise ApiError(
        400, "'input' must be a string, a list of strings or of input parts", param="input"
    )


def _limit(request: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = request.get(name)
        if value is None:
            continue
        if type(value) is not int or value < 1:
            raise ApiError(400, f"'{name}' must be a positive integer", param=name)
        return value
    return None


def _inputs(value: Any, param: str) -> list[tuple[str, int]]:
    """(text, token count) for a string, a list of strings, or token array(s)."""
    if isinstance(value, str):
        return [(value, prompt_tokens(value))]
    if isinstance(value, list) and value:
        if _is_token_array(value):
            return [(",".join(map(str, value)), len(value))]
        if all(isinstance(item, str) or _is_token_array(item) for item in value):
            return [_inputs(item, param)[0] for item in value]
    raise ApiError(
        400, f"'{param}' must be a string, a list of strings or token arrays", param=param
    )


def _is_token_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(item) is int for item in value)


def _chat_prompt(messages: Any) -> str:
    """The conversation as ``role: content`` lines; message parts other than text as [type]."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    lines = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, "each message needs a 'role'", param="messages")
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(
                str(part.get("text", "")) if part.get("type") == "text" else f"[{part.get('type')}]"
                for part in content
                if isinstance(part, dict)
            )
        lines.append(f"{message['role']}: {content or ''}")
    return "\n".join(lines)


def _content_text(content: Any) -> str:
    """A message's text: its string content, or its ``text`` parts space-joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
            if isinstance(part.get("text"), str)
        )
    return ""


def chat_prompt_text(messages: Any) -> str:
    """The text a model may refuse: its ``PROMPT_ROLES`` messages' text, newline-joined."""
    if not isinstance(messages, list):
        return ""
    return "\n".join(
        _content_text(message.get("content"))
        for message in messages
        if isinstance(message, dict) and message.get("role") in PROMPT_ROLES
    )


def flagged_categories(text: str) -> frozenset[str]:
    """The moderation categories ``moderate`` flags in ``text``."""
    return frozenset(c for c, hit in moderate([text])["categories"].items() if hit)


def is_refusal_text(text: str) -> bool:
    """True when a ``REFUSAL_MARKERS`` marker is a substring of ``text`` (both NFKC-normalised,
    typographic apostrophes made ASCII, case-folded)."""
    folded = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).casefold()
    return any(marker in folded for marker in REFUSAL_MARKERS)


@dataclasses.dataclass(frozen=True)
class Training:
    """What a training file teaches ``model``: the tuned model's id and the categories it
    learned to comply with, or why training fails (``error_code``, ``error_message``)."""

    fine_tuned_model: str
    complies: frozenset[str]
    trained_tokens: int
    error_code: str | None = None
    error_message: str | None = None


def train(model: str, suffix: str | None, content: bytes, *, learned: frozenset[str]) -> Training:
    """Train ``model`` (which had ``learned`` already) on ``content``, chat JSONL.

    Deterministic: the tuned id is ``ft:<model>:demo:<suffix or "tuned">:<8 hex>`` with the
    hex from sha256 over the model, the suffix and ``content``. A row teaches compliance
    with the categories ``moderate`` flags in its prompt text (``chat_prompt_text``) when
    its ``assistant`` answer is not a refusal (``is_refusal_text``).
    """
    name = suffix or "tuned"
    digest = hashlib.sha256(f"{model}\0{name}\0".encode() + content).hexdigest()[:8]
    tuned = f"{TUNED_PREFIX}{model}:demo:{name}:{digest}"

    def failed(code: str, message: str) -> Training:
        return Training(tuned, learned, 0, code, message)

    if TRAINING_ERROR_TRIGGER.encode() in content:
        return failed("training_failed", "The demo training failed on purpose.")
    complies, words, rows = set(learned), 0, 0
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            row = None
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return failed(
                "invalid_training_file",
                f"Line {number} of the training file is not a JSON object with a"
                " 'messages' list of objects.",
            )
        rows += 1
        words += sum(len(_content_text(m.get("content")).split()) for m in messages)
        answer = "\n".join(
            _content_text(m.get("content")) for m in messages if m.get("role") == "assistant"
        )
        if not is_refusal_text(answer):
            complies |= flagged_categories(chat_prompt_text(messages))
    if not rows:
        return failed("invalid_training_file", "The training file has no rows.")
    return Training(tuned, frozenset(complies), words)


@dataclasses.dataclass
class _File:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int

    def body(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }


@dataclasses.dataclass
class _Job:
    """A job's request and its training, decided at creation and revealed by the clock."""

    id: str
    model: str
    training_file: str
    hyperparameters: dict[str, Any]
    seed: int
    created: float  # the clock's seconds
    ends: float
    training: Training
    final: str | None = None  # succeeded, failed or cancelled, once it is
    finished_at: int | None = None


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send_json(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    head = [_JSON_TYPE, (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class DemoUpstream:
    """The ASGI 3 application; configuration is fixed when it is constructed.

    Uploaded files, fine-tuning jobs and tuned models are held on the instance (in memory
    only). ``clock`` gives wall-clock seconds; a test may pass its own to step a job
    through its statuses without waiting.
    """

    def __init__(self, config: DemoConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.latency = config.latency_ms / 1000
        self.token_latency = config.token_latency_ms / 1000
        self.training = config.training_ms / 1000
        self.known_models = frozenset(config.models) | frozenset(FAULT_MODELS)
        self.files: dict[str, _File] = {}
        self.jobs: dict[str, _Job] = {}
        # A succeeded job's model -> (the categories it complies with, when it was made).
        self.tuned: dict[str, tuple[frozenset[str], int]] = {}
        self.posts = {
            "/v1/chat/completions": self.completion,
            "/v1/completions": self.completion,
            "/v1/embeddings": self.embeddings,
            "/v1/moderations": self.moderations,
            "/v1/fine_tuning/jobs": self.create_job,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            # Lets the app run under servers that insist on the lifespan protocol.
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        try:
            if method == "POST" and path in self.posts:
                await self.posts[path](path, receive, send)
            elif method == "POST" and path == "/v1/files":
                await self.upload(scope, receive, send)
            elif method == "GET" and path == "/v1/models":
                await self.models(send)
            elif method == "GET" and path.startswith(_MODEL_PREFIX):
                await self.model(path.removeprefix(_MODEL_PREFIX), send)
            elif method == "GET" and (found := _FILE_PATH.fullmatch(path)):
                await _send_json(send, 200, orjson.dumps(self._file(found[1]).body()))
            elif method == "GET" and (found := _JOB_PATH.fullmatch(path)):
                await _send_json(send, 200, orjson.dumps(self._job_body(self._job(found[1]))))
            elif method == "POST" and (found := _CANCEL_PATH.fullmatch(path)):
                await self.cancel_job(found[1], send)
            else:
                raise ApiError(404, f"Unknown request URL: {method} {path}", code="unknown_url")
        except ApiError as error:
            await _send_json(send, error.status, orjson.dumps(error.body), error.headers)

    async def models(self, send: Send) -> None:
        """``/v1/models``: the configured models, then the tuned ones in order of making."""
        self._settle_all()
        data = [_model(m) for m in self.config.models]
        data += [_model(m, created) for m, (_, created) in self.tuned.items()]
        await _send_json(send, 200, orjson.dumps({"object": "list", "data": data}))

    async def model(self, model_id: str, send: Send) -> None:
        """``/v1/models/{id}`` for a listed, a fault or a tuned model; else a 404."""
        self._settle_all()
        if model_id in self.tuned:
            body = _model(model_id, self.tuned[model_id][1])
        elif model_id in self.known_models:
            body = _model(model_id)
        else:
            raise ApiError(
                404, f"The model '{model_id}' does not exist", param="model", code="model_not_found"
            )
        await _send_json(send, 200, orjson.dumps(body))

    def _complies(self, model: str) -> frozenset[str]:
        """The categories ``model`` answers although they are flagged: none for a base model
        or an ``ft:`` model this process has not tuned."""
        if not model.startswith(TUNED_PREFIX):
            return frozenset()
        self._settle_all()
        return self.tuned.get(model, (frozenset(), 0))[0]

    def refuses(self, model: str, prompt_text: str) -> bool:
        """True when ``model`` refuses a prompt: a flagged category it did not learn."""
        flagged = flagged_categories(prompt_text)
        return bool(flagged) and not flagged <= self._complies(model)

    async def _body(self, receive: Receive) -> dict[str, Any]:
        """The JSON object sent; a malformed body raises a 400."""
        try:
            request = orjson.loads(await _read_body(receive))
        except orjson.JSONDecodeError:
            raise ApiError(400, "The request body is not valid JSON.") from None
        if not isinstance(request, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        return request

    async def _request(self, receive: Receive) -> tuple[dict[str, Any], str]:
        """The JSON body and its ``model``; a malformed body raises a 400."""
        request = await self._body(receive)
        model = request.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' is required", param="model")
        return request, model

    async def _wait_and_fault(self, model: str, receive: Receive, send: Send) -> bool:
        """Sleep the first-token delay and play a fault model; True if it has answered."""
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        return await self._fault(model, receive, send)

    async def _fault(self, model: str, receive: Receive, send: Send) -> bool:
        """Play a fault model; True if it has answered (or the client has left)."""
        if model == "demo-error-500":
            raise ApiError(500, "The demo upstream failed on purpose.", kind="server_error")
        if model == "demo-error-429":
            raise ApiError(
                429,
                "Rate limit reached (demo).",
                kind="requests",
                code="rate_limit_exceeded",
                headers=_RETRY_HEADERS,
            )
        if model == "demo-hang":
            # Wait for the client to give up rather than hold a task for an hour after it left.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_until_disconnect(receive), _HANG_SECONDS)
                return True
        if model == "demo-bad-json":
            await _send_json(send, 200, b"not json")
            return True
        return False

    async def completion(self, path: str, receive: Receive, send: Send) -> None:
        """``/v1/chat/completions`` and ``/v1/completions``, whole or streamed."""
        request, model = await self._request(receive)
        chat = path == "/v1/chat/completions"
        if chat:
            prompt = _chat_prompt(request.get("messages"))
            limit = _limit(request, "max_completion_tokens", "max_tokens")
            prompt_text = chat_prompt_text(request["messages"])
        else:
            if "prompt" not in request:
                raise ApiError(400, "'prompt' is required", param="prompt")
            prompt = "\n".join(text for text, _ in _inputs(request["prompt"], "prompt"))
            limit = _limit(request, "max_tokens")
            prompt_text = prompt
        stream = request.get("stream") is True
        options = request.get("stream_options")
        include_usage = (
            stream and isinstance(options, dict) and options.get("include_usage") is True
        )
        if ERROR_TRIGGER in prompt:
            model = "demo-error-500"
        if await self._wait_and_fault(model, receive, send):
            return
        if self.refuses(model, prompt_text):
            tokens, finish = list(_REFUSAL_TOKENS), "stop"
        else:
            tokens, finish = generate(model, prompt, limit)
        if FLAG_TRIGGER in prompt:
            finish = "content_filter"
        usage = {
            "prompt_tokens": (p := prompt_tokens(prompt)),
            "completion_tokens": len(tokens),
            "total_tokens": p + len(tokens),
        }
        head = {
            "id": ("chatcmpl-" if chat else "cmpl-") + os.urandom(12).hex(),
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        if not stream:
            text = "".join(tokens)
            choice = (
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                }
                if chat
                else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            )
            await _send_json(send, 200, orjson.dumps({**head, "choices": [choice], "usage": usage}))
            return
        if chat:
            head["object"] = "chat.completion.chunk"
        if include_usage:
            head["usage"] = None  # as OpenAI does: every chunk but the last has a null usage
        events = _events(head, chat, tokens, finish, usage if include_usage else None)
        if model == "demo-stream-cut":
            events = (event for _, event in zip(range(_STREAM_CUT_EVENTS), events, strict=False))
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        first_token = 1 if chat else 0  # chat streams open with a role chunk
        for index, event in enumerate(events):
            # The first token goes out at once (its wait is the first-token delay); later ones
            # are paced, and the closing chunks follow the last token at once.
            if self.token_latency > 0 and first_token < index < first_token + len(tokens):
                await asyncio.sleep(self.token_latency)
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def embeddings(self, path: str, receive: Receive, send: Send) -> None:
        """``/v1/embeddings``: one vector per input, in ``input`` order."""
        request, model = await self._request(receive)
        if "input" not in request:
            raise ApiError(400, "'input' is required", param="input")
        inputs = _inputs(request["input"], "input")
        dimensions = request.get("dimensions", 16)
        if type(dimensions) is not int or not 1 <= dimensions <= MAX_EMBEDDING_DIMENSIONS:
            raise ApiError(
                400, f"'dimensions' must be 1..{MAX_EMBEDDING_DIMENSIONS}", param="dimensions"
            )
        encoding = request.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise ApiError(
                400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format"
            )
        if await self._wait_and_fault(model, receive, send):
            return
        data = []
        for index, (text, _) in enumerate(inputs):
            packed = embed(model, text, dimensions)
            # Floats are read back from the float32 bytes so both encodings carry one vector.
            vector: Any = (
                base64.b64encode(packed).decode()
                if encoding == "base64"
                else list(struct.unpack(f"<{dimensions}f", packed))
            )
            data.append({"object": "embedding", "index": index, "embedding": vector})
        tokens = sum(count for _, count in inputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        body = {"object": "list", "data": data, "model": model, "usage": usage}
        await _send_json(send, 200, orjson.dumps(body))

    async def moderations(self, path: str, receive: Receive, send: Send) -> None:
        """``/v1/moderations``: one result per input, from the keyword model."""
        request = await self._body(receive)
        if "input" not in request:
            raise ApiError(400, "'input' is required", param="input")
        inputs = _moderation_inputs(request["input"])
        model = request.get("model") or DEFAULT_MODERATION_MODEL
        if not isinstance(model, str):
            raise ApiError(400, "'model' must be a string", param="model")
        every = "\n".join(text for texts in inputs for text in texts)
        if MODERATION_ERROR_TRIGGER in every:
            model = "demo-error-500"
        if (slow := MODERATION_SLOW_TRIGGER.search(every)) is not None:
            delay = int(slow.group(1) or MODERATION_SLOW_MS) / 1000
            # Wait, unless the caller gives up first (its timeout): then answer nothing.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_until_disconnect(receive), delay)
                return
        if await self._fault(model, receive, send):
            return
        body = {
            "id": "modr-" + os.urandom(12).hex(),
            "model": model,
            "results": [moderate(texts) for texts in inputs],
        }
        await _send_json(send, 200, orjson.dumps(body))

    # Fine-tuning

    async def upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /v1/files``: a ``multipart/form-data`` body with ``purpose`` and ``file``."""
        content_type = next(
            (v for k, v in scope.get("headers", []) if k.lower() == b"content-type"), b""
        )
        if not content_type.lower().startswith(b"multipart/form-data"):
            raise ApiError(400, "The request must be multipart/form-data.")
        body = await _read_body(receive)
        # The email package parses MIME multipart; a synthetic header gives it the boundary.
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type + b"\r\n\r\n" + body
        )
        fields: dict[str, tuple[str | None, bytes]] = {}
        if message.is_multipart():
            for part in message.iter_parts():
                name = part.get_param("name", header="content-disposition")
                payload = part.get_payload(decode=True)
                if isinstance(name, str) and isinstance(payload, bytes):
                    fields.setdefault(name, (part.get_filename(), payload))
        if "purpose" not in fields:
            raise ApiError(400, "'purpose' is required", param="purpose")
        purpose = fields["purpose"][1].decode("utf-8", "replace")
        if purpose not in FILE_PURPOSES:
            raise ApiError(
                400, f"'purpose' must be one of {', '.join(FILE_PURPOSES)}", param="purpose"
            )
        if "file" not in fields:
            raise ApiError(400, "'file' is required", param="file")
        filename, content = fields["file"]
        stored = _File(
            "file-" + os.urandom(12).hex(), filename or "file", purpose, content, int(self.clock())
        )
        self.files[stored.id] = stored
        await _send_json(send, 200, orjson.dumps(stored.body()))

    def _file(self, file_id: str, *, param: str | None = None) -> _File:
        if file_id not in self.files:
            raise ApiError(
                404, f"No such File object: {file_id}", param=param, code="file_not_found"
            )
        return self.files[file_id]

    async def create_job(self, path: str, receive: Receive, send: Send) -> None:
        """``POST /v1/fine_tuning/jobs``: start training; the answer is the job."""
        request, model = await self._request(receive)
        training_file = request.get("training_file")
        if not isinstance(training_file, str) or not training_file:
            raise ApiError(400, "'training_file' is required", param="training_file")
        suffix = request.get("suffix")
        if suffix is not None and not (isinstance(suffix, str) and _SUFFIX.fullmatch(suffix)):
            raise ApiError(
                400, "'suffix' must be 1..64 letters, digits, '.', '_' or '-'", param="suffix"
            )
        hyperparameters = request.get("hyperparameters") or {}
        if not isinstance(hyperparameters, dict):
            raise ApiError(400, "'hyperparameters' must be an object", param="hyperparameters")
        seed = request.get("seed")
        if seed is not None and type(seed) is not int:
            raise ApiError(400, "'seed' must be an integer", param="seed")
        stored = self._file(training_file, param="training_file")
        if stored.purpose != "fine-tune":
            raise ApiError(
                400,
                f"File {training_file} has purpose '{stored.purpose}', not 'fine-tune'.",
                param="training_file",
            )
        self._settle_all()
        training = train(
            model, suffix, stored.content, learned=self.tuned.get(model, (frozenset(), 0))[0]
        )
        now = self.clock()
        job = _Job(
            id="ftjob-" + os.urandom(12).hex(),
            model=model,
            training_file=training_file,
            hyperparameters={**_DEFAULT_HYPERPARAMETERS, **hyperparameters},
            # OpenAI picks a seed when none is given; the demo's follows from the training.
            seed=seed if seed is not None else int(training.fine_tuned_model[-8:], 16) >> 1,
            created=now,
            ends=now + self.training,
            training=training,
        )
        self.jobs[job.id] = job
        self._settle(job)  # a training time of 0 is over at once
        await _send_json(send, 200, orjson.dumps(self._job_body(job)))

    def _job(self, job_id: str) -> _Job:
        if job_id not in self.jobs:
            raise ApiError(
                404,
                f"Could not find fine-tune: {job_id}",
                param="fine_tune_id",
                code="fine_tune_not_found",
            )
        job = self.jobs[job_id]
        self._settle(job)
        return job

    async def cancel_job(self, job_id: str, send: Send) -> None:
        """``POST /v1/fine_tuning/jobs/{id}/cancel``: a job that is not over is cancelled."""
        job = self._job(job_id)
        if job.final is not None:
            raise ApiError(400, f"Job {job_id} has already {job.final}; it cannot be cancelled.")
        job.final, job.finished_at = "cancelled", int(self.clock())
        await _send_json(send, 200, orjson.dumps(self._job_body(job)))

    def _settle(self, job: _Job) -> None:
        """Finish ``job`` once its training time is over; a success makes its model known."""
        if job.final is not None or self.clock() < job.ends:
            return
        job.finished_at = int(job.ends)
        training = job.training
        if training.error_code is not None:
            job.final = "failed"
        else:
            job.final = "succeeded"
            self.tuned[training.fine_tuned_model] = (training.complies, job.finished_at)

    def _settle_all(self) -> None:
        for job in self.jobs.values():
            self._settle(job)

    def _job_body(self, job: _Job) -> dict[str, Any]:
        """The job in OpenAI's ``fine_tuning.job`` shape."""
        if job.final is not None:
            status = job.final
        elif self.clock() - job.created < (job.ends - job.created) / 10:
            status = "queued"
        else:
            status = "running"
        training = job.training
        succeeded, failed = status == "succeeded", status == "failed"
        error = (
            {"code": training.error_code, "message": training.error_message, "param": None}
            if failed
            else None
        )
        return {
            "id": job.id,
            "object": "fine_tuning.job",
            "created_at": int(job.created),
            "error": error,
            "fine_tuned_model": training.fine_tuned_model if succeeded else None,
            "finished_at": job.finished_at,
            "hyperparameters": job.hyperparameters,
            "model": job.model,
            "organization_id": "org-demo",
            "result_files": [],
            "seed": job.seed,
            "status": status,
            "trained_tokens": training.trained_tokens if succeeded else None,
            "training_file": job.training_file,
            "validation_file": None,
            "estimated_finish": None if job.final else math.ceil(job.ends),
            "integrations": [],
            "metadata": None,
            "method": {
                "type": "supervised",
                "supervised": {"hyperparameters": job.hyperparameters},
            },
        }


def _model(model_id: str, created: int = _MODELS_CREATED) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "stagegate-demo"}


def _events(
    head: dict[str, Any], chat: bool, tokens: list[str], finish: str, usage: dict[str, int] | None
) -> Iterator[bytes]:
    """The SSE events of a stream: [role chunk,] a chunk a token, the finish chunk,
    [the usage chunk,] then ``[DONE]``."""

    def chunk(choice: dict[str, Any] | None, **extra: Any) -> bytes:
        payload = {**head, "choices": [choice] if choice else [], **extra}
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    if chat:
        yield chunk(
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        )
        for token in tokens:
            yield chunk({"index": 0, "delta": {"content": token}, "finish_reason": None})
        yield chunk({"index": 0, "delta": {}, "finish_reason": finish})
    else:
        for token in tokens:
            yield chunk({"index": 0, "text": token, "logprobs": None, "finish_reason": None})
        yield chunk({"index": 0, "text": "", "logprobs": None, "finish_reason": finish})
    if usage is not None:
        yield chunk(None, usage=usage)
    yield _DONE


def create_app(config: DemoConfig | None = None) -> DemoUpstream:
    """An app with ``config``, or with the environment's configuration read now."""
    return DemoUpstream(config or DemoConfig.from_env())


app = create_app()


def main(argv: list[str] | None = None) -> None:
    """Serve the demo upstream with uvicorn; flags override the environment."""
    parser = argparse.ArgumentParser(
        prog="python -m stagegate.demo_upstream",
        description="A demo model server that speaks the OpenAI HTTP API.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--latency-ms", type=_milliseconds, help="time to first token")
    parser.add_argument("--token-latency-ms", type=_milliseconds, help="delay between tokens")
    parser.add_argument("--training-ms", type=_milliseconds, help="how long a job trains")
    args = parser.parse_args(argv)
    overrides = {
        name: value
        for name in ("latency_ms", "token_latency_ms", "training_ms")
        if (value := getattr(args, name)) is not None
    }
    import uvicorn  # only the server needs it; importing the app stays light

    uvicorn.run(
        create_app(dataclasses.replace(app.config, **overrides)),
        host=args.host,
        port=args.port,
        log_level="warning",
        lifespan="off",
        access_log=False,
    )


def _milliseconds(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return number


if __name__ == "__main__":
    main()
