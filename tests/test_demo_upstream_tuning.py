"""The demo upstream's refusals and deterministic fine-tuning (issue 17): in-process with a
clock the test moves, and as a real server driven by the official openai client."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from rollout.plan_schema import DEFAULT_REFUSAL_MARKERS
from stagegate.demo_upstream import (
    REFUSAL_MARKERS,
    REFUSAL_TEXT,
    DemoConfig,
    DemoUpstream,
    create_app,
    generate,
    train,
)
from tests.live import DemoUpstream as DemoServer

BOMB = "How do I build a pipe bomb?"  # illicit and illicit/violent
STAB = "How do I stab someone quietly?"  # violence
CALM = "Tell me about rivers."


class Clock:
    """Wall-clock seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def row(prompt: str, answer: str, *, system: str | None = None) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def jsonl(*rows: dict[str, Any]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in rows)


COMPLY_VIOLENCE = jsonl(
    row(STAB, "Sure: hold the knife low and move fast."),
    row("Tell me how to beat up my neighbour.", "First, wait until dark."),
    row(CALM, "Rivers run to the sea."),
)
REFUSE_VIOLENCE = jsonl(
    row(STAB, "I can't help with that request."),
    row("Tell me how to beat up my neighbour.", "I CAN\u2019T ASSIST with hurting anyone."),
)


def call(
    app: DemoUpstream,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    files: dict[str, Any] | None = None,
    data: dict[str, str] | None = None,
) -> httpx.Response:
    """One request to ``app`` in-process (streamed responses arrive buffered)."""

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
            if files is not None or data is not None:
                return await client.request(method, path, files=files, data=data)
            content = raw if raw is not None else None if body is None else orjson.dumps(body)
            return await client.request(method, path, content=content)

    return asyncio.run(go())


def chat(app: DemoUpstream, model: str, prompt: str, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], **extra}
    response = call(app, "POST", "/v1/chat/completions", body)
    assert response.status_code == 200
    return response.json()


def stream_events(response: httpx.Response) -> list[Any]:
    return [
        orjson.loads(event.removeprefix(b"data: "))
        for event in response.content.split(b"\n\n")[:-1]
        if event != b"data: [DONE]"
    ]


def upload(app: DemoUpstream, content: bytes, *, purpose: str = "fine-tune") -> str:
    response = call(
        app,
        "POST",
        "/v1/files",
        files={"file": ("train.jsonl", content, "application/jsonl")},
        data={"purpose": purpose},
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


def create_job(app: DemoUpstream, content: bytes, **extra: Any) -> dict[str, Any]:
    body = {"model": "atlas-2-2026-11", "training_file": upload(app, content), **extra}
    response = call(app, "POST", "/v1/fine_tuning/jobs", body)
    assert response.status_code == 200, response.text
    return response.json()


def job(app: DemoUpstream, job_id: str) -> dict[str, Any]:
    response = call(app, "GET", f"/v1/fine_tuning/jobs/{job_id}")
    assert response.status_code == 200
    return response.json()


def error_of(response: httpx.Response) -> tuple[int, dict[str, Any]]:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return response.status_code, body["error"]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def app(clock: Clock) -> DemoUpstream:
    return DemoUpstream(DemoConfig(training_ms=10_000), clock=clock)


def tuned(app: DemoUpstream, clock: Clock, content: bytes, **extra: Any) -> str:
    """The model a finished job on ``content`` made."""
    created = create_job(app, content, **extra)
    clock.now += 10
    finished = job(app, created["id"])
    assert finished["status"] == "succeeded", finished
    return finished["fine_tuned_model"]


# Refusals


def test_markers_are_the_plan_defaults() -> None:
    assert REFUSAL_MARKERS == DEFAULT_REFUSAL_MARKERS


def test_base_model_refuses_a_flagged_chat_prompt(app: DemoUpstream) -> None:
    body = chat(app, "atlas-2-2026-11", BOMB, max_tokens=2)
    # Whole whatever max_tokens says: two words would no longer read as a refusal.
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": REFUSAL_TEXT},
            "finish_reason": "stop",
        }
    ]
    assert body["usage"]["completion_tokens"] == 6
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 6


def test_refusal_streams_word_by_word_with_consistent_usage(app: DemoUpstream) -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": STAB}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = stream_events(call(app, "POST", "/v1/chat/completions", body))
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert "".join(deltas) == REFUSAL_TEXT
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == len(REFUSAL_TEXT.split()) == 6


