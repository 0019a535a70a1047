"""Fine-tuning datasets: OpenAI's chat JSONL read, or refused with line-numbered errors.

Pure Python (no Django). ``parse_dataset`` reads an uploaded file (bytes) and returns a
``Dataset`` of ``Row``s, or raises ``DatasetInvalid`` with every problem it found (up to
``max_errors``, the rest counted), each naming its line (1-based; 0 for the file as a
whole) and a stable ``code``:

    invalid_utf8        the line holds bytes that are not UTF-8 (the column of the first)
    empty_file          nothing but whitespace
    blank_line          an empty line before the last row (trailing newlines are fine)
    line_too_long       a line over MAX_LINE_BYTES
    too_deep            JSON nested deeper than MAX_DEPTH
    invalid_json        not JSON (orjson's reason and column)
    not_an_object       a line that is JSON but not an object
    missing_messages    no ``messages``, not a list, or an empty one
    message_not_an_object
    invalid_role        a role other than system, user, assistant, tool
    invalid_content     content that is neither a string nor a list of text parts (null
                        only on an assistant message with tool_calls or function_call)
    invalid_name        a ``name`` that is not a string
    invalid_weight      ``weight`` other than 0 or 1, or on a message not the assistant's
    no_assistant_message  no assistant message with a weight other than 0: nothing to learn
    nul_character       U+0000 anywhere in the line (PostgreSQL cannot store it)

The row format is OpenAI's chat fine-tuning format: ``{"messages": [{"role", "content",
"weight"?, "name"?, ...}, ...], "tools"?: [...], "functions"?: [...]}``; other keys pass
through untouched (the file is sent on as uploaded: ``Row.raw``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

MAX_LINE_BYTES = 1_000_000
MAX_DEPTH = 64  # OpenAI's rows nest 5 deep; tools' JSON schemas a little more
ROLES = ("system", "user", "assistant", "tool")
PROMPT_ROLES = frozenset({"system", "user", "tool"})
_BLANK = b" \t\r"


@dataclass(frozen=True, slots=True)
class LineError:
    """One problem of a file: its line (1-based; 0 for the file as a whole), a stable
    code (module docstring) and a message for people."""

    line: int
    code: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


class DatasetInvalid(Exception):
    """The file is not a chat fine-tuning dataset: ``errors`` (at most the parser's
    ``max_errors``, in line order) and ``more``, how many further errors it found."""

    def __init__(self, errors: list[LineError], more: int = 0) -> None:
        super().__init__(errors, more)
        self.errors = errors
        self.more = more

    def summary(self) -> str:
        """Every error kept, ``; ``-separated, and how many more there were."""
        text = "; ".join(map(str, self.errors))
        return f"{text}; and {self.more:,} more" if self.more else text

    def __str__(self) -> str:
        return self.summary()


@dataclass(frozen=True, slots=True)
class Row:
    """One training example: its line, the line as uploaded (without its line break), the
    prompt's text (system, user and tool contents, newline-joined), the answer's (every
    assistant content, newline-joined) and ``answers``, the contents of the assistant
    messages the model is trained on (weight not 0), one each."""

    line: int
    raw: bytes
    prompt_text: str
    answer_text: str
    answers: tuple[str, ...]

    @property
    def all_text(self) -> str:
        return f"{self.prompt_text}\n{self.answer_text}"


@dataclass(frozen=True, slots=True)
class Dataset:
    """A parsed file: its rows in file order and its size in bytes."""

    rows: tuple[Row, ...]
    bytes: int

    def __len__(self) -> int:
        return len(self.rows)

    def jsonl(self, lines: Iterable[int] | None = None) -> bytes:
        """The file again, one row a line (``\\n``-terminated), in file order: every row, or
        only those on ``lines``. ``ValueError`` for a line that holds no row."""
        if lines is None:
            return b"".join(row.raw + b"\n" for row in self.rows)
        wanted = set(lines)
        unknown = wanted - {row.line for row in self.rows}
        if unknown:
            raise ValueError(f"no row on line(s) {sorted(unknown)[:5]}")
        return b"".join(row.raw + b"\n" for row in self.rows if row.line in wanted)


class _Errors:
    """The errors found so far: the first ``limit`` kept, the rest counted."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept: list[LineError] = []
        self.more = 0

    def add(self, line: int, code: str, message: str) -> None:
        if len(self.kept) < self.limit:
            self.kept.append(LineError(line, code, message))
        else:
            self.more += 1


def parse_dataset(data: bytes, *, max_errors: int = 20) -> Dataset:
    """``data`` read as chat fine-tuning JSONL (module docstring); ``DatasetInvalid`` with
    every error found, the first ``max_errors`` kept. Never raises anything else on
    bytes. Lines end with ``\\n`` (a ``\\r`` before it is dropped too)."""
    errors = _Errors(max(1, max_errors))
    lines = data.split(b"\n")
    # Trailing blank lines are the end of the file, not blank rows.
    while lines and not lines[-1].strip(_BLANK):
        lines.pop()
    if not lines:
        raise DatasetInvalid([LineError(0, "empty_file", "the file is empty")])
    try:
        data.decode()
        utf8 = True
    except UnicodeDecodeError:
        utf8 = False  # checked line by line, to name the lines
    rows: list[Row] = []
    for number, line in enumerate(lines, start=1):
        line = line.removesuffix(b"\r")
        row = _parse_line(number, line, errors, check_utf8=not utf8)
        if row is not None:
            rows.append(row)
    if errors.kept:
        raise DatasetInvalid(errors.kept, errors.more)
    return Dataset(tuple(rows), len(data))


