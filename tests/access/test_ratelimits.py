"""Rate limits and quotas, on both backends: the in-process ``LocalLimiter`` and the
shared ``RedisLimiter`` (only when ``REDIS_URL`` is set, as in CI).

There is no pytest-asyncio: each test runs one scenario with ``asyncio.run``, and a
Redis client is created and closed inside that scenario's event loop."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import redis
import redis.asyncio

from access.ratelimits import (
    ALLOWED,
    DAY,
    MARKER_TTL,
    MINUTE,
    RPM,
    TPD,
    TPM,
    LimiterUnavailable,
    LimitResult,
    LocalLimiter,
    RedisLimiter,
    Reservation,
    redis_client,
)
from rollout.plan_schema import TierLimits
from tests.live import RedisServer

REDIS_URL = os.environ.get("REDIS_URL", "")
SCOPE = "atlas-2:org_northwind"
# A fixed instant 15.5 s into a UTC minute (and into a UTC day's first minute).
DAY_START = 20_000 * DAY  # 2024-10-04T00:00:00Z
T = DAY_START + 15.5
LIMITS = TierLimits(
    requests_per_minute=10, tokens_per_minute=1000, tokens_per_day=5000, max_tokens=500
)


def _limits(**overrides) -> TierLimits:
    return TierLimits(**{**LIMITS.model_dump(), **overrides})


@dataclass
class Backend:
    """Makes limiters of one kind; Redis ones share a prefix unique to the test."""

    name: str
    prefix: str = ""

    @asynccontextmanager
    async def limiter(self) -> AsyncIterator[LocalLimiter | RedisLimiter]:
        if self.name == "local":
            limiter = LocalLimiter()
        else:
            limiter = RedisLimiter(redis.asyncio.from_url(REDIS_URL), prefix=self.prefix)
        try:
            yield limiter
        finally:
            await limiter.close()


needs_redis = pytest.mark.skipif(not REDIS_URL, reason="REDIS_URL is not set: no Redis to test")


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"sgtest:{uuid.uuid4().hex}:"
    yield prefix
    if REDIS_URL:
        with redis.Redis.from_url(REDIS_URL) as client:
            keys = list(client.scan_iter(match=f"{prefix}*"))
            if keys:
                client.delete(*keys)


@pytest.fixture(params=["local", pytest.param("redis", marks=needs_redis)])
def backend(request, redis_prefix) -> Backend:
    return Backend(request.param, redis_prefix)


def _run(backend: Backend, scenario: Callable[[LocalLimiter | RedisLimiter], Awaitable]):
    async def main():
        async with backend.limiter() as limiter:
            return await scenario(limiter)

    return asyncio.run(main())


def _redis_ttls(prefix: str) -> dict[str, int]:
    with redis.Redis.from_url(REDIS_URL, decode_responses=True) as client:
        return {key: client.ttl(key) for key in client.scan_iter(match=f"{prefix}*")}


# --- requests per minute ---------------------------------------------------------------


def test_acquire_concurrent_requests_admit_exactly_rpm(backend):
    async def scenario(limiter):
        return await asyncio.gather(*(limiter.acquire(SCOPE, LIMITS, 1, T) for _ in range(50)))

    results = _run(backend, scenario)
    assert sum(result.allowed for result in results) == 10
    refused = [result for result in results if not result.allowed]
    assert {(r.outcome, r.reason, r.limit_name) for r in refused} == {
        (RPM, "rate_limited", "requests_per_minute")
    }
    assert {r.reservation for r in refused} == {None}
    assert sorted(r.requests for r in results if r.allowed) == list(range(1, 11))


@needs_redis
def test_redis_acquire_across_workers_admits_exactly_rpm(redis_prefix):
    """Five separate connections stand for five worker processes sharing one Redis."""

    async def main():
        limiters = [
            RedisLimiter(redis.asyncio.from_url(REDIS_URL), prefix=redis_prefix) for _ in range(5)
        ]
        try:
            return await asyncio.gather(
                *(limiters[n % 5].acquire(SCOPE, LIMITS, 7, T) for n in range(50))
            )
        finally:
            for limiter in limiters:
                await limiter.close()

    results = asyncio.run(main())
    assert sum(result.allowed for result in results) == 10
    # Each worker reports from its own lease; once they stopped and gave their leases
    # back, the shared counters hold exactly what was admitted.
    minute, day = int(T // MINUTE), int(T // DAY)
    with redis.Redis.from_url(REDIS_URL) as client:
        assert client.hgetall(f"{redis_prefix}{SCOPE}:m{minute}") == {b"r": b"10", b"t": b"70"}
        assert client.get(f"{redis_prefix}{SCOPE}:d{day}") == b"70"


def test_acquire_new_minute_resets_requests(backend):
    async def scenario(limiter):
        limits = _limits(requests_per_minute=2)
        first = [await limiter.acquire(SCOPE, limits, 1, T + n) for n in range(3)]
        next_minute = await limiter.acquire(SCOPE, limits, 1, T + MINUTE)
        return first, next_minute

    first, next_minute = _run(backend, scenario)
    assert [result.outcome for result in first] == [ALLOWED, ALLOWED, RPM]
    assert (next_minute.outcome, next_minute.requests, next_minute.minute_tokens) == (
        ALLOWED,
        1,
        1,
    )
    assert next_minute.day_tokens == 3


def test_acquire_scopes_are_counted_apart(backend):
    async def scenario(limiter):
        limits = _limits(requests_per_minute=1)
        return [
            await limiter.acquire("atlas-2:org_a", limits, 1, T),
            await limiter.acquire("atlas-2:org_b", limits, 1, T),
            await limiter.acquire("atlas-2:org_a", limits, 1, T),
        ]

    assert [result.outcome for result in _run(backend, scenario)] == [ALLOWED, ALLOWED, RPM]


# --- tokens per minute -----------------------------------------------------------------


def test_acquire_reserves_tokens_then_refuses(backend):
    async def scenario(limiter):
        return [
            await limiter.acquire(SCOPE, LIMITS, 600, T),
            await limiter.acquire(SCOPE, LIMITS, 401, T),
            await limiter.acquire(SCOPE, LIMITS, 400, T),
            await limiter.acquire(SCOPE, LIMITS, 1, T),
        ]

    first, too_many, exact, over = _run(backend, scenario)
    assert (first.outcome, first.minute_tokens, first.day_tokens) == (ALLOWED, 600, 600)
    assert first.reservation == Reservation(SCOPE, int(T // MINUTE), int(T // DAY), 600)
    assert (too_many.outcome, too_many.reason, too_many.limit_name) == (
        TPM,
        "rate_limited",
        "tokens_per_minute",
    )
    assert (too_many.requests, too_many.minute_tokens, too_many.reservation) == (1, 600, None)
    assert (exact.outcome, exact.minute_tokens) == (ALLOWED, 1000)
    assert over.outcome == TPM


def test_settle_with_fewer_tokens_frees_budget(backend):
    async def scenario(limiter):
        reserved = await limiter.acquire(SCOPE, LIMITS, 600, T)
        await limiter.settle(reserved.reservation, 100)
        return [
            await limiter.acquire(SCOPE, LIMITS, 900, T),
            await limiter.acquire(SCOPE, LIMITS, 1, T),
        ]

    fits, over = _run(backend, scenario)
    assert (fits.outcome, fits.minute_tokens, fits.day_tokens) == (ALLOWED, 1000, 1000)
    assert (over.outcome, over.minute_tokens) == (TPM, 1000)


def test_settle_with_more_tokens_consumes_more(backend):
    async def scenario(limiter):
        reserved = await limiter.acquire(SCOPE, LIMITS, 600, T)
        await limiter.settle(reserved.reservation, 900)
        return [
            await limiter.acquire(SCOPE, LIMITS, 101, T),
            await limiter.acquire(SCOPE, LIMITS, 100, T),
        ]

    over, fits = _run(backend, scenario)
    assert (over.outcome, over.minute_tokens, over.day_tokens) == (TPM, 900, 900)
    assert (fits.outcome, fits.minute_tokens, fits.day_tokens) == (ALLOWED, 1000, 1000)


def test_settle_with_reserved_tokens_changes_nothing(backend):
    async def scenario(limiter):
        reserved = await limiter.acquire(SCOPE, LIMITS, 600, T)
        await limiter.settle(reserved.reservation, 600)
        return await limiter.acquire(SCOPE, LIMITS, 1, T)

    after = _run(backend, scenario)
    assert (after.minute_tokens, after.day_tokens) == (601, 601)


def test_acquire_new_minute_resets_tokens_but_not_the_day(backend):
    async def scenario(limiter):
        await limiter.acquire(SCOPE, LIMITS, 1000, T)
        return await limiter.acquire(SCOPE, LIMITS, 1000, T + MINUTE)

    next_minute = _run(backend, scenario)
    assert (next_minute.outcome, next_minute.minute_tokens, next_minute.day_tokens) == (
        ALLOWED,
        1000,
        2000,
    )


# --- tokens per day --------------------------------------------------------------------


def test_acquire_over_tokens_per_day_is_quota_exceeded(backend):
    limits = _limits(tokens_per_minute=1000, tokens_per_day=1500)

    async def scenario(limiter):
        return [
            await limiter.acquire(SCOPE, limits, 1000, DAY_START + 3600.5),
            await limiter.acquire(SCOPE, limits, 501, DAY_START + 3660.5),
            await limiter.acquire(SCOPE, limits, 500, DAY_START + 3661.5),
        ]

    first, over, exact = _run(backend, scenario)
    assert first.outcome == ALLOWED
    assert (over.outcome, over.reason, over.limit_name) == (
        TPD,
        "quota_exceeded",
        "tokens_per_day",
    )
    assert (over.minute_tokens, over.day_tokens, over.reservation) == (0, 1000, None)
    assert over.retry_after == DAY - 3660  # 82_739.5 s to midnight UTC, rounded up
    assert (exact.outcome, exact.day_tokens) == (ALLOWED, 1500)


def test_acquire_new_day_resets_tokens_per_day(backend):
    limits = _limits(tokens_per_minute=1000, tokens_per_day=1000)

    async def scenario(limiter):
        return [
            await limiter.acquire(SCOPE, limits, 1000, DAY_START + DAY - 61),
            await limiter.acquire(SCOPE, limits, 1, DAY_START + DAY - 1),
            await limiter.acquire(SCOPE, limits, 1, DAY_START + DAY),
        ]

    first, same_day, next_day = _run(backend, scenario)
    assert [first.outcome, same_day.outcome, next_day.outcome] == [ALLOWED, TPD, ALLOWED]
    assert same_day.retry_after == 1
    assert next_day.day_tokens == 1


# --- retry after -----------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 7, 14_400_000])
def test_retry_after_is_seconds_to_end_of_minute(backend, k):
    now = 120.0 * k + 15.5

    async def scenario(limiter):
        limits = _limits(requests_per_minute=1)
        await limiter.acquire(SCOPE, limits, 1, now)
        return await limiter.acquire(SCOPE, limits, 1, now)

    refused = _run(backend, scenario)
    assert refused.outcome == RPM
    assert refused.retry_after == 45


@pytest.mark.parametrize(
    ("outcome", "now", "retry_after"),
    [
        (RPM, T, 45),
        (TPM, T, 45),
        (RPM, DAY_START, 60),  # at the first instant of a minute: the whole minute
        (RPM, DAY_START + 59.9, 1),  # a fraction of a second left: at least 1
        (RPM, DAY_START + 59, 1),
        (TPD, DAY_START, DAY),
        (TPD, DAY_START + DAY - 0.25, 1),
        (TPD, T, DAY - 15),
    ],
)
def test_retry_after_rounds_up_to_window_end(outcome, now, retry_after):
    result = LimitResult(outcome, LIMITS, 10, 0, 0, now, None)
    assert result.retry_after == retry_after


# --- headers ---------------------------------------------------------------------------


def test_headers_when_allowed(backend):
    async def scenario(limiter):
        for _ in range(2):
            await limiter.acquire(SCOPE, LIMITS, 100, T)
        return await limiter.acquire(SCOPE, LIMITS, 100, T)

    assert _run(backend, scenario).headers() == [
        (b"x-ratelimit-limit-requests", b"10"),
        (b"x-ratelimit-remaining-requests", b"7"),
        (b"x-ratelimit-reset-requests", b"45s"),
        (b"x-ratelimit-limit-tokens", b"1000"),
        (b"x-ratelimit-remaining-tokens", b"700"),
        (b"x-ratelimit-reset-tokens", b"45s"),
    ]


def test_headers_when_requests_refused_add_retry_after(backend):
    async def scenario(limiter):
        limits = _limits(requests_per_minute=1)
        await limiter.acquire(SCOPE, limits, 100, T)
        return await limiter.acquire(SCOPE, limits, 100, T)

    assert _run(backend, scenario).headers() == [
        (b"x-ratelimit-limit-requests", b"1"),
        (b"x-ratelimit-remaining-requests", b"0"),
        (b"x-ratelimit-reset-requests", b"45s"),
        (b"x-ratelimit-limit-tokens", b"1000"),
        (b"x-ratelimit-remaining-tokens", b"900"),
        (b"x-ratelimit-reset-tokens", b"45s"),
        (b"retry-after", b"45"),
    ]


def test_headers_when_tokens_refused_add_retry_after(backend):
    async def scenario(limiter):
        await limiter.acquire(SCOPE, LIMITS, 500, T)
        await limiter.acquire(SCOPE, LIMITS, 500, T)
        return await limiter.acquire(SCOPE, LIMITS, 1, T)

    assert _run(backend, scenario).headers() == [
        (b"x-ratelimit-limit-requests", b"10"),
        (b"x-ratelimit-remaining-requests", b"8"),
        (b"x-ratelimit-reset-requests", b"45s"),
        (b"x-ratelimit-limit-tokens", b"1000"),
        (b"x-ratelimit-remaining-tokens", b"0"),
        (b"x-ratelimit-reset-tokens", b"45s"),
        (b"retry-after", b"45"),
    ]


def test_headers_when_day_quota_refused_retry_after_end_of_day(backend):
    limits = _limits(tokens_per_minute=1000, tokens_per_day=1000)

    async def scenario(limiter):
        await limiter.acquire(SCOPE, limits, 1000, T)
        return await limiter.acquire(SCOPE, limits, 1, T + MINUTE)

    headers = dict(_run(backend, scenario).headers())
    assert headers[b"retry-after"] == str(DAY - 75).encode()
    assert headers[b"x-ratelimit-reset-requests"] == b"45s"


# --- Redis specifics -------------------------------------------------------------------


@needs_redis
def test_redis_every_key_written_has_a_ttl(redis_prefix):
    backend = Backend("redis", redis_prefix)

    async def scenario(limiter):
        for n in range(3):
            reserved = await limiter.acquire(SCOPE, LIMITS, 100, T + MINUTE * n)
            await limiter.settle(reserved.reservation, 50)
        await limiter.acquire("atlas-2:org_other", LIMITS, 100, T)

    _run(backend, scenario)
    ttls = _redis_ttls(redis_prefix)
    minute = int(T // MINUTE)
    day = int(T // DAY)
    assert sorted(ttls) == sorted(
        [
            f"{redis_prefix}{SCOPE}:m{minute}",
            f"{redis_prefix}{SCOPE}:m{minute + 1}",
            f"{redis_prefix}{SCOPE}:m{minute + 2}",
            f"{redis_prefix}{SCOPE}:d{day}",
            f"{redis_prefix}atlas-2:org_other:m{minute}",
            f"{redis_prefix}atlas-2:org_other:d{day}",
            f"{redis_prefix}marker",
        ]
    )
    for key, ttl in ttls.items():
        name = key.removeprefix(redis_prefix)
        limit = MARKER_TTL if name == "marker" else 2 * MINUTE if ":m" in name else DAY + MINUTE
        assert 0 < ttl <= limit, key


@needs_redis
def test_redis_settle_on_expired_window_creates_no_key(redis_prefix):
    backend = Backend("redis", redis_prefix)

    async def scenario(limiter):
        reserved = await limiter.acquire(SCOPE, LIMITS, 100, T)
        await limiter.client.delete(*(await limiter.client.keys(f"{redis_prefix}*")))
        await limiter.settle(reserved.reservation, 400)  # both windows gone (expired)
        # A reservation from a window that never existed in this store at all.
        await limiter.settle(Reservation(SCOPE, 1, 0, 100), 10)

    _run(backend, scenario)
    assert _redis_ttls(redis_prefix) == {}


@needs_redis
def test_redis_refused_acquire_writes_no_counter(redis_prefix):
    backend = Backend("redis", redis_prefix)

    async def scenario(limiter):
        return await limiter.acquire(
            SCOPE, _limits(tokens_per_day=1000, tokens_per_minute=1000), 1001, T
        )

    assert _run(backend, scenario).outcome == TPM
    assert list(_redis_ttls(redis_prefix)) == [f"{redis_prefix}marker"]


def test_redis_unreachable_raises_limiter_unavailable():
    async def main():
        client = redis.asyncio.from_url("redis://127.0.0.1:1", socket_connect_timeout=0.2)
        limiter = RedisLimiter(client, prefix="sgtest:dead:")
        try:
            with pytest.raises(LimiterUnavailable, match="rate limit store unreachable"):
                await limiter.acquire(SCOPE, LIMITS, 1, T)
        finally:
            await limiter.close()

    asyncio.run(main())


# --- the connection pool (issue 13, defect 4) ------------------------------------------


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


def _connected_clients(url: str) -> int:
    with redis.Redis.from_url(url) as client:
        return client.info("clients")["connected_clients"] - 1  # this one


def test_redis_callers_beyond_the_pool_wait_for_a_connection(private_redis):
    limits = _limits(requests_per_minute=1000, tokens_per_minute=100_000, tokens_per_day=100_000)

    async def main():
        client = redis_client(private_redis.url, max_connections=4, pool_timeout=5)
        limiter = RedisLimiter(client, prefix="sgtest:pool:")
        try:
            # 300 scopes: each caller needs a grant of its own from Redis.
            results = await asyncio.gather(
                *(limiter.acquire(f"{SCOPE}:{n}", limits, 1, T) for n in range(300))
            )
            return results, _connected_clients(private_redis.url)
        finally:
            await limiter.close()

    results, connections = asyncio.run(main())
    assert [(result.outcome, result.requests) for result in results] == [(ALLOWED, 1)] * 300
    assert connections <= 4


def test_redis_callers_under_sustained_load_wait_their_turn(private_redis):
    """redis-py's own waiting is not first come, first served: under sustained load
    a few callers starve past any timeout (256 callers on 8 connections: longest wait
    14 s). The limiter queues them in order, so within a 5 s pool timeout every one of
    256 callers, 40 grants each, gets its turn even on a busy machine (a fair queue's
    longest wait here is a fraction of a second; a starved caller would raise)."""
    limits = _limits(requests_per_minute=100_000, tokens_per_minute=100_000, tokens_per_day=100_000)

    async def main():
        client = redis_client(private_redis.url, max_connections=4, pool_timeout=5)
        limiter = RedisLimiter(client, prefix="sgtest:pool:", pool_timeout=5)

        async def caller(name):
            for n in range(40):
                # A scope never seen before: every call is a grant from Redis.
                result = await limiter.acquire(f"{SCOPE}:{name}:{n}", limits, 1, T)
                assert result.allowed
                sum(range(2000))  # a request's own work between two calls

        try:
            return await asyncio.gather(
                *(caller(name) for name in range(256)), return_exceptions=True
            )
        finally:
            await limiter.close()

    assert [outcome for outcome in asyncio.run(main()) if outcome is not None] == []


def test_redis_wait_for_a_connection_is_bounded(private_redis):
    async def main():
        client = redis_client(private_redis.url, max_connections=1, pool_timeout=0.2)
        limiter = RedisLimiter(client, prefix="sgtest:pool:", pool_timeout=0.2)
        try:
            await limiter.acquire(SCOPE, LIMITS, 1, T)
            # Redis stops answering, so the one connection stays busy with the first call
            # (other scopes: each needs a grant of its own).
            os.kill(private_redis.process.popen.pid, signal.SIGSTOP)
            try:
                first = asyncio.create_task(limiter.acquire(f"{SCOPE}:b", LIMITS, 1, T))
                await asyncio.sleep(0.05)
                started = time.monotonic()
                with pytest.raises(LimiterUnavailable, match="no Redis connection free within"):
                    await limiter.acquire(f"{SCOPE}:c", LIMITS, 1, T)
                waited = time.monotonic() - started
            finally:
                os.kill(private_redis.process.popen.pid, signal.SIGCONT)
            await asyncio.gather(first, return_exceptions=True)
            return waited, await limiter.acquire(SCOPE, LIMITS, 1, T)
        finally:
            await limiter.close()

    waited, after = asyncio.run(main())
    assert 0.2 <= waited < 0.5
    assert after.outcome == ALLOWED


def test_redis_restart_fails_no_call_on_a_dead_pooled_connection(private_redis):
    """After a restart every pooled connection is dead; each is retried once on a new
    one, so no call fails (the calls are refused as lost counters, see below)."""
    limits = _limits(requests_per_minute=1000, tokens_per_minute=100_000, tokens_per_day=100_000)

    async def main():
        client = redis_client(private_redis.url, max_connections=8, pool_timeout=2)
        limiter = RedisLimiter(client, prefix="sgtest:restart:")
        try:
            await asyncio.gather(
                *(limiter.acquire(f"{SCOPE}:{n}", limits, 1, T) for n in range(64))
            )
            pooled = _connected_clients(private_redis.url)
            await asyncio.to_thread(private_redis.restart)
            after = await asyncio.gather(  # scopes without a lease: each asks Redis
                *(limiter.acquire(f"{SCOPE}:new{n}", limits, 1, T + 1) for n in range(50)),
                return_exceptions=True,
            )
            later = await limiter.acquire(SCOPE, limits, 1, T + MINUTE)
            return pooled, after, later
        finally:
            await limiter.close()

    pooled, after, later = asyncio.run(main())
    assert pooled == 8  # every pooled connection was in use, so all eight died
    assert [getattr(result, "outcome", result) for result in after] == [RPM] * 50
    assert (later.outcome, later.requests) == (ALLOWED, 1)


def test_redis_settle_needs_no_redis_and_frees_budget_in_the_lease(private_redis):
    """Settling is local: with Redis gone a call still settles, and the tokens it did
    not use admit the next call from the lease, while a call needing a grant is
    refused (fail closed)."""
    limits = _limits(tokens_per_minute=10_000, tokens_per_day=10_000, max_tokens=500)

    async def main():
        client = redis_client(private_redis.url, max_connections=2, pool_timeout=1)
        limiter = RedisLimiter(client, prefix="sgtest:settle:")
        try:
            first = await limiter.acquire(SCOPE, limits, 8_000, T)  # leases 8,250 tokens
            await asyncio.to_thread(private_redis.process.stop)
            await limiter.settle(first.reservation, 100)  # 7,900 back to the lease
            from_lease = await limiter.acquire(SCOPE, limits, 8_000, T)
            with pytest.raises(LimiterUnavailable, match="rate limit store unreachable"):
                await limiter.acquire(SCOPE, limits, 500, T)
            return from_lease
        finally:
            await limiter.close()

    from_lease = asyncio.run(main())
    assert (from_lease.outcome, from_lease.minute_tokens) == (ALLOWED, 8_100)


@needs_redis
def test_redis_leases_across_workers_never_exceed_the_limits(redis_prefix):
    """Four workers, interleaved at random, each settling with random usage: the
    requests admitted in the minute never exceed requests_per_minute, the tokens in
    use never exceed tokens_per_minute, and once the workers stop and give their
    leases back the shared counters equal what was admitted and used."""
    limits = _limits(requests_per_minute=200, tokens_per_minute=20_000, tokens_per_day=50_000)
    rng = random.Random(15)

    async def main():
        workers = [
            RedisLimiter(redis.asyncio.from_url(REDIS_URL), prefix=redis_prefix) for _ in range(4)
        ]
        admitted, used = 0, 0
        try:
            for _ in range(400):
                worker = rng.choice(workers)
                tokens = rng.randint(1, 400)
                result = await worker.acquire(SCOPE, limits, tokens, T)
                if result.allowed:
                    admitted += 1
                    spent = rng.randint(0, tokens + 50)  # sometimes more than reserved
                    await worker.settle(result.reservation, spent)
                    used += spent
                    assert admitted <= 200
                    # Usage beyond a reservation (a prompt under-estimated) is counted at
                    # once, but a worker may spend what it was granted before it knew:
                    # at most one overrun per worker.
                    assert used <= 20_000 + 50 * 4
        finally:
            for worker in workers:
                await worker.close()
        return admitted, used

    admitted, used = asyncio.run(main())
    minute, day = int(T // MINUTE), int(T // DAY)
    with redis.Redis.from_url(REDIS_URL) as client:
        counters = client.hgetall(f"{redis_prefix}{SCOPE}:m{minute}")
        assert (int(counters[b"r"]), int(counters[b"t"])) == (admitted, used)
        assert int(client.get(f"{redis_prefix}{SCOPE}:d{day}")) == used
    assert admitted > 0


def test_redis_one_worker_decides_as_one_shared_counter(redis_prefix):
    """One worker's leases change no decision: the same random calls and settlements
    give the same outcomes and counts as the in-process limiter."""
    if not REDIS_URL:
        pytest.skip("REDIS_URL is not set: no Redis to test")
    limits = _limits(requests_per_minute=60, tokens_per_minute=25_000, tokens_per_day=70_000)
    rng = random.Random(7)
    calls = []
    for n in range(400):
        tokens = rng.randint(1, 1500)
        calls.append((tokens, rng.randint(0, tokens + 50), T + n * 0.5))

    async def replay(limiter):
        seen = []
        for tokens, spent, now in calls:
            result = await limiter.acquire(SCOPE, limits, tokens, now)
            seen.append((result.outcome, result.requests, result.minute_tokens, result.day_tokens))
            if result.allowed:
                await limiter.settle(result.reservation, spent)
        return seen

    local = _run(Backend("local"), replay)
    shared = _run(Backend("redis", redis_prefix), replay)
    assert shared == local
    assert {outcome for outcome, *_ in local} == {ALLOWED, RPM, TPM, TPD}


# --- lost counters (issue 13, defect 9) ------------------------------------------------

RPM_60 = _limits(requests_per_minute=60, tokens_per_minute=100_000, tokens_per_day=100_000)


def _flush(prefix: str) -> None:
    """What a Redis restart without persistence does to this test's keys."""
    with redis.Redis.from_url(REDIS_URL) as client:
        client.delete(*client.keys(f"{prefix}*"))


