"""The proxy against hostile input, over HTTP: what fuzzing found, kept as regression
tests, and a sweep of NUL bytes, control characters, deep nesting, huge numbers,
key-shaped text and invalid UTF-8 over every proxy route. No answer may be a 500, and
every call must leave exactly one usage event (found: one unauthenticated NUL stopped
every later usage write on PostgreSQL).
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from monitoring.models import UsageEvent
from tests.access.proxy_cast import HELLO, usage_events
from tests.live import wait_until

pytestmark = pytest.mark.usefixtures("live_db")


def raw_request(port: int, request: bytes) -> tuple[int, bytes]:
    """Send bytes no HTTP client would send; return the status and the body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def all_events() -> int:
    return UsageEvent.objects.count()


def wait_for_events(count: int) -> None:
    wait_until(lambda: all_events() >= count, timeout=10, what=f"{count} usage events")


def test_nul_in_a_model_name_is_recorded_cleaned_and_blocks_no_later_event(cast):
    key = cast.keys["northwind-research"]
    url = cast.server.url
    before = all_events()
    assert httpx.get(f"{url}/authz/v1/models/%00").status_code == 401
    assert httpx.get(f"{url}/v1/models/%00", headers={"x-api-key": key}).status_code == 404
    body = {"model": "atlas\x002", "messages": HELLO}
    answer = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"x-api-key": key})
    assert (answer.status_code, answer.json()["error"]["code"]) == (404, "unknown_model")
    reply = cast.client().chat.completions.create(model="atlas-2", messages=HELLO)
    assert reply.usage.completion_tokens > 0

    wait_for_events(before + 4)
    names = list(UsageEvent.objects.order_by("id").values_list("release", flat=True))[before:]
    assert names == ["\ufffd", "\ufffd", "atlas\ufffd2", "atlas-2"]


def test_n_null_means_one_choice(cast):
    answer = httpx.post(
        f"{cast.server.url}/v1/chat/completions",
        json={"model": "atlas-2", "messages": HELLO, "n": None, "max_tokens": None},
        headers={"x-api-key": cast.keys["northwind-research"]},
    )
    assert answer.status_code == 200
    assert len(answer.json()["choices"]) == 1


PREFIX = b'{"model": "atlas-2", "messages": [{"role": "user", "content": "hi"}], "x": '


def test_body_nested_too_deep_is_refused_before_reserving_and_recorded(cast):
    url = f"{cast.server.url}/v1/chat/completions"
    headers = {"x-api-key": cast.keys["northwind-research"]}

    def remaining_requests() -> int:
        answer = httpx.post(url, json={"model": "atlas-2", "messages": HELLO}, headers=headers)
        assert answer.status_code == 200
        return int(answer.headers["x-ratelimit-remaining-requests"])

    attempts = 0
    while attempts < 3:  # the counters are per UTC minute: retry across a boundary
        attempts += 1
        minute = time.time() // 60
        first = remaining_requests()
        for depth in (254, 300, 1000):  # 254 levels in all is what the proxy forwards
            deep = PREFIX + b"[" * depth + b"]" * depth + b"}"
            answer = httpx.post(url, content=deep, headers=headers)
            assert (answer.status_code, answer.json()["error"]["code"]) == (
                400,
                "invalid_request",
            )
        last = remaining_requests()
        if time.time() // 60 == minute:
            break
    assert last == first - 1  # the refused ones reserved nothing
    events = usage_events(5 * attempts, endpoint="chat.completions")[-5:]
    assert [(e.status, e.decision, e.reason) for e in events] == [
        (200, "allow", "ok"),
        *[(400, "deny", "invalid_request")] * 3,
        (200, "allow", "ok"),
    ]
    fits = PREFIX + b"[" * 253 + b"]" * 253 + b"}"
    assert httpx.post(url, content=fits, headers=headers).status_code == 200


SECRET = "Zq7" * 14
KEY_SHAPED = "sgk_0123456789abcdef_" + SECRET


