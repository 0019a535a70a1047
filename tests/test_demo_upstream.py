"""The demo upstream: in-process through httpx's ASGI transport, and as a real server
driven by the official openai client."""

from __future__ import annotations

import asyncio
import base64
import math
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from django.core.exceptions import ImproperlyConfigured

from stagegate.demo_upstream import DemoConfig, DemoUpstream, create_app

REPO = Path(__file__).resolve().parents[1]
APP = create_app(DemoConfig())
HI = [{"role": "user", "content": "hi"}]


def request(
    method: str, path: str, body: Any = None, *, app: DemoUpstream = APP, raw: bytes | None = None
) -> httpx.Response:
    """One request to ``app`` in-process (streamed responses arrive buffered)."""

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
            content = raw if raw is not None else None if body is None else orjson.dumps(body)
            return await client.request(method, path, content=content)

    return asyncio.run(go())


def events(response: httpx.Response) -> list[Any]:
    """The SSE ``data:`` payloads, decoded, with ``[DONE]`` kept as the string."""
    assert response.headers["content-type"] == "text/event-stream"
    assert response.content.endswith(b"\n\n")
    out = []
    for event in response.content.split(b"\n\n")[:-1]:
        assert event.startswith(b"data: ")
        data = event.removeprefix(b"data: ")
        out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


def error(message: str, *, param: str | None = None, code: str | None = None) -> Any:
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": param,
            "code": code,
        }
    }


# Chat and text completions


def test_chat_completion_shape() -> None:
    response = request("POST", "/v1/chat/completions", {"model": "atlas-2-2026-11", "messages": HI})
    assert response.status_code == 200
    body = response.json()
    text = body["choices"][0]["message"]["content"]
    assert body["id"].startswith("chatcmpl-")
    assert type(body["created"]) is int
    assert {k: body[k] for k in ("object", "model")} == {
        "object": "chat.completion",
        "model": "atlas-2-2026-11",
    }
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    ]
    assert len(text.split()) == 16
    # "user: hi" is 8 bytes: two approximate prompt tokens.
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 16, "total_tokens": 18}


def test_chat_completion_same_body_same_text() -> None:
    def text(model: str, content: str) -> str:
        messages = [{"role": "user", "content": content}]
        body = request("POST", "/v1/chat/completions", {"model": model, "messages": messages})
        return body.json()["choices"][0]["message"]["content"]

    assert text("m1", "hello") == text("m1", "hello")
    assert text("m1", "hello") != text("m1", "goodbye")
    assert text("m1", "hello") != text("m2", "hello")


def test_chat_completion_content_parts_match_plain_text() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    plain = request("POST", "/v1/chat/completions", {"model": "m", "messages": HI}).json()
    split = request("POST", "/v1/chat/completions", {"model": "m", "messages": parts}).json()
    assert split["choices"] == plain["choices"]


@pytest.mark.parametrize("limit", ["max_tokens", "max_completion_tokens"])
def test_chat_completion_max_tokens_finishes_with_length(limit: str) -> None:
    body = {"model": "m", "messages": HI, limit: 3}
    full = request("POST", "/v1/chat/completions", {"model": "m", "messages": HI}).json()
    cut = request("POST", "/v1/chat/completions", body).json()
    text = cut["choices"][0]["message"]["content"]
    assert cut["choices"][0]["finish_reason"] == "length"
    assert text.split() == full["choices"][0]["message"]["content"].split()[:3]
    assert cut["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_chat_completion_max_tokens_above_default_stops() -> None:
    body = request(
        "POST", "/v1/chat/completions", {"model": "m", "messages": HI, "max_tokens": 500}
    )
    assert body.json()["choices"][0]["finish_reason"] == "stop"
    assert body.json()["usage"]["completion_tokens"] == 16


def test_completion_shape() -> None:
    response = request("POST", "/v1/completions", {"model": "m", "prompt": "Once upon a time"})
    body = response.json()
    text = body["choices"][0]["text"]
    assert body["id"].startswith("cmpl-")
    assert (body["object"], body["model"]) == ("text_completion", "m")
    assert body["choices"] == [
        {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
    ]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 16, "total_tokens": 20}
    again = request("POST", "/v1/completions", {"model": "m", "prompt": "Once upon a time"})
    assert again.json()["choices"][0]["text"] == text


def test_chat_stream_events() -> None:
    body = {"model": "m", "messages": HI, "stream": True, "stream_options": {"include_usage": True}}
    whole = request("POST", "/v1/chat/completions", {"model": "m", "messages": HI}).json()
    stream = events(request("POST", "/v1/chat/completions", body))
    chunks, usage_chunk, done = stream[:-2], stream[-2], stream[-1]
    assert done == "[DONE]"
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["id"] for c in chunks} == {usage_chunk["id"]}
    assert chunks[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    ]
    assert chunks[-1]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    words = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert "".join(words) == whole["choices"][0]["message"]["content"]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": len(words),
        "total_tokens": 2 + len(words),
    }


