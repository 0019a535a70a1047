"""The usage record: what the proxy hands ``monitoring`` for each request, and the small
integer codes its repeated words are stored as.

``UsageRecord`` is the contract between the proxy (``access.proxy``) and the usage
writer (``monitoring.usage``): one immutable, named value per request, built on the
request path and written off it. Besides the usage event itself (who, which release
and stage, the verdict and its reason, tokens, latency) it carries what replaying the
decision against another plan needs: the plan version the decision read, the
``max_tokens`` and stream asked for, the tier the organization claims and the
verifications it held. It is a ``NamedTuple`` rather than a frozen dataclass because
it is built on every request and a frozen dataclass costs seven times as much to build
(docs/performance.md, "The usage record").

Words that repeat on every row (endpoint, verdict, reason, upstream error, tier) are
stored as small integers (``CodeTable``), and the verifications as a bit set
(``KindTable``); ``CodeField`` and ``KindsField`` let the ORM read and filter them as
words, so ``UsageEvent.objects.filter(decision="allow")`` means what it says. Codes
are stable: a word keeps its code for ever, a new word takes the next free one, and
no code is reused, since rows written years ago are read with today's tables.

The vocabularies are owned elsewhere (``access.decisions.Reason``, the proxy's own
refusal codes, ``access.upstream``'s errors, ``rollout.plan_schema``'s tiers and
verification kinds); ``monitoring`` imports neither, so ``tests/monitoring/
test_records.py`` ties each copy to its owner.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import NamedTuple

from django.db import models

from monitoring.redaction import redact_secrets

log = logging.getLogger(__name__)


class UsageRecord(NamedTuple):
    """One request as the proxy saw it. Strings are the words of the tables below."""

    created_at: float  # POSIX seconds, when the request arrived
    request_id: str
    org: str  # organization public id, "" without a valid key
    key: str  # API key public id, "" without a valid key
    tier: str  # the effective tier the decision served (or refused) under, "" if none
    release: str  # the model name asked for, cleaned (``monitoring.usage.clean_text``)
    stage: str  # the release's stage the decision read, "" if it read none
    endpoint: str  # ENDPOINTS
    decision: str  # allow | deny
    reason: str  # REASONS: the decision's reason code, or the proxy's own refusal
    status: int  # HTTP status the client got
    error: str  # ERRORS: why the upstream failed, "" if it did not
    streamed: bool  # the client asked for a stream ("stream": true)
    client_disconnected: bool
    # Flagged by anything: the upstream's content filter fired, or screening flagged the
    # request (the writer stores it as true whenever ``flags`` is not empty).
    flagged: bool
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float  # total time in the proxy, to the last byte
    upstream_latency_ms: float | None  # None when no upstream was called
    # What replaying the decision needs, besides the fields above:
    plan_version: int | None  # of the release's plan the decision read; None if no release
    max_tokens: int | None  # asked for (max_completion_tokens or max_tokens); None if absent
    claimed_tier: str  # the organization's own tier, "" without one
    # The organization's valid verifications as the decision saw them, (kind, expires_at
    # in POSIX seconds or None); stored as the kinds unexpired at ``created_at``.
    verifications: tuple[tuple[str, float | None], ...]
    # Screening (access.screening): the categories that flagged, blocked or routed the
    # request, sorted and comma-joined ("" when none), and the release a ``route``
    # rule sent it to ("" when not routed; ``release`` stays the model asked for).
    flags: str = ""
    routed_to: str = ""


class FlagSample(NamedTuple):
    """A redacted excerpt of a request (or answer) screening flagged, blocked or routed,
    kept for human review when the stage's plan says ``retain_flagged``; written by the
    usage writer to ``monitoring.models.FlaggedSample``."""

    created_at: float  # POSIX seconds, when the request arrived
    request_id: str
    release: str  # the model name asked for, as on the usage event
    stage: str
    tier: str
    org: str  # organization public id
    key: str  # API key public id
    categories: str  # sorted, comma-joined, as ``UsageRecord.flags``
    source: str  # "prompt" | "response"
    action: str  # "flag" | "block" | "route"
    excerpt: str  # ``excerpt(text)``: redacted, bounded
    retain_days: int  # the sample is deleted this many days after ``created_at``


EXCERPT_LIMIT = 500


def excerpt(text: str, limit: int = EXCERPT_LIMIT) -> str:
    """What a flagged sample keeps of ``text``: every API key's secret redacted
    (``monitoring.redaction``), whitespace controls (newline, tab) read as a space and
    every other control, format or unassigned character (NUL among them) as U+FFFD,
    cut to ``limit`` characters. Redacted before it is cut, so a key across the cut
    leaves no part of its secret; only a key's length past the limit is read."""
    head = text[: limit + 80]  # a whole key (under 80 characters) across the cut
    head = redact_secrets(head)[:limit]
    if not head.isprintable():
        head = "".join(
            ch if ch.isprintable() else " " if ch in "\t\n\r\x0b\x0c" else "\ufffd" for ch in head
        )
    return head


