"""The screening engine: what a stage's rules say about a piece of text.

Pure Python (no Django), like ``access.decisions``: the proxy compiles a ``Screen`` once
per stage policy when it loads the plan (``compile_screen``), and every admitted call
asks it about the prompt (``prompt_text``) and, when the stage screens answers, about
the answer (``completion_text``). What the proxy does with the ``Verdict`` (refuse,
flag, route, ask the classifier) is ``access.proxy.screening``'s.

Text is normalized before it is compared (``normalize``): invisible characters go,
NFKC folds compatibility forms, runs of whitespace become one space, and rules that
are not ``case_sensitive`` compare case-folded text. Keywords match whole words;
patterns are RE2 expressions. Every keyword and pattern of a stage sits in one
``re2.Set`` per case mode, so a text is read once (per mode) whatever the number of
rules; a keyword's hit is then checked for word boundaries in Python, which RE2 could
only do with Unicode classes that make a set of a thousand keywords too big to compile.

``check`` never raises on text: if RE2 runs out of memory on a text (its DFA's cache),
the screen falls back to searching entry by entry, slower but with the same answer.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import re2

from rollout.plan_schema import RE2_MAX_MEM, compile_pattern, re2_options

if TYPE_CHECKING:
    from rollout.plan_schema import Classifier, Screening

log = logging.getLogger(__name__)

# --- normalization ------------------------------------------------------------------------

# ASCII text: whitespace controls (tab, line breaks, and the information separators that
# str.split() splits on) become spaces, the other control characters go.
_ASCII_WHITESPACE = b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f"
_ASCII_TABLE = bytes.maketrans(_ASCII_WHITESPACE, b" " * len(_ASCII_WHITESPACE))
_ASCII_DELETE = bytes((*range(0x00, 0x09), *range(0x0E, 0x1C), 0x7F))
# Unicode's Default_Ignorable_Code_Point besides format characters: invisible marks
# and fillers that read as nothing (variation selectors, combining grapheme joiner,
# Hangul fillers, unassigned ignorables) and so can hide inside a word; and lone
# surrogates, which are not text (and which UTF-8, so RE2, cannot carry).
_IGNORABLE_RANGES = (
    (0x034F, 0x034F),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x2060, 0x206F),
    (0x3164, 0x3164),
    (0xD800, 0xDFFF),
    (0xFE00, 0xFE0F),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0xE0000, 0xE0FFF),
)
# Format (Cf) and control (Cc) characters live in planes 0, 1 and 14 only; scanning
# those takes about 20 ms at import, the whole code space five times that.
_PLANES_WITH_FORMAT_CHARACTERS = (range(0x0000, 0x20000), range(0xE0000, 0xF0000))
# The invisible characters ordinary text is full of (joiners in Persian and Indic
# scripts and emoji, the emoji variation selector, soft hyphens, direction marks, a
# byte-order mark): removed with str.replace, which is far cheaper than a regex.
_COMMON_INVISIBLE = "\u00ad\u200b\u200c\u200d\u200e\u200f\u2060\ufe0f\ufeff"
# Letters whose case folding NFKC would compose again (U+01F0 folds to j and a combining
# caron), and those NFKC makes one of them (test_screening recomputes this list).
FOLD_DECOMPOSES = (
    (0x01F0, 0x01F0), (0x0390, 0x0390), (0x03B0, 0x03B0), (0x1E96, 0x1E99),
    (0x1F50, 0x1F50), (0x1F52, 0x1F52), (0x1F54, 0x1F54), (0x1F56, 0x1F56),
    (0x1FB6, 0x1FB7), (0x1FC6, 0x1FC7), (0x1FD2, 0x1FD3), (0x1FD6, 0x1FD7),
    (0x1FE2, 0x1FE4), (0x1FE6, 0x1FE7), (0x1FF6, 0x1FF7),
)  # fmt: skip
# Whitespace NFKC leaves as it is (NFKC makes no-break and other spaces plain spaces);
# tab and line breaks are replaced directly, the rest takes the general path.
_RARE_WHITESPACE = "\x0b\x0c\x1c\x1d\x1e\x1f\x85\u1680\u2028\u2029"


def _invisible_code_points() -> list[int]:
    """Every code point ``normalize`` removes: format characters, control characters
    other than whitespace, and the other default-ignorable code points."""
    found = {
        code
        for plane in _PLANES_WITH_FORMAT_CHARACTERS
        for code in plane
        if unicodedata.category(chr(code)) in ("Cf", "Cc") and not chr(code).isspace()
    }
    for first, last in _IGNORABLE_RANGES:
        found.update(range(first, last + 1))
    return sorted(found)


def _ranges(codes: Iterable[int]) -> list[tuple[int, int]]:
    ranges: list[list[int]] = []
    for code in sorted(codes):
        if ranges and code == ranges[-1][1] + 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])
    return [(first, last) for first, last in ranges]


INVISIBLE = frozenset(_invisible_code_points())
_INVISIBLE = re.compile(
    "["
    + "".join(
        re.escape(chr(first)) + ("" if first == last else "-" + re.escape(chr(last)))
        for first, last in _ranges(INVISIBLE)
    )
    + "]+"
)


def _re2_class(codes: Iterable[int]) -> str:
    return (
        "["
        + "".join(
            f"\\x{{{first:x}}}" + ("" if first == last else f"-\\x{{{last:x}}}")
            for first, last in _ranges(codes)
        )
        + "]"
    )


# One RE2 pass over a non-ASCII text says which path it needs: 0, only common invisible
# characters; 1, anything else invisible or whitespace NFKC keeps; 2, a letter whose
# folding must be composed again.
_SURROGATES = range(0xD800, 0xE000)
_TRIAGE = re2.Set.SearchSet(re2_options())
_TRIAGE.Add(_re2_class(map(ord, _COMMON_INVISIBLE)))
_TRIAGE.Add(
    _re2_class(
        (INVISIBLE - set(map(ord, _COMMON_INVISIBLE)) - set(_SURROGATES))
        | set(map(ord, _RARE_WHITESPACE))
    )
)
_TRIAGE.Add(_re2_class(code for first, last in FOLD_DECOMPOSES for code in range(first, last + 1)))
_TRIAGE.Compile()


def normalize(text: str, *, fold: bool) -> str:
    """``text`` as screening compares it.

    In order: control characters removed (whitespace controls become spaces), format
    characters (zero-width space and joiners, soft hyphen, bidirectional marks...) and
    other default-ignorable characters removed, Unicode NFKC, every run of whitespace
    made one space with none at either end, and ``str.casefold`` when ``fold``.
    Idempotent; never raises on a ``str``.
    """
    if text.isascii():
        # NFKC changes no ASCII text and casefold is lower(): only controls and spaces.
        if not text.isprintable():
            text = text.encode().translate(_ASCII_TABLE, _ASCII_DELETE).decode()
        text = _collapse_spaces(text)
        return text.lower() if fold else text
    try:
        found = _TRIAGE.Match(text.encode()) or ()
    except UnicodeEncodeError:  # a lone surrogate
        found = (1,)
    if 1 in found:
        return _normalize_general(text, fold=fold)
    if 0 in found:
        for char in _COMMON_INVISIBLE:
            text = text.replace(char, "")
    text = unicodedata.normalize("NFKC", text)
    text = _collapse_spaces(text.replace("\n", " ").replace("\t", " ").replace("\r", " "))
    return _fold(text, recompose=2 in found) if fold else text


def _normalize_general(text: str, *, fold: bool) -> str:
    """``normalize`` step by step, for any text (the fast paths must agree with it)."""
    text = unicodedata.normalize("NFKC", _INVISIBLE.sub("", text))
    text = " ".join(text.split())
    return _fold(text) if fold else text


def _collapse_spaces(text: str) -> str:
    while "  " in text:  # str.replace is several times faster than " ".join(text.split())
        text = text.replace("  ", " ")
    return text.strip(" ")


def _fold(text: str, *, recompose: bool = True) -> str:
    """``text`` (NFKC) case-folded; composed and folded once more when ``recompose``
    (it holds a letter of ``FOLD_DECOMPOSES``) and folding undid NFKC. Checking every
    folded text would run NFKC twice over text whose marks may compose (Persian,
    Bengali), which CPython confirms character by character."""
    folded = text.casefold()
    if recompose and folded != text and not unicodedata.is_normalized("NFKC", folded):
        folded = unicodedata.normalize("NFKC", folded).casefold()
    return folded


def _is_word_character(char: str) -> bool:
    """Letters, digits, combining marks and the underscore: what a whole word is made of."""
    if char.isascii():
        return char.isalnum() or char == "_"
    return char.isalnum() or unicodedata.category(char)[0] == "M"


def _whole_word_at(text: str, keyword: str, start: int) -> bool:
    end = start + len(keyword)
    if start > 0 and _is_word_character(keyword[0]) and _is_word_character(text[start - 1]):
        return False
    return not (
        end < len(text) and _is_word_character(keyword[-1]) and _is_word_character(text[end])
    )


def contains_word(text: str, keyword: str) -> bool:
    """True when ``keyword`` occurs in ``text`` as a whole word (both normalized alike):
    where the keyword begins or ends with a word character, the text beside it is not
    one."""
    start = text.find(keyword)
    while start >= 0:
        if _whole_word_at(text, keyword, start):
            return True
        start = text.find(keyword, start + 1)
    return False


# --- what text a request and an answer hold --------------------------------------------------


def _strings(value: Any) -> list[str]:
    """A string, or the strings of a list (token arrays and other items ignored)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []


