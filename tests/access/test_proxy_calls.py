"""Model calls through the proxy (access/proxy/calls.py) end to end: a real server on
a free port, the official openai client, the demo upstream, and the test database
underneath (the cast: tests/access/proxy_cast.py)."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from django.db import connection

from access.decisions import KeyEntry, OrgEntry, ReleaseEntry, RequestInfo, decide
from access.keys import revoke_key
from access.models import ApiKey, Organization, Verification
from access.tier_changes import set_verification_status
from rollout.models import Release, RolloutPlan
from rollout.plans import apply_plan, plan_doc
from tests.access.proxy_cast import HELLO, plan_text, set_release, usage_events
from tests.live import DemoUpstream, ProxyServer, free_port

pytestmark = pytest.mark.usefixtures("live_db")


# --- who may call what ----------------------------------------------------------------------


def test_a_model_the_tier_may_not_use_is_answered_as_not_found(cast):
    acme = cast.client("acme-commercial")
    with pytest.raises(openai.NotFoundError) as hidden:
        acme.chat.completions.create(model="atlas-2", messages=HELLO)
    with pytest.raises(openai.NotFoundError) as unknown:
        acme.chat.completions.create(model="no-such-model", messages=HELLO)
    with pytest.raises(openai.NotFoundError):
        acme.models.retrieve("atlas-2")
    assert hidden.value.code == unknown.value.code == "unknown_model"
    assert hidden.value.message.replace("atlas-2", "X") == unknown.value.message.replace(
        "no-such-model", "X"
    )
    reasons = [e.reason for e in usage_events(2, endpoint="chat.completions")]
    assert reasons == ["model_not_available", "unknown_model"]


def test_missing_verification_is_refused_with_its_reason(cast):
    verification = Verification.objects.get(organization__slug="northwind-research")
    set_verification_status(verification, status="revoked", actor=None)
    cast.server.wait_synced()
    with pytest.raises(openai.PermissionDeniedError) as refused:
        cast.client().chat.completions.create(model="atlas-2", messages=HELLO)
    assert refused.value.code == "verification_required"
    # At general, public is admitted: the org is served as public, with public's limits.
    reply = cast.client().with_raw_response.chat.completions.create(
        model="atlas-lite", messages=HELLO
    )
    assert reply.headers["x-stagegate-tier"] == "public"
    assert reply.headers["x-ratelimit-limit-requests"] == "20"


# --- the calls ------------------------------------------------------------------------------


def test_chat_completions_embeddings_and_streaming_work(cast):
    client = cast.client()
    chat = client.chat.completions.create(model="atlas-2", messages=HELLO, max_tokens=8)
    assert chat.choices[0].message.content
    assert chat.usage.completion_tokens == 8
    assert chat.model == "atlas-2-2026-11"  # the upstream's own id, as OpenAI answers

    completion = client.completions.create(model="atlas-2", prompt="Once upon a time", max_tokens=5)
    assert completion.choices[0].text
    assert completion.usage.completion_tokens == 5

    embedding = client.embeddings.create(model="atlas-2", input=["one", "two"])
    assert [len(item.embedding) for item in embedding.data] == [16, 16]

    chunks = list(
        client.chat.completions.create(
            model="atlas-2",
            messages=HELLO,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 8

    # Without include_usage the client gets no usage chunk, but the proxy still counts.
    plain = list(
        client.chat.completions.create(model="atlas-2", messages=HELLO, max_tokens=8, stream=True)
    )
    assert [c for c in plain if not c.choices] == []
    events = usage_events(5, endpoint__in=["chat.completions", "completions", "embeddings"])
    assert [(e.endpoint, e.streamed, e.completion_tokens, e.status) for e in events] == [
        ("chat.completions", False, 8, 200),
        ("completions", False, 5, 200),
        ("embeddings", False, 0, 200),
        ("chat.completions", True, 8, 200),
        ("chat.completions", True, 8, 200),
    ]
    assert {(e.org, e.tier, e.stage, e.decision) for e in events} == {
        (events[0].org, "research_partner", "research_preview", "allow")
    }


def test_max_tokens_above_the_tier_limit_is_refused(cast):
    with pytest.raises(openai.BadRequestError) as refused:
        cast.client().chat.completions.create(model="atlas-2", messages=HELLO, max_tokens=5000)
    assert refused.value.code == "request_too_large"


def _replayed(event) -> str:
    """The reason ``decide`` gives from what ``event`` recorded alone: the plan version it
    names, the stage, the tier claimed and the verifications held, the model, endpoint,
    stream and max_tokens asked for (the release active, as it was)."""
    key = ApiKey.objects.get(public_id=event.key)
    org = Organization.objects.get(public_id=event.org)
    plan = RolloutPlan.objects.filter(release__name=event.release, version=event.plan_version)
    release = None
    if event.plan_version is not None:
        release = ReleaseEntry(
            name=event.release,
            public_id="",
            state="active",
            stage=plan_doc(plan.get()).stage(event.stage),
            upstream_base_url="",
            upstream_model="",
            plan_version=event.plan_version,
            created=0,
        )
    return decide(
        key=KeyEntry(key.key_id, key.public_id, key.digest, org.pk, None, revoked=False),
        org=OrgEntry(
            org.public_id,
            org.slug,
            event.claimed_tier,
            tuple((kind, None) for kind in event.verifications),
        ),
        release=release,
        model=event.release,
        request=RequestInfo(event.endpoint, stream=event.streamed, max_tokens=event.max_tokens),
        now=event.created_at.timestamp(),
    ).reason.value


def test_usage_events_carry_what_replaying_their_decisions_needs(cast):
    cast.apply(rpm=7)  # a second version of atlas-2's plan, which decisions now read
    version = Release.objects.get(name="atlas-2").active_plan.version
    assert version == 2
    cast.client().chat.completions.create(model="atlas-2", messages=HELLO, max_tokens=8)
    with pytest.raises(openai.NotFoundError):
        cast.client("acme-commercial").chat.completions.create(
            model="atlas-2", messages=HELLO, stream=True
        )
    with pytest.raises(openai.BadRequestError):
        cast.client().chat.completions.create(model="atlas-2", messages=HELLO, max_tokens=5000)
    with pytest.raises(openai.NotFoundError):
        cast.client("public-dev").chat.completions.create(model="atlas-3", messages=HELLO)

    events = usage_events(4, endpoint="chat.completions")
    assert [
        (e.reason, e.plan_version, e.max_tokens, e.streamed, e.claimed_tier, e.verifications)
        for e in events
    ] == [
        ("ok", 2, 8, False, "research_partner", frozenset({"monitoring_agreement"})),
        ("model_not_available", 2, None, True, "verified_commercial", frozenset({"business_kyc"})),
        (
            "request_too_large",
            2,
            5000,
            False,
            "research_partner",
            frozenset({"monitoring_agreement"}),
        ),
        ("unknown_model", None, None, False, "public", frozenset()),
    ]
    assert [_replayed(e) for e in events] == [e.reason for e in events]


# --- bad keys and bad requests --------------------------------------------------------------


def test_bad_keys_get_authentication_errors(cast):
    genuine = cast.keys["acme-commercial"]
    spoiled = genuine[:-1] + ("y" if genuine.endswith("x") else "x")  # one character off
    for key in ("sk-not-ours", spoiled):
        client = openai.OpenAI(base_url=f"{cast.server.url}/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as refused:
            client.models.list()
        assert refused.value.code == "invalid_key"
    response = httpx.post(f"{cast.server.url}/v1/chat/completions", json={"model": "atlas-2"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_key"


def test_bad_requests_get_clear_errors_and_are_recorded(cast):
    url = f"{cast.server.url}/v1/chat/completions"
    headers = {"x-api-key": cast.keys["northwind-research"]}
    cases = [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_request"),
        (b'{"messages": []}', 400, "invalid_request"),
        (b'{"model": "atlas-2", "messages": [], "max_tokens": "lots"}', 400, "invalid_request"),
        (b'{"model": "atlas-2", "messages": [], "max_tokens": 0}', 400, "invalid_request"),
        (b'{"model": "atlas-2", "messages": [], "n": 0}', 400, "invalid_request"),
        # 30 choices of 4,096 tokens can never fit research_partner's 100,000 a minute
        (b'{"model": "atlas-2", "messages": [], "n": 30}', 400, "request_too_large"),
        (
            b'{"model": "atlas-2", "x": "' + b"a" * (5 * 1024 * 1024) + b'"}',
            413,
            "request_too_large",
        ),
    ]
    for body, status, code in cases:
        response = httpx.post(url, content=body, headers=headers)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code)
    assert httpx.get(url, headers=headers).status_code == 405
    events = usage_events(len(cases), endpoint="chat.completions")
    assert [(e.status, e.reason, e.decision) for e in events] == [
        (status, code, "deny") for _, status, code in cases
    ]


# --- changes take effect at once --------------------------------------------------------------


def _refused_within(call, error, code: str, timeout: float = 1.0) -> float:
    started = time.monotonic()
    while True:
        try:
            call()
        except error as exc:
            assert exc.code == code
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"still admitted after {timeout} s"
        time.sleep(0.01)


def test_revoked_key_is_refused_within_one_second(cast):
    client = cast.client()
    client.chat.completions.create(model="atlas-2", messages=HELLO)
    key = ApiKey.objects.get(organization__slug="northwind-research")
    revoke_key(api_key=key, actor=None, reason="test")
    _refused_within(
        lambda: client.chat.completions.create(model="atlas-2", messages=HELLO),
        openai.AuthenticationError,
        "key_revoked",
    )


def test_paused_release_is_refused_within_one_second(cast):
    client = cast.client()
    client.chat.completions.create(model="atlas-2", messages=HELLO)
    set_release("atlas-2", state="paused")
    _refused_within(
        lambda: client.chat.completions.create(model="atlas-2", messages=HELLO),
        openai.PermissionDeniedError,
        "release_paused",
    )
    # Paused is not hidden from its own tiers, and stays invisible to the others.
    with pytest.raises(openai.NotFoundError):
        cast.client("acme-commercial").chat.completions.create(model="atlas-2", messages=HELLO)


def test_a_stage_change_opens_the_model_to_the_next_tier(cast):
    acme = cast.client("acme-commercial")
    with pytest.raises(openai.NotFoundError):
        acme.chat.completions.create(model="atlas-2", messages=HELLO)
    set_release("atlas-2", current_stage="academic")
    cast.server.wait_synced(timeout=1)
    assert acme.chat.completions.create(model="atlas-2", messages=HELLO).choices


# --- limits ---------------------------------------------------------------------------------


def test_rate_limit_holds_under_concurrent_callers(cast):
    cast.apply(rpm=5)
    if time.time() % 60 > 50:  # keep the burst inside one fixed minute window
        time.sleep(61 - time.time() % 60)
    client = openai.AsyncOpenAI(
        base_url=f"{cast.server.url}/v1", api_key=cast.keys["northwind-research"], max_retries=0
    )

    async def one():
        try:
            await client.chat.completions.create(model="atlas-2", messages=HELLO, max_tokens=4)
            return "ok"
        except openai.RateLimitError as exc:
            assert exc.code == "rate_limited"
            assert 1 <= int(exc.response.headers["retry-after"]) <= 60
            assert exc.response.headers["x-ratelimit-remaining-requests"] == "0"
            return "limited"

    async def burst():
        async with client:
            return await asyncio.gather(*(one() for _ in range(20)))

    outcomes = asyncio.run(burst())
    assert sorted(outcomes) == ["limited"] * 15 + ["ok"] * 5


def test_token_reservations_settle_to_the_real_usage(cast):
    if time.time() % 60 > 55:  # both calls inside one fixed minute window
        time.sleep(61 - time.time() % 60)
    body = b'{"model": "atlas-2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}'
    headers = {
        "Authorization": f"Bearer {cast.keys['northwind-research']}",
        "Content-Type": "application/json",
    }
    url = f"{cast.server.url}/v1/chat/completions"
    reserved = len(body) // 4 + 8  # the prompt estimate plus max_tokens
    first = httpx.post(url, content=body, headers=headers)
    second = httpx.post(url, content=body, headers=headers)
    used = first.json()["usage"]["total_tokens"]
    assert used < reserved
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 100_000 - reserved
    # The first call was settled to what it used before the second reserved.
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == 100_000 - used - reserved


# --- failures -------------------------------------------------------------------------------


def test_broken_upstream_gives_502_or_504_and_is_recorded(cast):
    cast.apply(model="demo-error-500")
    with pytest.raises(openai.InternalServerError) as failed:
        cast.client().chat.completions.create(model="atlas-2", messages=HELLO)
    assert (failed.value.status_code, failed.value.code) == (502, "upstream_error")

    cast.apply(model="demo-bad-json")
    with pytest.raises(openai.InternalServerError) as failed:
        cast.client().chat.completions.create(model="atlas-2", messages=HELLO)
    assert (failed.value.status_code, failed.value.code) == (502, "upstream_error")

    apply_plan(plan_text(f"http://127.0.0.1:{free_port()}/v1"), actor=None)
    cast.server.wait_synced()
    with pytest.raises(openai.InternalServerError) as failed:
        cast.client().chat.completions.create(model="atlas-2", messages=HELLO)
    assert (failed.value.status_code, failed.value.code) == (502, "upstream_unreachable")

    cast.apply(model="demo-stream-cut")  # the upstream ends the stream early
    cut = httpx.post(
        f"{cast.server.url}/v1/chat/completions",
        json={"model": "atlas-2", "messages": HELLO, "stream": True},
        headers={"Authorization": f"Bearer {cast.keys['northwind-research']}"},
    )
    assert cut.status_code == 200  # the status was sent before the stream broke
    assert "[DONE]" not in cut.text

    cast.apply(model="demo-hang")  # the test server's read timeout is 2 s
    with pytest.raises(openai.InternalServerError) as failed:
        cast.client().chat.completions.create(model="atlas-2", messages=HELLO)
    assert (failed.value.status_code, failed.value.code) == (504, "upstream_timeout")

    events = usage_events(5, endpoint="chat.completions")
    assert [(e.status, e.error, e.decision) for e in events] == [
        (502, "upstream_error", "allow"),
        (502, "upstream_error", "allow"),
        (502, "upstream_unreachable", "allow"),
        (200, "upstream_incomplete", "allow"),
        (504, "upstream_timeout", "allow"),
    ]
    assert events[3].completion_tokens == 2  # the two words sent before the cut


def test_client_leaving_mid_stream_is_recorded_with_the_tokens_sent(cast):
    slow = DemoUpstream(extra_args=["--token-latency-ms", "100"])
    try:
        apply_plan(plan_text(slow.base_url), actor=None)
        cast.server.wait_synced()
        body = {"model": "atlas-2", "messages": HELLO, "stream": True, "max_tokens": 50}
        headers = {"Authorization": f"Bearer {cast.keys['northwind-research']}"}
        received = 0
        with httpx.stream(
            "POST", f"{cast.server.url}/v1/chat/completions", json=body, headers=headers
        ) as response:
            for line in response.iter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    received += 1
                if received == 3:
                    break
        [event] = usage_events(1, endpoint="chat.completions")
    finally:
        slow.stop()
    assert event.client_disconnected is True
    assert event.streamed is True
    assert 3 <= event.completion_tokens < 50


def test_unreachable_policy_store_fails_closed(cast):
    if connection.vendor == "postgresql":
        env = {"DATABASE_URL": "postgres://postgres@127.0.0.1:5432/no_such_database"}
    else:
        env = {"STAGEGATE_SQLITE_PATH": "/nonexistent/dir/stagegate.sqlite3"}
    server = ProxyServer(env=env, ready_status=503)
    try:
        client = cast.client(server=server)
        with pytest.raises(openai.InternalServerError) as refused:
            client.chat.completions.create(model="atlas-2", messages=HELLO)
        assert (refused.value.status_code, refused.value.code) == (503, "policy_store_unavailable")
    finally:
        server.stop()


@pytest.mark.skipif(
    "not __import__('django.db').db.connection.vendor == 'postgresql'",
    reason="production mode needs PostgreSQL (the CI run with DATABASE_URL)",
)
def test_dead_redis_in_production_mode_refuses_rather_than_admits(cast):
    server = ProxyServer(
        env={
            "STAGEGATE_MODE": "production",
            "SECRET_KEY": "x" * 60,
            "ALLOWED_HOSTS": "127.0.0.1",
            "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        }
    )
    try:
        client = cast.client(server=server)
        with pytest.raises(openai.InternalServerError) as refused:
            client.chat.completions.create(model="atlas-2", messages=HELLO)
        assert (refused.value.status_code, refused.value.code) == (503, "limits_unavailable")
    finally:
        server.stop()
    [event] = usage_events(1, endpoint="chat.completions", status=503)
    assert event.reason == "limits_unavailable"