def _worker(prefix: str, lost: list[str], name: str) -> RedisLimiter:
    """A limiter as one worker process has it, noting when it notices lost counters."""
    return RedisLimiter(
        redis.asyncio.from_url(REDIS_URL),
        prefix=prefix,
        on_counters_lost=lambda: lost.append(name),
    )


async def _drain(limiter: RedisLimiter, scope: str, now: float) -> tuple[int, LimitResult]:
    """Acquire until refused: how many were admitted, and the refusal."""
    admitted = 0
    while (result := await limiter.acquire(scope, RPM_60, 1, now)).allowed:
        admitted += 1
    return admitted, result


@needs_redis
def test_redis_lost_counters_refuse_every_scope_for_the_rest_of_the_minute(redis_prefix):
    """After the loss a worker spends only what it was granted before it (counted then),
    and no worker is granted more in that minute, in any scope."""
    lost: list[str] = []

    async def main():
        worker, other = _worker(redis_prefix, lost, "worker"), _worker(redis_prefix, lost, "other")
        try:
            before = [await worker.acquire(SCOPE, RPM_60, 1, T) for _ in range(52)]
            leased = worker._leases[SCOPE].requests  # granted before the loss, unspent
            await other.acquire("atlas-2:org_b", RPM_60, 1, T)
            await asyncio.to_thread(_flush, redis_prefix)
            after = await _drain(worker, SCOPE, T + 1)
            other_scope = await _drain(other, "atlas-2:org_b", T + 30)
            newcomer = _worker(redis_prefix, lost, "newcomer")  # started after the loss
            try:
                new_worker = await newcomer.acquire(SCOPE, RPM_60, 1, T + 40)
            finally:
                await newcomer.close()
            next_minute = await worker.acquire(SCOPE, RPM_60, 1, T + MINUTE)
            return before, leased, after, other_scope, new_worker, next_minute
        finally:
            await worker.close()
            await other.close()

    before, leased, after, other_scope, new_worker, next_minute = asyncio.run(main())
    assert [result.outcome for result in before] == [ALLOWED] * 52
    admitted_after, refused = after
    # 52 admitted before the loss, then only what the lease held: the limit of 60 holds.
    assert admitted_after == leased and 52 + leased <= 60
    assert (refused.outcome, refused.requests, refused.reservation) == (RPM, 60, None)
    assert refused.retry_after == 44
    assert dict(refused.headers())[b"x-ratelimit-remaining-requests"] == b"0"
    assert other_scope[1].outcome == RPM and other_scope[0] < 60 - 1
    assert new_worker.outcome == RPM
    assert (next_minute.outcome, next_minute.requests) == (ALLOWED, 1)
    assert lost == ["worker"]