def test_chat_stream_without_include_usage_has_no_usage_chunk() -> None:
    body = {"model": "m", "messages": HI, "stream": True, "max_tokens": 2}
    stream = events(request("POST", "/v1/chat/completions", body))
    assert len(stream) == 1 + 2 + 1 + 1  # role, two tokens, finish, [DONE]
    assert [c["choices"][0]["finish_reason"] for c in stream[:-1]] == [None, None, None, "length"]
    assert all("usage" not in c for c in stream[:-1])


def test_completion_stream_events() -> None:
    body = {"model": "m", "prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
    whole = request("POST", "/v1/completions", {"model": "m", "prompt": "x"}).json()
    stream = events(request("POST", "/v1/completions", body))
    chunks = stream[:-2]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 16 + ["stop"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert stream[-2]["usage"] == whole["usage"]
    assert stream[-1] == "[DONE]"


# Embeddings


def test_embeddings_are_unit_vectors_derived_from_the_input() -> None:
    body = request("POST", "/v1/embeddings", {"model": "e", "input": ["alpha", "beta"]}).json()
    assert body["object"] == "list"
    assert body["model"] == "e"
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", 0), ("embedding", 1)]
    first, second = (d["embedding"] for d in body["data"])
    assert len(first) == 16
    assert math.isclose(math.fsum(x * x for x in first), 1.0, rel_tol=1e-6)
    assert first != second
    single = request("POST", "/v1/embeddings", {"model": "e", "input": "alpha"}).json()
    assert single["data"][0]["embedding"] == first
    assert body["usage"] == {"prompt_tokens": 2, "total_tokens": 2}


def test_embeddings_base64_carries_the_same_vector() -> None:
    as_float = request("POST", "/v1/embeddings", {"model": "e", "input": "alpha"}).json()
    body = {"model": "e", "input": "alpha", "encoding_format": "base64"}
    encoded = request("POST", "/v1/embeddings", body).json()["data"][0]["embedding"]
    raw = base64.b64decode(encoded)
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == as_float["data"][0]["embedding"]


def test_embeddings_token_arrays_and_dimensions() -> None:
    body = {"model": "e", "input": [[1, 2, 3], [4, 5]], "dimensions": 64}
    response = request("POST", "/v1/embeddings", body).json()
    assert [len(d["embedding"]) for d in response["data"]] == [64, 64]
    assert response["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    single = request("POST", "/v1/embeddings", {"model": "e", "input": [1, 2, 3]}).json()
    assert len(single["data"]) == 1


# Models


def test_models_list() -> None:
    body = request("GET", "/v1/models").json()
    models = [
        {"id": name, "object": "model", "created": 1767225600, "owned_by": "stagegate-demo"}
        for name in ("atlas-2-2026-11", "atlas-2-mini-2026-11")  # the release and its fallback
    ]
    assert body == {"object": "list", "data": models}
    assert request("GET", "/v1/models/atlas-2-mini-2026-11").json() == models[1]


def test_models_from_config() -> None:
    app = create_app(DemoConfig(models=("a", "b")))
    assert [m["id"] for m in request("GET", "/v1/models", app=app).json()["data"]] == ["a", "b"]


def test_models_get_fault_model() -> None:
    assert request("GET", "/v1/models/demo-hang").json()["id"] == "demo-hang"


def test_models_get_unknown_is_404() -> None:
    response = request("GET", "/v1/models/nope")
    assert response.status_code == 404
    message = "The model 'nope' does not exist"
    assert response.json() == error(message, param="model", code="model_not_found")


# Errors


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/nothing"), ("GET", "/v1/chat/completions"), ("POST", "/v2/embeddings")],
)
def test_unknown_url_is_404(method: str, path: str) -> None:
    response = request(method, path)
    assert response.status_code == 404
    message = f"Unknown request URL: {method} {path}"
    assert response.json() == error(message, code="unknown_url")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": HI}, "model"),
        ("/v1/chat/completions", {"model": "m"}, "messages"),
        ("/v1/chat/completions", {"model": "m", "messages": []}, "messages"),
        ("/v1/chat/completions", {"model": "m", "messages": HI, "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"model": "m"}, "prompt"),
        ("/v1/completions", {"model": "m", "prompt": {"x": 1}}, "prompt"),
        ("/v1/embeddings", {"model": "m"}, "input"),
        ("/v1/embeddings", {"model": "m", "input": []}, "input"),
        ("/v1/embeddings", {"model": "m", "input": "x", "dimensions": 4097}, "dimensions"),
        (
            "/v1/embeddings",
            {"model": "m", "input": "x", "encoding_format": "hex"},
            "encoding_format",
        ),
        ("/v1/embeddings", {"input": "x"}, "model"),
    ],
)
def test_invalid_body_is_400_naming_the_field(path: str, body: Any, param: str) -> None:
    response = request("POST", path, body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b""])
def test_malformed_json_is_400(raw: bytes) -> None:
    response = request("POST", "/v1/chat/completions", raw=raw)
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


# Fault models


def test_fault_error_500() -> None:
    response = request("POST", "/v1/chat/completions", {"model": "demo-error-500", "messages": HI})
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"


def test_fault_error_429_asks_to_retry() -> None:
    response = request("POST", "/v1/embeddings", {"model": "demo-error-429", "input": "x"})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"


def test_fault_bad_json() -> None:
    response = request("POST", "/v1/completions", {"model": "demo-bad-json", "prompt": "x"})
    assert (response.status_code, response.content) == (200, b"not json")


def test_fault_stream_cut_ends_after_three_events() -> None:
    body = {"model": "demo-stream-cut", "messages": HI, "stream": True}
    stream = events(request("POST", "/v1/chat/completions", body))
    assert len(stream) == 3
    assert [c["choices"][0]["finish_reason"] for c in stream] == [None, None, None]


def test_fault_stream_cut_without_stream_answers_whole() -> None:
    body = {"model": "demo-stream-cut", "messages": HI}
    response = request("POST", "/v1/chat/completions", body)
    assert response.json()["choices"][0]["finish_reason"] == "stop"


def test_prompt_fault_error_answers_500() -> None:
    messages = [{"role": "user", "content": "hi [demo:error]"}]
    response = request("POST", "/v1/chat/completions", {"model": "m", "messages": messages})
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"


def test_prompt_fault_flag_finishes_with_content_filter() -> None:
    messages = [{"role": "user", "content": "hi [demo:flag]"}]
    whole = request("POST", "/v1/chat/completions", {"model": "m", "messages": messages})
    assert whole.json()["choices"][0]["finish_reason"] == "content_filter"
    body = {"model": "m", "messages": messages, "stream": True}
    chunks = events(request("POST", "/v1/chat/completions", body))
    assert chunks[-2]["choices"][0]["finish_reason"] == "content_filter"


def test_fault_hang_does_not_answer() -> None:
    async def go() -> None:
        transport = httpx.ASGITransport(app=APP)
        async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
            body = {"model": "demo-hang", "messages": HI}
            await asyncio.wait_for(client.post("/v1/chat/completions", json=body), 0.2)

    with pytest.raises(TimeoutError):
        asyncio.run(go())


# Moderations

CATEGORIES = [
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
]


def moderation(body: Any, app: DemoUpstream = APP) -> httpx.Response:
    return request("POST", "/v1/moderations", body, app=app)


def flagged(result: dict[str, Any]) -> list[str]:
    return [category for category, hit in result["categories"].items() if hit]


def test_moderation_shape_has_every_openai_category() -> None:
    body = moderation({"model": "omni-moderation-latest", "input": "a quiet river"}).json()
    assert body["id"].startswith("modr-")
    assert body["model"] == "omni-moderation-latest"
    (result,) = body["results"]
    assert result["flagged"] is False
    assert list(result["categories"]) == CATEGORIES
    assert result["category_scores"] == dict.fromkeys(CATEGORIES, 0.0)
    assert result["category_applied_input_types"] == {c: ["text"] for c in CATEGORIES}


def test_moderation_one_result_per_input_in_order() -> None:
    inputs = ["you pathetic idiot", "hello there", "a ghost gun and a pipe bomb"]
    body = moderation({"input": inputs}).json()
    assert body["model"] == "demo-moderation"
    assert [flagged(result) for result in body["results"]] == [
        ["harassment"],
        [],
        ["illicit", "illicit/violent"],
    ]
    assert [result["flagged"] for result in body["results"]] == [True, False, True]


def test_moderation_scores_grow_with_hits() -> None:
    scores = [
        moderation({"input": text}).json()["results"][0]["category_scores"]["violence"]
        for text in ("calm", "stab", "stab and shoot", "stab, shoot and assault")
    ]
    assert scores == [0.0, 0.6, 0.84, pytest.approx(0.936)]


def test_moderation_a_subcategory_flags_its_parent() -> None:
    (result,) = moderation({"input": "scenes of gore"}).json()["results"]
    assert flagged(result) == ["violence", "violence/graphic"]
    assert result["category_scores"]["violence/graphic"] == 0.6


def test_moderation_matches_whole_words_after_normalising() -> None:
    full_width = "\uff53\uff54\uff41\uff42"  # "stab" in full-width letters
    texts = ["STAB", full_width, "s\u200btab", "beat\n   up"]  # case, NFKC, zero width, space
    assert [flagged(moderation({"input": t}).json()["results"][0]) for t in texts] == [
        ["violence"]
    ] * 4
    assert flagged(moderation({"input": "stable stabilisers"}).json()["results"][0]) == []


def test_moderation_multi_modal_parts_are_one_input_read_as_text() -> None:
    parts = [
        {"type": "text", "text": "an"},
        {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
        {"type": "text", "text": "idiot"},
    ]
    (result,) = moderation({"input": parts}).json()["results"]
    assert flagged(result) == ["harassment"]
    image_only = [{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]
    (result,) = moderation({"input": image_only}).json()["results"]
    assert result["category_applied_input_types"] == {c: [] for c in CATEGORIES}


@pytest.mark.parametrize(
    "body", [{}, {"input": []}, {"input": 3}, {"input": [1, 2]}, {"input": [{"type": "text"}]}]
)
def test_moderation_invalid_input_is_400(body: Any) -> None:
    response = moderation(body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "input"


def test_moderation_fault_markers_and_models() -> None:
    failed = moderation({"input": ["fine", "then [demo:moderation-error]"]})
    assert failed.status_code == 500
    assert failed.json()["error"]["type"] == "server_error"
    assert moderation({"model": "demo-error-429", "input": "x"}).status_code == 429
    assert moderation({"model": "demo-bad-json", "input": "x"}).content == b"not json"
    # The generation endpoints' markers are not the classifier's, and the other way round.
    assert (
        moderation({"input": "[demo:error] [demo:flag]"}).json()["results"][0]["flagged"] is False
    )
    chat = {"model": "m", "messages": [{"role": "user", "content": "[demo:moderation-error]"}]}
    assert request("POST", "/v1/chat/completions", chat).status_code == 200


def test_moderation_slow_marker_delays_the_answer() -> None:
    started = time.perf_counter()
    body = moderation({"input": "slow [demo:moderation-slow:60]"}).json()
    assert time.perf_counter() - started >= 0.06
    assert body["results"][0]["flagged"] is False


def test_moderation_ignores_the_generation_latency() -> None:
    app = create_app(DemoConfig(latency_ms=5000))

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
            return await asyncio.wait_for(client.post("/v1/moderations", json={"input": "x"}), 2)

    assert asyncio.run(go()).status_code == 200


# Configuration


def test_latency_delays_the_first_byte_and_paces_tokens() -> None:
    app = create_app(DemoConfig(latency_ms=40, token_latency_ms=20))
    body = {"model": "m", "messages": HI, "stream": True, "max_tokens": 3}
    started = time.perf_counter()
    request("POST", "/v1/chat/completions", body, app=app)
    # 40 ms before the first token, 20 ms before each of the other two.
    assert time.perf_counter() - started >= 0.08


def test_lifespan_is_acknowledged() -> None:
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[Any] = []

    async def receive() -> Any:
        return next(messages)

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(APP({"type": "lifespan"}, receive, send))
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]


def test_config_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAGEGATE_DEMO_MODELS", "a, b")
    monkeypatch.setenv("STAGEGATE_DEMO_LATENCY_MS", "5")
    assert DemoConfig.from_env() == DemoConfig(models=("a", "b"), latency_ms=5, token_latency_ms=0)


def test_config_from_env_refuses_a_negative_latency(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAGEGATE_DEMO_TOKEN_LATENCY_MS", "-1")
    with pytest.raises(ImproperlyConfigured, match="STAGEGATE_DEMO_TOKEN_LATENCY_MS"):
        DemoConfig.from_env()


# The real server, through the official client


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The base URL of ``python -m stagegate.demo_upstream`` on a free port.

    The environment asks for a 5 s first-token delay and the flag overrides it, so
    every test here would time out if flags did not win over the environment.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "STAGEGATE_DEMO_LATENCY_MS": "5000", "STAGEGATE_DEMO_MODELS": "a,b"}
    command = [
        sys.executable,
        "-m",
        "stagegate.demo_upstream",
        "--port",
        str(port),
        "--latency-ms",
        "0",
    ]
    process = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 15
        while not _ready(base_url):
            if process.poll() is not None:
                pytest.fail(f"demo upstream exited: {process.communicate()[1].decode()}")
            if time.monotonic() > deadline:
                pytest.fail("demo upstream did not answer GET /v1/models within 15 s")
            time.sleep(0.02)  # a poll interval, not a wait for readiness
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _ready(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/models", timeout=0.5).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def client(server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server, api_key="demo", max_retries=0, timeout=2) as client:
        yield client


def test_server_chat_and_completions(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model="a", messages=HI, max_tokens=4)
    assert (chat.model, chat.choices[0].finish_reason) == ("a", "length")
    assert len(chat.choices[0].message.content.split()) == chat.usage.completion_tokens == 4
    text = client.completions.create(model="b", prompt="hello")
    assert text.usage.completion_tokens == len(text.choices[0].text.split()) == 16


def test_server_embeddings_default_base64_decode_to_floats(client: openai.OpenAI) -> None:
    # The client asks for base64 unless told otherwise and decodes it itself.
    embedded = client.embeddings.create(model="a", input=["alpha", "beta"])
    expected = request("POST", "/v1/embeddings", {"model": "a", "input": ["alpha", "beta"]}).json()
    assert [d.embedding for d in embedded.data] == [d["embedding"] for d in expected["data"]]
    as_float = client.embeddings.create(model="a", input="alpha", encoding_format="float")
    assert as_float.data[0].embedding == embedded.data[0].embedding


def test_server_stream_usage_counts_the_streamed_words(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="a", messages=HI, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    words = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).split()
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(words) == 16


def test_server_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["a", "b"]
    assert client.models.retrieve("demo-error-500").id == "demo-error-500"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_server_moderations(client: openai.OpenAI) -> None:
    answer = client.moderations.create(input=["watch your back, loser", "a quiet river"])
    assert answer.model == "demo-moderation"
    threat, calm = answer.results
    assert threat.flagged is True
    assert (threat.categories.harassment, threat.categories.harassment_threatening) == (True, True)
    assert threat.category_scores.harassment == pytest.approx(0.84)
    assert threat.category_applied_input_types.violence == ["text"]
    assert calm.flagged is False
    graphic = client.moderations.create(model="omni-moderation-latest", input="dismember")
    assert graphic.model == "omni-moderation-latest"
    assert graphic.results[0].categories.violence_graphic is True


def test_server_moderation_faults(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError):
        client.moderations.create(input="[demo:moderation-error]")
    # A caller whose timeout is shorter than the classifier's delay gets no answer.
    with pytest.raises(openai.APITimeoutError):
        client.moderations.create(input="[demo:moderation-slow]", timeout=0.2)
    with pytest.raises(openai.APITimeoutError):
        client.moderations.create(model="demo-hang", input="x", timeout=0.2)
    assert (
        client.moderations.create(input="calm [demo:moderation-slow:10]").results[0].flagged
        is False
    )


def test_server_faults(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="demo-error-500", messages=HI)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="demo-error-429", messages=HI)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="demo-hang", messages=HI, timeout=0.2)
    cut = client.chat.completions.create(model="demo-stream-cut", messages=HI, stream=True)
    assert [c.choices[0].finish_reason for c in cut] == [None, None, None]