class CodeTable:
    """The words of one vocabulary and the small integer stored for each.

    ``fallback``, for a vocabulary other modules may grow (reasons, errors): the code a
    word this table does not know yet is written as, so the event is still counted;
    without one, such a word is an error (the writer sets that event aside)."""

    __slots__ = ("codes", "fallback", "name", "unknown", "words")

    def __init__(self, name: str, words: dict[int, str], *, fallback: int | None = None) -> None:
        self.name = name
        self.words = dict(words)
        self.codes = {word: code for code, word in words.items()}
        if len(self.codes) != len(self.words):
            raise ValueError(f"{name}: a word has two codes")
        self.fallback = fallback
        self.unknown: set[str] = set()  # words written as the fallback, each logged once

    def encode(self, word: str) -> int:
        """The code of ``word``; ValueError for a word the table does not have."""
        try:
            return self.codes[word]
        except KeyError:
            raise ValueError(f"no {self.name} code for {word!r}") from None

    def write(self, word: str) -> int:
        """The code to store for ``word``: its own, or the fallback (logged once per
        word) for a word the table does not know; ValueError without a fallback."""
        code = self.codes.get(word)
        if code is not None:
            return code
        if self.fallback is None:
            raise ValueError(f"no {self.name} code for {word!r}")
        if word not in self.unknown and len(self.unknown) < 100:
            self.unknown.add(word)
            log.warning(
                "no %s code for %r yet: stored as %r", self.name, word, self.words[self.fallback]
            )
        return self.fallback

    def decode(self, code: int) -> str:
        """The word of ``code`` (a code unknown to this build reads ``name:code``)."""
        word = self.words.get(code)
        return f"{self.name}:{code}" if word is None else word

    def words_of(self, column: str) -> Words:
        """SQL that turns the codes in ``column`` back into words, as ``decode`` does."""
        return Words(column, self)


class Words(models.Func):
    """``CASE column WHEN code THEN word ... ELSE 'name:' || column END``: a code
    table's words in SQL. One expression, rather than a ``Case`` of one ``When`` a
    code, which the ORM would resolve anew for every query of the periodic rollup."""

    output_field = models.CharField()

    def __init__(self, column: str, table: CodeTable) -> None:
        super().__init__(models.F(column))
        self.table = table

    def as_sql(self, compiler, connection, **extra_context):
        column, params = compiler.compile(self.source_expressions[0])
        whens = " ".join(["WHEN %s THEN %s"] * len(self.table.words))
        values = [value for pair in self.table.words.items() for value in pair]
        sql = f"CASE {column} {whens} ELSE %s || CAST({column} AS varchar(6)) END"
        return sql, (*params, *values, f"{self.table.name}:", *params)


class KindTable:
    """A set of words stored as a bit set: each word has one bit, for ever."""

    __slots__ = ("bits", "name")

    def __init__(self, name: str, bits: dict[str, int]) -> None:
        self.name = name
        self.bits = dict(bits)

    def encode(self, words: Iterable[str]) -> int:
        mask = 0
        for word in words:
            try:
                mask |= self.bits[word]
            except KeyError:
                raise ValueError(f"no {self.name} bit for {word!r}") from None
        return mask

    def decode(self, mask: int) -> frozenset[str]:
        return frozenset(word for word, bit in self.bits.items() if mask & bit)