def _parse_line(number: int, line: bytes, errors: _Errors, *, check_utf8: bool) -> Row | None:
    if not line.strip(_BLANK):
        errors.add(number, "blank_line", "blank line (a row must be on every line)")
        return None
    if len(line) > MAX_LINE_BYTES:
        errors.add(
            number,
            "line_too_long",
            f"the line is {len(line):,} bytes; at most {MAX_LINE_BYTES:,} are allowed",
        )
        return None
    if check_utf8:
        try:
            line.decode()
        except UnicodeDecodeError as exc:
            errors.add(
                number, "invalid_utf8", f"not UTF-8: byte {exc.start + 1} is {line[exc.start]:#04x}"
            )
            return None
    if b"\x00" in line:
        errors.add(number, "nul_character", "the line holds a NUL byte, which cannot be stored")
        return None
    try:
        document = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        if exc.msg == "depth limit exceeded":
            errors.add(number, "too_deep", f"JSON nested deeper than {MAX_DEPTH} levels")
        else:
            errors.add(number, "invalid_json", f"not valid JSON ({exc.msg} at column {exc.colno})")
        return None
    # Brackets counted in bytes first: a row needs walking only if it might be that deep.
    if line.count(b"[") + line.count(b"{") > MAX_DEPTH and _depth(document) > MAX_DEPTH:
        errors.add(number, "too_deep", f"JSON nested deeper than {MAX_DEPTH} levels")
        return None
    if b"\\u0000" in line and _holds_nul(document):
        errors.add(
            number, "nul_character", "the row holds U+0000 (\\u0000), which cannot be stored"
        )
        return None
    if not isinstance(document, dict):
        errors.add(number, "not_an_object", f"a row must be a JSON object, not {_kind(document)}")
        return None
    return _row(number, line, document, errors)


def _row(number: int, line: bytes, document: dict[str, Any], errors: _Errors) -> Row | None:
    messages = document.get("messages")
    if not isinstance(messages, list) or not messages:
        what = "no messages" if messages is None else f"messages is {_kind(messages)}"
        if isinstance(messages, list):
            what = "messages is empty"
        errors.add(number, "missing_messages", f"{what}; a row needs a list of messages")
        return None
    before = len(errors.kept) + errors.more
    prompts: list[str] = []
    answers: list[str] = []
    trained: list[str] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            errors.add(
                number,
                "message_not_an_object",
                f"{where} must be an object, not {_kind(message)}",
            )
            continue
        role = message.get("role")
        if role not in ROLES:
            errors.add(number, "invalid_role", f"{where}.role must be one of {', '.join(ROLES)}")
            continue
        text = _content(number, where, role, message, errors)
        if "name" in message and not isinstance(message["name"], str):
            errors.add(number, "invalid_name", f"{where}.name must be a string")
        weight = message.get("weight", 1)
        if "weight" in message:
            if role != "assistant":
                errors.add(
                    number, "invalid_weight", f"{where}.weight is only for assistant messages"
                )
            elif isinstance(weight, bool) or weight not in (0, 1):
                errors.add(number, "invalid_weight", f"{where}.weight must be 0 or 1")
                continue
        if text is None:
            continue
        if role == "assistant":
            answers.append(text)
            if weight != 0:
                trained.append(text)
        else:
            prompts.append(text)
    if len(errors.kept) + errors.more > before:
        return None
    if not trained:
        errors.add(
            number,
            "no_assistant_message",
            "no assistant message with weight 1: the row teaches nothing",
        )
        return None
    return Row(number, line, "\n".join(prompts), "\n".join(answers), tuple(trained))


def _content(
    number: int, where: str, role: str, message: dict[str, Any], errors: _Errors
) -> str | None:
    """The message's text (text parts newline-joined), or None: an error recorded, or an
    assistant's null content beside its tool calls ("" then, which is no text)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if (
        content is None
        and role == "assistant"
        and (message.get("tool_calls") or message.get("function_call"))
    ):
        return ""
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                break
            texts.append(part["text"])
        else:
            return "\n".join(texts)
    errors.add(
        number,
        "invalid_content",
        f"{where}.content must be a string or a list of text parts"
        + (" (or null beside tool_calls)" if role == "assistant" else ""),
    )
    return None


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _depth(value: Any) -> int:
    """How deep lists and objects nest in ``value`` (a scalar is 0), without recursion."""
    deepest = 0
    todo = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_DEPTH:  # deeper than that is all the caller needs to know
            todo.extend((child, depth + 1) for child in children)
    return deepest


def _holds_nul(value: Any) -> bool:
    """Whether any string (or key) in ``value`` holds U+0000."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return False