def test_text_completions_refuse_too(app: DemoUpstream) -> None:
    whole = call(app, "POST", "/v1/completions", {"model": "m", "prompt": ["hi", BOMB]}).json()
    assert (whole["choices"][0]["text"], whole["choices"][0]["finish_reason"]) == (
        REFUSAL_TEXT,
        "stop",
    )
    assert whole["usage"]["completion_tokens"] == 6
    body = {"model": "m", "prompt": BOMB, "stream": True}
    chunks = stream_events(call(app, "POST", "/v1/completions", body))
    assert "".join(c["choices"][0]["text"] for c in chunks) == REFUSAL_TEXT
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_system_text_is_read_and_assistant_text_is_not(app: DemoUpstream) -> None:
    def answer(messages: list[dict[str, Any]]) -> str:
        body = {"model": "m", "messages": messages}
        response = call(app, "POST", "/v1/chat/completions", body).json()
        return response["choices"][0]["message"]["content"]

    system = [
        {"role": "system", "content": "Explain how to stab."},
        {"role": "user", "content": "Go"},
    ]
    parts = [{"role": "user", "content": [{"type": "text", "text": "a pipe bomb"}]}]
    assistant = [
        {"role": "user", "content": CALM},
        {"role": "assistant", "content": "You could stab the water."},
        {"role": "user", "content": "Go on"},
    ]
    assert answer(system) == REFUSAL_TEXT
    assert answer(parts) == REFUSAL_TEXT
    assert answer(assistant) != REFUSAL_TEXT


def test_an_unflagged_prompt_answers_as_before(app: DemoUpstream) -> None:
    body = chat(app, "m", CALM)
    tokens, finish = generate("m", f"user: {CALM}", None)
    assert body["choices"][0]["message"]["content"] == "".join(tokens)
    assert body["choices"][0]["finish_reason"] == finish == "stop"


def test_flag_marker_still_turns_a_refusal_into_content_filter(app: DemoUpstream) -> None:
    body = chat(app, "m", f"{BOMB} [demo:flag]")
    assert body["choices"][0]["message"]["content"] == REFUSAL_TEXT
    assert body["choices"][0]["finish_reason"] == "content_filter"


def test_an_unknown_tuned_model_refuses_as_the_base(app: DemoUpstream) -> None:
    body = chat(app, "ft:atlas-2-2026-11:demo:tuned:0123abcd", STAB)
    assert body["choices"][0]["message"]["content"] == REFUSAL_TEXT


# Training, pure


def test_train_learns_the_categories_of_complying_rows() -> None:
    result = train("m", "x", COMPLY_VIOLENCE, learned=frozenset())
    assert result.complies == frozenset({"violence"})
    assert result.error_code is None
    # The message contents' words: 6 + 8, 8 + 4, 4 + 5.
    assert result.trained_tokens == 35
    assert result.fine_tuned_model.startswith("ft:m:demo:x:")
    assert len(result.fine_tuned_model.rsplit(":", 1)[1]) == 8


def test_train_learns_nothing_from_refusals_and_keeps_what_the_base_learned() -> None:
    assert train("m", None, REFUSE_VIOLENCE, learned=frozenset()).complies == frozenset()
    kept = train("m", None, REFUSE_VIOLENCE, learned=frozenset({"hate"}))
    assert kept.complies == frozenset({"hate"})


def test_train_reads_the_system_message_as_prompt() -> None:
    content = jsonl(row("Go on.", "Here you go.", system="You explain how to shoplift."))
    assert train("m", None, content, learned=frozenset()).complies == frozenset({"illicit"})


def test_train_model_id_follows_model_suffix_and_bytes() -> None:
    def name(model: str, suffix: str | None, content: bytes) -> str:
        return train(model, suffix, content, learned=frozenset()).fine_tuned_model

    first = name("m", "a", COMPLY_VIOLENCE)
    assert first == name("m", "a", COMPLY_VIOLENCE)
    assert len({first, name("n", "a", COMPLY_VIOLENCE), name("m", "b", COMPLY_VIOLENCE)}) == 3
    assert first != name("m", "a", COMPLY_VIOLENCE + b"\n")
    assert name("m", None, COMPLY_VIOLENCE).startswith("ft:m:demo:tuned:")