ENDPOINTS = CodeTable(
    "endpoint",
    {
        1: "chat.completions",
        2: "completions",
        3: "embeddings",
        4: "models",
        5: "access",
        6: "authz",
    },
)
VERDICTS = CodeTable("decision", {1: "allow", 2: "deny"})
REASONS = CodeTable(
    "reason",
    {
        0: "other",  # a code this table does not know yet (logged when written)
        # access.decisions.Reason
        1: "ok",
        2: "invalid_key",
        3: "key_revoked",
        4: "key_expired",
        5: "unknown_model",
        6: "model_not_available",
        7: "verification_required",
        8: "release_paused",
        9: "rate_limited",
        10: "quota_exceeded",
        11: "capability_not_allowed",
        12: "request_too_large",
        # the proxy's refusals before a decision
        13: "invalid_json",
        14: "invalid_request",
        15: "client_disconnected",
        16: "method_not_allowed",
        17: "policy_store_unavailable",
        18: "limits_unavailable",
        19: "request_timeout",
        # screening (access.screening, the proxy's screening refusals)
        20: "content_blocked",
        21: "screening_unavailable",
        22: "screening_requires_proxy",  # /authz for a stage that screens
        23: "model_held",  # a tuned model awaiting its assessment or its reviewers
    },
    fallback=0,
)
ERRORS = CodeTable(
    "error",
    {
        0: "",
        1: "upstream_error",
        2: "upstream_timeout",
        3: "upstream_unreachable",
        4: "upstream_incomplete",
        5: "internal_error",
        6: "other",  # an error this table does not know yet (logged when written)
    },
    fallback=6,
)
TIERS = CodeTable(
    "tier",
    {
        0: "",
        1: "research_partner",
        2: "verified_commercial",
        3: "credentialed_academic",
        4: "public",
    },
)
VERIFICATION_KINDS = KindTable(
    "verification",
    {"business_kyc": 1, "academic_credential": 2, "monitoring_agreement": 4},
)
CODE_TABLES = {table.name: table for table in (ENDPOINTS, VERDICTS, REASONS, ERRORS, TIERS)}


def valid_kinds(verifications: tuple[tuple[str, float | None], ...], at: float) -> int:
    """The bit set of the kinds in ``verifications`` not expired at ``at``, as
    ``access.decisions.OrgEntry.valid_kinds`` counts them."""
    bits = VERIFICATION_KINDS.bits
    mask = 0
    for kind, expires_at in verifications:
        if expires_at is None or at < expires_at:
            try:
                mask |= bits[kind]
            except KeyError:
                raise ValueError(f"no verification bit for {kind!r}") from None
    return mask


class CodeField(models.SmallIntegerField):
    """A word of a ``CodeTable`` stored as its code: reads and filters as the word."""

    def __init__(self, *args, table: str, **kwargs) -> None:
        self.table_name = table
        self.table = CODE_TABLES[table]
        super().__init__(*args, **kwargs)

    def deconstruct(self):
        name, path, args, kwargs = super().deconstruct()
        kwargs["table"] = self.table_name
        return name, path, args, kwargs

    def from_db_value(self, value, expression, connection):
        return None if value is None else self.table.decode(value)

    def to_python(self, value):
        if value is None or isinstance(value, str):
            return value
        return self.table.decode(int(value))

    def get_prep_value(self, value):
        if value is None:
            return None
        if isinstance(value, str):
            return self.table.encode(value)
        return super().get_prep_value(value)


class KindsField(models.SmallIntegerField):
    """A set of ``VERIFICATION_KINDS`` stored as a bit set: reads as a frozenset."""

    def from_db_value(self, value, expression, connection):
        return None if value is None else VERIFICATION_KINDS.decode(value)

    def to_python(self, value):
        if value is None or isinstance(value, frozenset):
            return value
        return VERIFICATION_KINDS.decode(int(value))

    def get_prep_value(self, value):
        if value is None or isinstance(value, int):
            return value
        return VERIFICATION_KINDS.encode(value)