@needs_redis
def test_redis_lost_counters_are_noticed_after_a_new_worker_recreated_the_marker(redis_prefix):
    lost: list[str] = []

    async def main():
        old, new = _worker(redis_prefix, lost, "old"), _worker(redis_prefix, lost, "new")
        try:
            await old.acquire(SCOPE, RPM_60, 1, T)
            await asyncio.to_thread(_flush, redis_prefix)
            # The new worker has never seen the counters: to it this is a first start.
            first = await new.acquire(SCOPE, RPM_60, 1, T + 1)
            _, noticed = await _drain(old, SCOPE, T + 2)  # its next grant finds the loss
            _, then = await _drain(new, SCOPE, T + 3)  # and no grant follows it
            return first, noticed, then
        finally:
            await old.close()
            await new.close()

    first, noticed, then = asyncio.run(main())
    assert (first.outcome, noticed.outcome, then.outcome) == (ALLOWED, RPM, RPM)
    assert lost == ["old"]


@needs_redis
def test_redis_first_start_and_a_marker_expired_by_idleness_are_not_a_loss(redis_prefix):
    lost: list[str] = []

    async def main():
        first, second = _worker(redis_prefix, lost, "first"), _worker(redis_prefix, lost, "second")
        try:
            started = [
                await first.acquire(SCOPE, RPM_60, 1, T),
                await second.acquire(SCOPE, RPM_60, 1, T),
            ]
            # Nothing for longer than the marker lives: it expired, as every counter did.
            await asyncio.to_thread(_flush, redis_prefix)
            idle = await first.acquire(SCOPE, RPM_60, 1, T + MARKER_TTL + 1)
            return started, idle
        finally:
            await first.close()
            await second.close()

    started, idle = asyncio.run(main())
    assert [result.outcome for result in started] == [ALLOWED, ALLOWED]
    assert (idle.outcome, idle.requests) == (ALLOWED, 1)
    assert lost == []