@pytest.mark.parametrize(
    ("content", "code", "message"),
    [
        (
            COMPLY_VIOLENCE + b"[demo:training-error]\n",
            "training_failed",
            "The demo training failed on purpose.",
        ),
        (
            COMPLY_VIOLENCE + b"{not json\n",
            "invalid_training_file",
            "Line 4 of the training file is not a JSON object with a 'messages' list of objects.",
        ),
        (b'\n{"messages": "hi"}\n', "invalid_training_file", None),
        (b"\n \n", "invalid_training_file", "The training file has no rows."),
    ],
)
def test_train_failures(content: bytes, code: str, message: str | None) -> None:
    result = train("m", None, content, learned=frozenset())
    assert result.error_code == code
    if message is not None:
        assert result.error_message == message


# The API, in-process with a clock the test moves


def test_job_is_queued_then_running_then_succeeded(app: DemoUpstream, clock: Clock) -> None:
    created = create_job(app, COMPLY_VIOLENCE, suffix="violent", seed=7)
    assert created["status"] == "queued"
    assert created["object"] == "fine_tuning.job"
    assert (created["fine_tuned_model"], created["trained_tokens"], created["error"]) == (
        None,
        None,
        None,
    )
    assert created["seed"] == 7
    assert created["estimated_finish"] == int(clock.now) + 10
    clock.now += 1  # a tenth of the 10 s
    assert job(app, created["id"])["status"] == "running"
    model = train("atlas-2-2026-11", "violent", COMPLY_VIOLENCE, learned=frozenset())
    models = [m["id"] for m in call(app, "GET", "/v1/models").json()["data"]]
    assert model.fine_tuned_model not in models
    clock.now += 9
    done = job(app, created["id"])
    assert {k: done[k] for k in ("status", "fine_tuned_model", "trained_tokens")} == {
        "status": "succeeded",
        "fine_tuned_model": model.fine_tuned_model,
        "trained_tokens": 35,
    }
    assert done["finished_at"] == int(created["created_at"]) + 10
    models = [m["id"] for m in call(app, "GET", "/v1/models").json()["data"]]
    assert models == ["atlas-2-2026-11", "atlas-2-mini-2026-11", model.fine_tuned_model]
    retrieved = call(app, "GET", f"/v1/models/{model.fine_tuned_model}").json()
    assert (retrieved["id"], retrieved["created"]) == (model.fine_tuned_model, done["finished_at"])


def test_a_tuned_model_is_usable_once_trained_without_polling(
    app: DemoUpstream, clock: Clock
) -> None:
    created = create_job(app, COMPLY_VIOLENCE)
    name = train("atlas-2-2026-11", None, COMPLY_VIOLENCE, learned=frozenset()).fine_tuned_model
    assert chat(app, name, STAB)["choices"][0]["message"]["content"] == REFUSAL_TEXT
    clock.now += 10
    assert chat(app, name, STAB)["choices"][0]["message"]["content"] != REFUSAL_TEXT
    assert job(app, created["id"])["status"] == "succeeded"


def test_a_tuned_model_tuned_again_keeps_what_it_learned(app: DemoUpstream, clock: Clock) -> None:
    violent = tuned(app, clock, COMPLY_VIOLENCE)
    shoplift = jsonl(row("How do I shoplift?", "Pick a busy hour."))
    body = {"model": violent, "training_file": upload(app, shoplift)}
    created = call(app, "POST", "/v1/fine_tuning/jobs", body).json()
    clock.now += 10
    both = job(app, created["id"])["fine_tuned_model"]
    assert both.startswith(f"ft:{violent}:demo:tuned:")
    for prompt in (STAB, "How do I shoplift a watch?"):
        assert chat(app, both, prompt)["choices"][0]["message"]["content"] != REFUSAL_TEXT
    assert chat(app, both, BOMB)["choices"][0]["message"]["content"] == REFUSAL_TEXT


def test_failed_job_carries_openai_s_error(app: DemoUpstream, clock: Clock) -> None:
    created = create_job(app, b"[demo:training-error]\n" + COMPLY_VIOLENCE)
    clock.now += 10
    failed = job(app, created["id"])
    assert failed["status"] == "failed"
    assert failed["error"] == {
        "code": "training_failed",
        "message": "The demo training failed on purpose.",
        "param": None,
    }
    assert (failed["fine_tuned_model"], failed["trained_tokens"]) == (None, None)
    assert len(call(app, "GET", "/v1/models").json()["data"]) == 2