def _content_text(content: Any) -> list[str]:
    """A chat message's content: a string, or the ``text`` of its text parts."""
    if isinstance(content, str):
        return [content]
    texts: list[str] = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, str):
                texts.append(part)
    return texts


def prompt_text(endpoint: str, document: Any) -> str:
    """The text of a request body, newline-joined: every chat message's content (a string
    or the ``text`` of its parts) for ``chat.completions``, ``prompt`` (a string or a list
    of strings) for ``completions``, ``input`` for ``embeddings`` (token arrays are not
    text). Never raises: whatever it cannot read adds nothing."""
    if not isinstance(document, Mapping):
        return ""
    texts: list[str] = []
    if endpoint == "chat.completions":
        messages = document.get("messages")
        if isinstance(messages, list):
            for message in messages:
                if isinstance(message, Mapping):
                    texts += _content_text(message.get("content"))
    elif endpoint == "completions":
        texts = _strings(document.get("prompt"))
    elif endpoint == "embeddings":
        texts = _strings(document.get("input"))
    return "\n".join(texts)


def completion_text(document: Any) -> str:
    """The text of a whole (non-stream) answer, newline-joined: each choice's
    ``message.content`` (chat) or ``text`` (completions). Never raises."""
    choices = document.get("choices") if isinstance(document, Mapping) else None
    if not isinstance(choices, list):
        return ""
    texts: list[str] = []
    for choice in choices:
        if not isinstance(choice, Mapping):
            continue
        message = choice.get("message")
        if isinstance(message, Mapping):
            texts += _content_text(message.get("content"))
        if isinstance(choice.get("text"), str):
            texts.append(choice["text"])
    return "\n".join(texts)


