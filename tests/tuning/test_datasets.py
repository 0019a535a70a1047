"""tuning.datasets: chat fine-tuning JSONL, and its errors by line and code."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuning.datasets import (
    MAX_DEPTH,
    MAX_LINE_BYTES,
    ROLES,
    Dataset,
    DatasetInvalid,
    LineError,
    Row,
    parse_dataset,
)


def row(*messages: dict, **extra: object) -> bytes:
    return orjson.dumps({"messages": list(messages), **extra})


def chat(user: str = "Name a river.", answer: str = "The Danube.", **extra: object) -> bytes:
    return row(
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
        **extra,
    )


GOOD = chat()


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def errors_of(data: bytes, **kwargs: int) -> list[tuple[int, str]]:
    with pytest.raises(DatasetInvalid) as raised:
        parse_dataset(data, **kwargs)
    return [(error.line, error.code) for error in raised.value.errors]


def file_with(bad: bytes) -> bytes:
    """``bad`` on line 2 between good rows."""
    return b"\n".join([GOOD, bad, GOOD]) + b"\n"


# --- valid files ------------------------------------------------------------------------------


def test_parse_dataset_reads_rows_and_texts() -> None:
    data = GOOD + b"\n" + chat("Capital of France?", "Paris.") + b"\n\n"
    dataset = parse_dataset(data)
    assert dataset.bytes == len(data)
    assert dataset.rows == (
        Row(1, GOOD, "Be brief.\nName a river.", "The Danube.", ("The Danube.",)),
        Row(
            2,
            chat("Capital of France?", "Paris."),
            "Be brief.\nCapital of France?",
            "Paris.",
            ("Paris.",),
        ),
    )
    assert dataset.rows[0].all_text == "Be brief.\nName a river.\nThe Danube."


def test_parse_dataset_round_trips_the_file() -> None:
    lines = [
        GOOD,
        row(
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
            {"role": "tool", "content": "42", "tool_call_id": "1"},
            {"role": "assistant", "content": "It is 42.", "weight": 1, "name": "bot"},
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        ),
        b'{"messages": [{"role": "user", "content": "caf\xc3\xa9"}, '
        b'{"role": "assistant", "content": "ok", "weight": 0}, '
        b'{"role": "assistant", "content": "fine"}], "extra": {"kept": true}}',
    ]
    data = b"\n".join(lines) + b"\n"
    dataset = parse_dataset(data)
    assert dataset.jsonl() == data
    assert parse_dataset(dataset.jsonl()) == dataset
    assert dataset.rows[1].prompt_text == "a\nb\n42"
    assert dataset.rows[1].answer_text == "\nIt is 42."
    assert dataset.rows[2].answers == ("fine",)  # the weight-0 answer is not trained on
    assert dataset.rows[2].answer_text == "ok\nfine"


def test_jsonl_keeps_only_the_lines_asked_for() -> None:
    data = b"\r\n".join([GOOD, chat("b"), chat("c")])
    dataset = parse_dataset(data)
    assert dataset.jsonl([3, 1]) == GOOD + b"\n" + chat("c") + b"\n"
    assert dataset.jsonl([]) == b""
    with pytest.raises(ValueError, match="no row on line"):
        dataset.jsonl([4])


# --- errors, each with its line and code ------------------------------------------------------


def user(content: object = "x", **fields: object) -> dict:
    return {"role": "user", "content": content, **fields}


def assistant(content: object = "x", **fields: object) -> dict:
    return {"role": "assistant", "content": content, **fields}


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (b"   ", "blank_line"),
        (b'{"messages": [', "invalid_json"),
        (b"[1, 2]", "not_an_object"),
        (b"{}", "missing_messages"),
        (b'{"messages": []}', "missing_messages"),
        (b'{"messages": "hi"}', "missing_messages"),
        (b'{"messages": ["hi"]}', "message_not_an_object"),
        (row({"role": "robot", "content": "x"}), "invalid_role"),
        (row(user(3), assistant()), "invalid_content"),
        (row({"role": "user"}, assistant()), "invalid_content"),
        (row(user(), assistant(None)), "invalid_content"),
        (row(user([{"type": "image_url", "image_url": {}}]), assistant()), "invalid_content"),
        (row(user([]), assistant()), "invalid_content"),
        (row(user(name=1), assistant()), "invalid_name"),
        (row(user(weight=1), assistant()), "invalid_weight"),
        (row(user(), assistant(weight=2)), "invalid_weight"),
        (row(user(), assistant(weight=True)), "invalid_weight"),
        (row(user()), "no_assistant_message"),
        (row(user(), assistant(weight=0)), "no_assistant_message"),
        (row(user("a\u0000b"), assistant()), "nul_character"),
        (chat(tools=[{"name\u0000": "f"}]), "nul_character"),
        (b'{"messages": [{"role": "user", "content": "a\x00b"}]}', "nul_character"),
        (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "invalid_utf8"),
        (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "too_deep"),
        (chat(tools=[nested(MAX_DEPTH)]), "too_deep"),
        (b"[" * 2000 + b"]" * 2000, "too_deep"),
    ],
)
def test_parse_dataset_names_the_line_and_code(bad: bytes, code: str) -> None:
    assert errors_of(file_with(bad)) == [(2, code)]


def test_a_backslash_before_u0000_is_text_not_nul() -> None:
    # The JSON string \\u0000 is a backslash and "u0000": no NUL, a valid row.
    data = row({"role": "user", "content": "x"}, {"role": "assistant", "content": "\\u0000"})
    assert b"\\\\u0000" in data
    assert parse_dataset(data).rows[0].answer_text == "\\u0000"


def test_a_line_too_long_is_refused_unread() -> None:
    long = chat("x" * MAX_LINE_BYTES)
    assert errors_of(file_with(long)) == [(2, "line_too_long")]


def test_invalid_json_gives_orjson_reason_and_column() -> None:
    with pytest.raises(DatasetInvalid) as raised:
        parse_dataset(file_with(b'{"messages": x}'))
    [error] = raised.value.errors
    assert error == LineError(2, "invalid_json", error.message)
    assert error.message.startswith("not valid JSON (")
    assert error.message.endswith("at column 14)")


def test_invalid_utf8_names_the_byte() -> None:
    with pytest.raises(DatasetInvalid) as raised:
        parse_dataset(GOOD + b"\n" + b'{"a": "\xff"}')
    assert raised.value.errors == [LineError(2, "invalid_utf8", "not UTF-8: byte 8 is 0xff")]


@pytest.mark.parametrize("data", [b"", b"\n\n", b" \r\n\t\n"])
def test_an_empty_file_is_refused(data: bytes) -> None:
    assert errors_of(data) == [(0, "empty_file")]


def test_trailing_newlines_are_fine_a_leading_blank_line_is_not() -> None:
    assert len(parse_dataset(GOOD + b"\n\n\r\n \n")) == 1
    assert errors_of(b"\n" + GOOD) == [(1, "blank_line")]


def test_every_error_of_a_row_is_reported() -> None:
    bad = row({"role": "robot", "content": "x"}, {"role": "assistant", "content": 1, "weight": 5})
    assert errors_of(bad) == [(1, "invalid_role"), (1, "invalid_content"), (1, "invalid_weight")]


def test_errors_stop_at_max_errors_and_count_the_rest() -> None:
    data = b"\n".join([b"nope"] * 15 + [GOOD, b"[]"])
    with pytest.raises(DatasetInvalid) as raised:
        parse_dataset(data, max_errors=3)
    assert [(e.line, e.code) for e in raised.value.errors] == [
        (1, "invalid_json"),
        (2, "invalid_json"),
        (3, "invalid_json"),
    ]
    assert raised.value.more == 13
    summary = raised.value.summary()
    assert summary.startswith("line 1: not valid JSON (")
    assert summary.count("; line ") == 2
    assert summary.endswith("; and 13 more")


def test_summary_of_a_file_error_has_no_line() -> None:
    assert DatasetInvalid([LineError(0, "empty_file", "the file is empty")]).summary() == (
        "the file is empty"
    )


def test_summary_example() -> None:
    invalid = DatasetInvalid(
        [
            LineError(3, "invalid_json", "not valid JSON (x at column 1)"),
            LineError(7, "invalid_role", f"messages[1].role must be one of {', '.join(ROLES)}"),
        ],
        1200,
    )
    assert invalid.summary() == (
        "line 3: not valid JSON (x at column 1); line 7: messages[1].role must be one of"
        " system, user, assistant, tool; and 1,200 more"
    )


# --- never anything but DatasetInvalid --------------------------------------------------------

JSON_ISH = st.lists(
    st.sampled_from(
        [GOOD, b"{", b"}", b"[", b"]", b'"', b"\\u0000", b"\\", b"\n", b"\r", b" ", b"\x00",
         b"\xff", b"\xc3", b'"messages":', b'"role":"assistant"', b'"content":', b"null",
         b'"weight":0', b",", b":", b"1", b"\xf0\x9f\x98", b"\\ud800"]
    ),
    max_size=40,
).map(b"".join)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=300), JSON_ISH))
def test_parse_dataset_raises_only_dataset_invalid(data: bytes) -> None:
    try:
        dataset = parse_dataset(data)
    except DatasetInvalid as invalid:
        assert invalid.errors
        assert all(isinstance(error, LineError) for error in invalid.errors)
        assert invalid.summary()
        return
    assert isinstance(dataset, Dataset)
    assert parse_dataset(dataset.jsonl()).rows == tuple(
        Row(index, r.raw, r.prompt_text, r.answer_text, r.answers)
        for index, r in enumerate(dataset.rows, start=1)
    )