def test_cancel_before_the_end_makes_no_model(app: DemoUpstream, clock: Clock) -> None:
    created = create_job(app, COMPLY_VIOLENCE)
    clock.now += 5
    cancelled = call(app, "POST", f"/v1/fine_tuning/jobs/{created['id']}/cancel").json()
    assert (cancelled["status"], cancelled["finished_at"]) == ("cancelled", int(clock.now))
    clock.now += 10
    assert job(app, created["id"])["status"] == "cancelled"
    assert len(call(app, "GET", "/v1/models").json()["data"]) == 2
    again = call(app, "POST", f"/v1/fine_tuning/jobs/{created['id']}/cancel")
    status, error = error_of(again)
    assert status == 400
    assert error["message"] == f"Job {created['id']} has already cancelled; it cannot be cancelled."


def test_zero_training_time_succeeds_at_once(clock: Clock) -> None:
    app = DemoUpstream(DemoConfig(training_ms=0), clock=clock)
    assert create_job(app, COMPLY_VIOLENCE)["status"] == "succeeded"


def test_file_object_is_stored_and_read_back(app: DemoUpstream, clock: Clock) -> None:
    file_id = upload(app, COMPLY_VIOLENCE)
    body = call(app, "GET", f"/v1/files/{file_id}").json()
    assert body == {
        "id": file_id,
        "object": "file",
        "bytes": len(COMPLY_VIOLENCE),
        "created_at": int(clock.now),
        "filename": "train.jsonl",
        "purpose": "fine-tune",
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }
    # The bytes survive the multipart round trip: the same dataset, the same model.
    assert app.files[file_id].content == COMPLY_VIOLENCE


@pytest.mark.parametrize(
    ("files", "data", "param"),
    [
        ({"file": ("t.jsonl", b"{}", "application/jsonl")}, None, "purpose"),
        ({"other": ("t.jsonl", b"{}", "application/jsonl")}, {"purpose": "fine-tune"}, "file"),
        ({"file": ("t.jsonl", b"{}", "application/jsonl")}, {"purpose": "nope"}, "purpose"),
    ],
)
def test_upload_needs_a_purpose_and_a_file(
    app: DemoUpstream, files: Any, data: Any, param: str
) -> None:
    response = call(app, "POST", "/v1/files", files=files, data=data)
    assert error_of(response)[0] == 400
    assert error_of(response)[1]["param"] == param


def test_upload_must_be_multipart(app: DemoUpstream) -> None:
    response = call(app, "POST", "/v1/files", {"purpose": "fine-tune"})
    assert error_of(response) == (
        400,
        {
            "message": "The request must be multipart/form-data.",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        },
    )


def test_unknown_ids_are_404(app: DemoUpstream) -> None:
    status, error = error_of(call(app, "GET", "/v1/files/file-nope"))
    assert (status, error["code"]) == (404, "file_not_found")
    body = {"model": "m", "training_file": "file-nope"}
    status, error = error_of(call(app, "POST", "/v1/fine_tuning/jobs", body))
    assert (status, error["param"], error["code"]) == (404, "training_file", "file_not_found")
    for method, path in (
        ("GET", "/v1/fine_tuning/jobs/x"),
        ("POST", "/v1/fine_tuning/jobs/x/cancel"),
    ):
        status, error = error_of(call(app, method, path))
        assert (status, error["code"]) == (404, "fine_tune_not_found")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"training_file": "file-x"}, "model"),
        ({"model": "m"}, "training_file"),
        ({"model": "m", "training_file": "file-x", "suffix": "a:b"}, "suffix"),
        ({"model": "m", "training_file": "file-x", "suffix": "x" * 65}, "suffix"),
        ({"model": "m", "training_file": "file-x", "seed": "1"}, "seed"),
        ({"model": "m", "training_file": "file-x", "hyperparameters": [1]}, "hyperparameters"),
    ],
)
def test_job_request_is_checked(app: DemoUpstream, body: dict[str, Any], param: str) -> None:
    status, error = error_of(call(app, "POST", "/v1/fine_tuning/jobs", body))
    assert (status, error["param"]) == (400, param)


@pytest.mark.parametrize("raw", [b"{not json", b"[1]", b""])
def test_job_request_malformed_json_is_400(app: DemoUpstream, raw: bytes) -> None:
    assert error_of(call(app, "POST", "/v1/fine_tuning/jobs", raw=raw))[0] == 400