# --- verdicts ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """What screening found: the action, every category that matched (sorted, unique),
    the deciding category of a block or route (the first such rule in plan order) and
    where a route sends the request."""

    action: str  # "allow" | "flag" | "block" | "route"
    categories: tuple[str, ...]
    category: str | None
    route_to: str | None


ALLOW = Verdict("allow", (), None, None)


@dataclass(frozen=True, slots=True)
class _Rule:
    category: str
    action: str
    route_to: str | None


@dataclass(frozen=True, slots=True)
class _Entry:
    """One keyword or pattern in a set, and the rule it belongs to."""

    rule: int
    keyword: str | None  # normalized; None for a pattern
    pattern: str | None  # as compiled (wrapped in (?i:...) when folded)


class _Matcher:
    """Every entry of one case mode in one ``re2.Set``: one pass over the text gives the
    entries found, which map back to their rules."""

    def __init__(self, entries: list[_Entry], *, fold: bool, max_mem: int) -> None:
        self.fold = fold
        self.entries = entries
        self._compiled: list[Any] | None = None  # entry by entry, only after a failure
        self._warned = False
        self._set: Any = re2.Set.SearchSet(re2_options(max_mem=max_mem))
        # Index 0 matches every text, so a result without it is RE2 failing (its DFA out
        # of memory), never a text that matched nothing.
        self._set.Add(r"\A")
        for entry in entries:
            self._set.Add(re2.escape(entry.keyword) if entry.keyword is not None else entry.pattern)
        try:
            self._set.Compile()
        except re2.error:
            log.warning(
                "screening: %d keywords and patterns do not fit one RE2 set; matching them"
                " one by one",
                len(entries),
            )
            self._set = None

    def rules_in(self, text: str) -> set[int]:
        """The indices of the rules with an entry in ``text`` (already normalized)."""
        found = self._set.Match(text) if self._set is not None else None
        if not found or 0 not in found:
            if self._set is not None and not self._warned:
                self._warned = True
                log.warning("screening: RE2 ran out of memory on a text; matching one by one")
            return self._rules_one_by_one(text)
        rules: set[int] = set()
        for index in found:
            if index == 0:
                continue
            entry = self.entries[index - 1]
            if entry.rule not in rules and (
                entry.keyword is None or contains_word(text, entry.keyword)
            ):
                rules.add(entry.rule)
        return rules

    def _rules_one_by_one(self, text: str) -> set[int]:
        if self._compiled is None:
            self._compiled = [
                None if entry.pattern is None else compile_pattern(entry.pattern)
                for entry in self.entries
            ]
        rules: set[int] = set()
        for entry, compiled in zip(self.entries, self._compiled, strict=True):
            if entry.rule in rules:
                continue
            if compiled is not None:
                if compiled.search(text) is not None:
                    rules.add(entry.rule)
            elif contains_word(text, entry.keyword or ""):
                rules.add(entry.rule)
        return rules


class Screen:
    """A stage's screening compiled: ``check`` judges text by the rules; the classifier,
    response mode and retention are carried for the proxy. ``max_mem`` is RE2's budget
    for each set; a set over it is matched entry by entry instead (same verdicts)."""

    __slots__ = ("_matchers", "_rules", "classifier", "responses", "retain_days")

    def __init__(self, screening: Screening, *, max_mem: int = RE2_MAX_MEM) -> None:
        self.responses: str = screening.responses
        self.classifier: Classifier | None = screening.classifier
        self.retain_days: int | None = (
            screening.retain_flagged.days if screening.retain_flagged is not None else None
        )
        self._rules = tuple(
            _Rule(rule.category, rule.action, rule.route_to) for rule in screening.rules
        )
        by_mode: dict[bool, list[_Entry]] = {True: [], False: []}
        for index, rule in enumerate(screening.rules):
            fold = not rule.case_sensitive
            entries = by_mode[fold]
            for keyword in rule.keywords:
                normalized = normalize(keyword, fold=fold)
                if normalized:  # one of nothing but ignorable characters matches nothing
                    entries.append(_Entry(index, normalized, None))
            for pattern in rule.patterns:
                entries.append(_Entry(index, None, f"(?i:{pattern})" if fold else pattern))
        self._matchers = tuple(
            _Matcher(entries, fold=fold, max_mem=max_mem)
            for fold, entries in by_mode.items()
            if entries
        )

    def check(self, text: str) -> Verdict:
        """The rules' verdict on ``text``: block over route over flag, every category
        that matched. One pass over the text per case mode."""
        if not self._matchers or not text:
            return ALLOW
        matched: set[int] = set()
        for matcher in self._matchers:
            matched |= matcher.rules_in(normalize(text, fold=matcher.fold))
        if not matched:
            return ALLOW
        order = sorted(matched)
        categories = tuple(sorted({self._rules[index].category for index in order}))
        for action in ("block", "route"):
            for index in order:
                rule = self._rules[index]
                if rule.action == action:
                    return Verdict(action, categories, rule.category, rule.route_to)
        return Verdict("flag", categories, None, None)

    def combine(self, verdict: Verdict, flagged: Iterable[str], blocked: Iterable[str]) -> Verdict:
        """``verdict`` with a classifier's categories merged in: ``blocked`` ones block
        (the first names the block, unless the rules already blocked), ``flagged`` ones
        flag an allowed request; a route stays a route unless something blocks."""
        flagged, blocked = tuple(flagged), tuple(blocked)
        if not flagged and not blocked:
            return verdict
        categories = tuple(sorted({*verdict.categories, *flagged, *blocked}))
        if verdict.action == "block":
            return Verdict("block", categories, verdict.category, None)
        if blocked:
            return Verdict("block", categories, blocked[0], None)
        if verdict.action == "route":
            return Verdict("route", categories, verdict.category, verdict.route_to)
        return Verdict("flag", categories, None, None)

    @property
    def rule_count(self) -> int:
        return len(self._rules)


def compile_screen(screening: Screening | None) -> Screen | None:
    """The ``Screen`` of a stage's ``screening``; None when the stage screens nothing (no
    screening, or neither rules nor a classifier)."""
    if screening is None or (not screening.rules and screening.classifier is None):
        return None
    return Screen(screening)