def secrets_stored() -> list[str]:
    return [name for name in UsageEvent.objects.values_list("release", flat=True) if SECRET in name]


def _bodies() -> list[bytes]:
    deep = b"[" * 600 + b"]" * 600
    values = [
        b'"\\u0000"',
        b'"atlas-2\\u0000"',
        b'"\\u001b[31m\\r\\n"',
        b'"' + KEY_SHAPED.encode() + b'"',
        b"1e400",
        b"-1e400",
        b"99999999999999999999999999999999",
        b"-9223372036854775809",
        b"1.7976931348623157e309",
        b"null",
        b"true",
        deep,
        b'{"a": ' * 300 + b"1" + b"}" * 300,
        b'"\xff\xfe"',
        b'"\xed\xa0\x80"',  # a UTF-16 surrogate, encoded
        b'"\\ud800"',
    ]
    bodies = [b"", b"\x00", b"\xff\xfe\xfd", deep, b"{" * 2000, b'{"model": ' + deep + b"}"]
    for value in values:
        for field in ("model", "max_tokens", "max_completion_tokens", "n", "stream", "messages"):
            base = {b"model": b'"atlas-2"', b"messages": b"[]"}
            base[field.encode()] = value
            bodies.append(
                b"{" + b", ".join(b'"%s": %s' % (name, text) for name, text in base.items()) + b"}"
            )
    return bodies


def test_fuzzed_bodies_never_get_a_500_and_each_leaves_one_event(cast):
    headers = {"x-api-key": cast.keys["northwind-research"], "content-type": "application/json"}
    before = all_events()
    sent = 0
    with httpx.Client(base_url=cast.server.url, timeout=30) as client:
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            for body in _bodies():
                answer = client.post(path, content=body, headers=headers)
                sent += 1
                assert answer.status_code < 500, (path, body[:80], answer.text)
                assert answer.headers["content-type"].startswith(
                    ("application/json", "text/event-stream")
                ), (path, body[:80])
    wait_for_events(before + sent)
    assert all_events() == before + sent
    assert secrets_stored() == []


def test_fuzzed_paths_and_headers_never_get_a_500_and_each_leaves_one_event(cast):
    key = cast.keys["northwind-research"].encode()
    port = cast.server.port
    targets = [
        b"/v1/models/%00",
        b"/v1/models/%FF%FE",
        b"/v1/models/%ED%A0%80",
        b"/v1/models/atlas-2%0D%0Ax-evil:%201",
        b"/v1/models/" + b"a" * 8000,
        b"/v1/models/" + KEY_SHAPED.encode(),
        b"/v1/access?x=%00",
        b"/authz/v1/models/%00",
        b"/authz/v1/models/%1B%5B31m",
        b"/authz/v1/models/" + KEY_SHAPED.encode(),
    ]
    header_sets = [
        b"x-api-key: " + key + b"\r\n",
        b"authorization: Bearer " + key + b"\x01\r\n",
        b"authorization: Bearer \xff\xfe\r\n",
        b"authorization: Bearer " + KEY_SHAPED.encode() + b"\r\n",
        b"x-api-key: " + key + b"\r\nx-stagegate-model: atlas\x7f\xff\r\n",
        b"x-api-key: " + key + b"\r\nx-original-uri: /v1/models/\xff%00\r\n",
    ]
    before = all_events()
    sent = 0
    for target in targets:
        for extra in header_sets:
            request = b"GET " + target + b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\n" + extra
            status, body = raw_request(port, request + b"\r\n")
            if status == 400 and not body.startswith(b"{"):
                continue  # refused by the HTTP parser itself: the app never saw it
            sent += 1
            assert status < 500, (target, extra, body)
    assert sent >= len(targets) * len(header_sets) // 2  # most reached the proxy
    wait_for_events(before + sent)
    assert all_events() == before + sent
    assert secrets_stored() == []