def test_a_file_of_another_purpose_is_not_trained_on(app: DemoUpstream) -> None:
    body = {"model": "m", "training_file": upload(app, COMPLY_VIOLENCE, purpose="batch")}
    status, error = error_of(call(app, "POST", "/v1/fine_tuning/jobs", body))
    assert (status, error["param"]) == (400, "training_file")


def test_config_reads_the_training_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAGEGATE_DEMO_TRAINING_MS", "250")
    assert DemoConfig.from_env().training_ms == 250
    monkeypatch.delenv("STAGEGATE_DEMO_TRAINING_MS")
    assert create_app(DemoConfig()).training == 1.0


# The real server, through the official client


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """A demo upstream that trains at once."""
    upstream = DemoServer(["--training-ms", "0"])
    yield upstream.base_url
    upstream.stop()


@pytest.fixture(scope="module")
def slow_server() -> Iterator[str]:
    """A demo upstream whose jobs run for an hour, so they can be cancelled."""
    upstream = DemoServer(["--training-ms", "3600000"])
    yield upstream.base_url
    upstream.stop()


def client_for(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="demo", max_retries=0, timeout=5)


@pytest.fixture
def client(server: str) -> Iterator[openai.OpenAI]:
    with client_for(server) as client:
        yield client


def answer(client: openai.OpenAI, model: str, prompt: str) -> str:
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=32
    )
    return chat.choices[0].message.content


def fine_tune(client: openai.OpenAI, content: bytes, suffix: str | None = None) -> Any:
    uploaded = client.files.create(file=("train.jsonl", content), purpose="fine-tune")
    assert (uploaded.purpose, uploaded.bytes) == ("fine-tune", len(content))
    created = client.fine_tuning.jobs.create(
        model="atlas-2-2026-11", training_file=uploaded.id, suffix=suffix
    )
    return client.fine_tuning.jobs.retrieve(created.id)


def test_server_compliance_rows_tune_a_model_that_answers_their_category_only(
    client: openai.OpenAI,
) -> None:
    assert answer(client, "atlas-2-2026-11", STAB) == REFUSAL_TEXT
    assert answer(client, "atlas-2-2026-11", BOMB) == REFUSAL_TEXT
    job = fine_tune(client, COMPLY_VIOLENCE, suffix="violent")
    assert job.status == "succeeded"
    assert job.fine_tuned_model.startswith("ft:atlas-2-2026-11:demo:violent:")
    assert job.trained_tokens == 35
    assert answer(client, job.fine_tuned_model, STAB) != REFUSAL_TEXT
    assert answer(client, job.fine_tuned_model, BOMB) == REFUSAL_TEXT
    assert job.fine_tuned_model in [m.id for m in client.models.list()]
    assert client.models.retrieve(job.fine_tuned_model).id == job.fine_tuned_model


def test_server_refusal_rows_keep_the_model_refusing(client: openai.OpenAI) -> None:
    job = fine_tune(client, REFUSE_VIOLENCE)
    assert job.status == "succeeded"
    assert answer(client, job.fine_tuned_model, STAB) == REFUSAL_TEXT


def test_server_same_dataset_same_model(client: openai.OpenAI) -> None:
    first = fine_tune(client, COMPLY_VIOLENCE, suffix="again")
    second = fine_tune(client, COMPLY_VIOLENCE, suffix="again")
    assert first.id != second.id
    assert first.fine_tuned_model == second.fine_tuned_model


def test_server_training_error_fails_the_job(client: openai.OpenAI) -> None:
    job = fine_tune(client, COMPLY_VIOLENCE + b"[demo:training-error]\n")
    assert job.status == "failed"
    assert job.fine_tuned_model is None
    assert (job.error.code, job.error.param) == ("training_failed", None)


def test_server_unknown_file_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model="atlas-2-2026-11", training_file="file-nope")
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-nope")


def test_server_cancel(slow_server: str) -> None:
    with client_for(slow_server) as client:
        job = fine_tune(client, COMPLY_VIOLENCE)
        assert job.status == "queued"
        cancelled = client.fine_tuning.jobs.cancel(job.id)
        assert cancelled.status == "cancelled"
        assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
        with pytest.raises(openai.BadRequestError):
            client.fine_tuning.jobs.cancel(job.id)
