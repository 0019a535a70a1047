"""Slow clients against a real server: request headers and bodies that never finish
are cut off, and connections beyond the limit are refused (stagegate/deadlines.py).

Every server here runs with deadlines of one second. Timings are asserted loosely: a
cut must come no sooner than the deadline allows and within generous slack of it.
"""

from __future__ import annotations

import re
import select
import socket
import time

import httpx
import pytest

from access.keys import issue_key
from access.models import Organization
from monitoring.models import UsageEvent
from tests.factories import make_org
from tests.live import METRICS_TOKEN, ProxyServer, wait_until

pytestmark = pytest.mark.usefixtures("live_db")

DEADLINE = 1.0  # seconds, both for headers and bodies
SLACK = 10.0  # a loaded CI machine is slow, but never this slow


@pytest.fixture(scope="module")
def impatient_server(django_db_setup, django_db_blocker):
    deadline = str(DEADLINE)
    env = {"STAGEGATE_HEADER_TIMEOUT": deadline, "STAGEGATE_BODY_TIMEOUT": deadline}
    with django_db_blocker.unblock():
        server = ProxyServer(env=env)
    yield server
    server.stop()


def connect(server: ProxyServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE + SLACK)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that
    took; fails if it is still open after the deadline and the slack."""
    started = time.monotonic()
    received = b""
    with sock:
        while chunk := sock.recv(65536):
            received += chunk
    return received, time.monotonic() - started


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One response with a Content-Length, read off a connection left open."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), body


def status_and_json(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), httpx.Response(200, content=body).json()


def cut_count(server: ProxyServer, phase: str) -> float:
    text = httpx.get(
        f"{server.url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
    ).text
    found = re.search(rf'^stagegate_slow_clients_cut_total{{phase="{phase}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def assert_cut_in_time(elapsed: float) -> None:
    assert DEADLINE / 2 <= elapsed <= DEADLINE + SLACK


def public_key(server: ProxyServer) -> bytes:
    org = make_org("slow-poster", "public")
    key = issue_key(organization=org, name="slow", actor=None).raw_key
    server.wait_synced()
    return key.encode()


def post_chat_head(key: bytes, length: int) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + key
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length
    )


# --- headers --------------------------------------------------------------------------------


def test_connection_that_sends_nothing_is_closed_without_an_answer(impatient_server):
    received, elapsed = read_until_closed(connect(impatient_server))
    assert received == b""
    assert_cut_in_time(elapsed)


def test_partial_request_line_or_headers_get_408_and_are_disconnected(impatient_server):
    before = cut_count(impatient_server, "headers")
    for partial in (b"GET /api/orgs/ HT", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAccept: "):
        sock = connect(impatient_server)
        sock.sendall(partial)
        received, elapsed = read_until_closed(sock)
        assert_cut_in_time(elapsed)
        status, document = status_and_json(received)
        assert (status, document["error"]["code"]) == (408, "request_timeout")
        assert b"\r\nconnection: close\r\n" in received
    assert cut_count(impatient_server, "headers") - before == 2


def test_kept_alive_connection_may_idle_longer_than_the_header_deadline(impatient_server):
    # The deadline runs from a request's first byte, not from the previous response:
    # between requests, uvicorn's keep-alive timeout (5 s) applies.
    sock = connect(impatient_server)
    with sock:
        for _ in range(2):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock)[0] == 200
            time.sleep(DEADLINE * 1.5)


# --- bodies ---------------------------------------------------------------------------------


def test_django_route_body_that_never_finishes_gets_408(impatient_server):
    sock = connect(impatient_server)
    sock.sendall(
        b"POST /api/orgs/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"slug": "slow'
    )
    received, elapsed = read_until_closed(sock)
    assert_cut_in_time(elapsed)
    status, document = status_and_json(received)
    assert (status, document["error"]["code"]) == (408, "request_timeout")


def test_proxied_body_that_never_finishes_gets_408_and_is_recorded(impatient_server):
    sock = connect(impatient_server)
    sock.sendall(post_chat_head(public_key(impatient_server), 500) + b'{"model": "at')
    received, elapsed = read_until_closed(sock)
    assert_cut_in_time(elapsed)
    status, document = status_and_json(received)
    assert (status, document["error"]["code"]) == (408, "request_timeout")

    event = wait_until(
        lambda: UsageEvent.objects.filter(org=Organization.objects.get().public_id).first(),
        timeout=10,
        what="the timed-out call's usage event",
    )
    assert (event.endpoint, event.decision, event.reason, event.status) == (
        "chat.completions",
        "deny",
        "request_timeout",
        408,
    )


def test_body_arriving_in_parts_within_the_deadline_is_served(impatient_server):
    body = b'{"model": "no-such-model", "messages": []}'
    sock = connect(impatient_server)
    with sock:
        sock.sendall(post_chat_head(public_key(impatient_server), len(body)) + body[:10])
        time.sleep(DEADLINE / 4)
        sock.sendall(body[10:])
        status, answer = read_response(sock)
    assert (status, httpx.Response(200, content=answer).json()["error"]["code"]) == (
        404,
        "unknown_model",
    )


def test_body_dripped_a_byte_at_a_time_is_cut_at_the_deadline(impatient_server):
    # One deadline for the whole body: each byte does not buy the client more time.
    sock = connect(impatient_server)
    sock.sendall(post_chat_head(public_key(impatient_server), 10_000) + b"{")
    started = time.monotonic()
    while time.monotonic() - started < DEADLINE + SLACK:
        if select.select([sock], [], [], DEADLINE / 10)[0]:  # the answer has come
            break
        sock.sendall(b" ")
    assert_cut_in_time(time.monotonic() - started)
    status, document = status_and_json(read_until_closed(sock)[0])
    assert (status, document["error"]["code"]) == (408, "request_timeout")


def test_body_still_dripping_after_a_refusal_is_cut(impatient_server):
    # No key: refused before the body is read, so no application reads the rest. The
    # connection is kept for it only as long as a body may take.
    sock = connect(impatient_server)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 9999\r\n\r\n{")
    assert read_response(sock)[0] == 401
    started = time.monotonic()
    with sock:
        while time.monotonic() - started < DEADLINE + SLACK:
            if select.select([sock], [], [], 0.2)[0]:  # readable: closed by the server
                break
            sock.sendall(b" ")
        assert sock.recv(1) == b""
    assert_cut_in_time(time.monotonic() - started)


# --- connection limit -----------------------------------------------------------------------


def test_connections_beyond_the_limit_get_503_until_one_closes(django_db_blocker):
    with django_db_blocker.unblock():
        server = ProxyServer(env={"STAGEGATE_MAX_CONNECTIONS": "3"})
    held = []
    try:
        for _ in range(3):  # each mid-way through its headers, within the 10 s deadline
            held.append(connect(server))
            held[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        wait_until(
            lambda: httpx.get(f"{server.url}/healthz", timeout=SLACK).status_code == 503,
            timeout=SLACK,
            what="a fourth connection to be refused",
        )
        held.pop().close()
        wait_until(
            lambda: httpx.get(f"{server.url}/healthz", timeout=SLACK).status_code == 200,
            timeout=SLACK,
            what="a connection to be served again once one closed",
        )
    finally:
        for sock in held:
            sock.close()
        server.stop()