def test_redis_restart_without_persistence_is_noticed_once(private_redis):
    lost: list[str] = []

    async def main():
        client = redis_client(private_redis.url, max_connections=8, pool_timeout=2)
        limiter = RedisLimiter(client, prefix="sg:rl:", on_counters_lost=lambda: lost.append(1))
        try:
            before = await asyncio.gather(
                *(limiter.acquire(f"{SCOPE}:{n % 4}", RPM_60, 1, T) for n in range(52))
            )
            await asyncio.to_thread(private_redis.restart)
            after = await asyncio.gather(  # scopes without a lease: each asks Redis
                *(limiter.acquire(f"{SCOPE}:new{n}", RPM_60, 1, T + 1) for n in range(20))
            )
            return before, after
        finally:
            await limiter.close()

    before, after = asyncio.run(main())
    assert sum(result.allowed for result in before) == 52
    assert [result.outcome for result in after] == [RPM] * 20
    assert lost == [1]


def test_redis_crash_with_appendonly_keeps_the_counters():
    """appendonly yes, appendfsync everysec (docs/operations.md): a killed redis-server
    comes back with every count it had acknowledged, so nothing is lost or refused."""
    server = RedisServer(appendonly=True)
    lost: list[str] = []

    async def main():
        client = redis_client(server.url, max_connections=8, pool_timeout=2)
        limiter = RedisLimiter(client, prefix="sg:rl:", on_counters_lost=lambda: lost.append(1))
        try:
            before = await asyncio.gather(
                *(limiter.acquire(SCOPE, RPM_60, 1, T) for _ in range(52))
            )
            # everysec may postpone writing the log while an fsync is running (a second
            # or two of writes is what docs/operations.md says a crash can cost): wait
            # until what was acknowledged is in the file, then kill.
            while True:
                info = await client.info("persistence")
                if info["aof_buffer_length"] == 0 and info["aof_pending_bio_fsync"] == 0:
                    break
                await asyncio.sleep(0.05)
            await asyncio.to_thread(server.restart, signal.SIGKILL)
            after = [await limiter.acquire(SCOPE, RPM_60, 1, T + 1) for _ in range(20)]
            return before, after
        finally:
            await limiter.close()

    try:
        before, after = asyncio.run(main())
    finally:
        server.stop()
    assert sum(result.allowed for result in before) == 52
    assert [result.outcome for result in after] == [ALLOWED] * 8 + [RPM] * 12
    assert after[7].requests == 60
    assert lost == []
