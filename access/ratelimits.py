"""Rate limits and quotas: requests per minute, tokens per minute, tokens per day.

Counted per (release, organization) in fixed windows: the current UTC minute and
the current UTC day. Tokens are reserved before the call (the prompt estimate plus
the completion limit) and settled with the real usage afterwards, so parallel and
streaming calls cannot overrun a token limit while their usage is unknown.

Two interchangeable backends with the same arithmetic:

- ``RedisLimiter``: one Lua script checks every window and reserves in one atomic
  step, shared by all workers; every key it writes has a TTL. If Redis cannot be
  reached the check raises ``LimiterUnavailable`` and the proxy refuses (fail closed).
  A caller finding every pooled connection busy waits its turn, first come first
  served, for a bounded time rather than failing; a command on a dead connection
  (after a Redis restart every pooled one is dead) is retried once (``redis_client``).
- ``LocalLimiter``: the same in process, for the embedded single-process mode.

A fixed window admits up to twice a per-minute limit across a window boundary
(the end of one minute and the start of the next); documented in docs/policies.md.

Lost counters (Redis restarted without persistence, flushed, or failed over to an
empty replica) are noticed through a marker key every check refreshes: a worker
that saw the marker and finds it gone knows the counters went with it. The rest of
that minute is then refused for every scope (fail closed: the minute's earlier
requests are unknown, so none of its budget can be shown to remain); the next
minute counts afresh. The day's token counter cannot be rebuilt and starts again
from the loss. docs/operations.md says what a restart costs and how to avoid it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from rollout.plan_schema import TierLimits

log = logging.getLogger(__name__)

MINUTE = 60
DAY = 86_400
# The marker outlives every counter (a day's lives DAY + MINUTE): if nothing refreshed
# it for this long, every counter it vouched for has expired too, so nothing was lost.
MARKER_TTL = 2 * DAY

ALLOWED, RPM, TPM, TPD = 0, 1, 2, 3
LIMIT_NAMES = {RPM: "requests_per_minute", TPM: "tokens_per_minute", TPD: "tokens_per_day"}


class LimiterUnavailable(Exception):
    """The shared counters cannot be reached; the caller must refuse."""


@dataclass(frozen=True, slots=True)
class Reservation:
    scope: str
    minute: int
    day: int
    tokens: int


@dataclass(frozen=True, slots=True)
class LimitResult:
    outcome: int  # ALLOWED, RPM, TPM or TPD
    limits: TierLimits
    requests: int  # requests counted in this minute, this one included if allowed
    minute_tokens: int
    day_tokens: int
    now: float
    reservation: Reservation | None

    @property
    def allowed(self) -> bool:
        return self.outcome == ALLOWED

    @property
    def reason(self) -> str:
        return (
            "ok"
            if self.outcome == ALLOWED
            else ("quota_exceeded" if self.outcome == TPD else "rate_limited")
        )

    @property
    def limit_name(self) -> str | None:
        return LIMIT_NAMES.get(self.outcome)

    @property
    def retry_after(self) -> int:
        """Whole seconds until the window that refused this request ends."""
        period = DAY if self.outcome == TPD else MINUTE
        return max(1, math.ceil(period - self.now % period))

    def headers(self) -> list[tuple[bytes, bytes]]:
        """OpenAI-style x-ratelimit-* headers (and Retry-After when refused)."""
        limits = self.limits
        minute_reset = f"{max(1, math.ceil(MINUTE - self.now % MINUTE))}s".encode()
        headers = [
            (b"x-ratelimit-limit-requests", str(limits.requests_per_minute).encode()),
            (
                b"x-ratelimit-remaining-requests",
                str(max(0, limits.requests_per_minute - self.requests)).encode(),
            ),
            (b"x-ratelimit-reset-requests", minute_reset),
            (b"x-ratelimit-limit-tokens", str(limits.tokens_per_minute).encode()),
            (
                b"x-ratelimit-remaining-tokens",
                str(max(0, limits.tokens_per_minute - self.minute_tokens)).encode(),
            ),
            (b"x-ratelimit-reset-tokens", minute_reset),
        ]
        if not self.allowed:
            headers.append((b"retry-after", str(self.retry_after).encode()))
        return headers


def _windows(now: float) -> tuple[int, int]:
    return int(now // MINUTE), int(now // DAY)


def _outcome(limits: TierLimits, requests: int, minute_tokens: int, day_tokens: int, tokens: int):
    if requests + 1 > limits.requests_per_minute:
        return RPM
    if minute_tokens + tokens > limits.tokens_per_minute:
        return TPM
    if day_tokens + tokens > limits.tokens_per_day:
        return TPD
    return ALLOWED


# KEYS[1]: the minute hash {r: requests, t: tokens}; KEYS[2]: the day's token counter;
# KEYS[3]: the marker {id, lost: the minute the counters were lost in, or -1}.
# ARGV: rpm, tpm, tpd, tokens to reserve, minute TTL, day TTL, the current minute,
# the marker id this worker last saw ('' if none within MARKER_TTL), an id for a new
# marker, MARKER_TTL.
# Returns {outcome, requests, minute tokens, day tokens, marker id, 1 if this call
# found the counters lost} after the reservation.
ACQUIRE_LUA = """
local minute = tonumber(ARGV[7])
local known = ARGV[8]
local id = redis.call('HGET', KEYS[3], 'id')
local lost = tonumber(redis.call('HGET', KEYS[3], 'lost') or '-1')
local found = 0
if not id then
  -- A worker that saw the marker within its TTL finds it gone: the counters are gone.
  -- A worker that never saw one finds a first start (nothing was counted before).
  id = ARGV[9] .. ':' .. ARGV[7]
  if known ~= '' then lost = minute; found = 1 else lost = -1 end
  redis.call('HSET', KEYS[3], 'id', id, 'lost', lost)
elseif known ~= '' and id ~= known and lost < 0 then
  -- A worker that never saw the old counters recreated the marker as a first start.
  lost = minute; found = 1
  redis.call('HSET', KEYS[3], 'lost', lost)
end
redis.call('EXPIRE', KEYS[3], ARGV[10])
local r = tonumber(redis.call('HGET', KEYS[1], 'r') or '0')
local t = tonumber(redis.call('HGET', KEYS[1], 't') or '0')
local d = tonumber(redis.call('GET', KEYS[2]) or '0')
local tokens = tonumber(ARGV[4])
if lost == minute then return {1, tonumber(ARGV[1]), t, d, id, found} end
if r + 1 > tonumber(ARGV[1]) then return {1, r, t, d, id, found} end
if t + tokens > tonumber(ARGV[2]) then return {2, r, t, d, id, found} end
if d + tokens > tonumber(ARGV[3]) then return {3, r, t, d, id, found} end
r = redis.call('HINCRBY', KEYS[1], 'r', 1)
t = redis.call('HINCRBY', KEYS[1], 't', tokens)
redis.call('EXPIRE', KEYS[1], ARGV[5])
d = redis.call('INCRBY', KEYS[2], tokens)
redis.call('EXPIRE', KEYS[2], ARGV[6])
return {0, r, t, d, id, found}
"""

# Settle a reservation with the real usage: add ARGV[1] (may be negative) to the
# windows it was taken from, only if they still exist, so no key lives without a TTL.
SETTLE_LUA = """
local delta = tonumber(ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HINCRBY', KEYS[1], 't', delta) end
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('INCRBY', KEYS[2], delta) end
return 1
"""


def _keys(prefix: str, scope: str, minute: int, day: int) -> list[str]:
    return [f"{prefix}{scope}:m{minute}", f"{prefix}{scope}:d{day}"]


# A pooled connection unused this long is pinged before use, so one that died quietly
# (a restart, an idle timeout in between) is replaced before a request depends on it.
HEALTH_CHECK_INTERVAL = 10


def redis_client(
    url: str,
    *,
    max_connections: int,
    pool_timeout: float,
    socket_timeout: float = 0.5,
) -> redis.asyncio.Redis:
    """The limiter's client: at most ``max_connections`` connections; a caller finding
    all busy waits up to ``pool_timeout`` seconds for one (then ConnectionError), and a
    command on a dead connection is retried once on a fresh one. (``RedisLimiter``
    queues its callers fairly in front of this pool, so the pool never waits itself.)

    Only connection errors are retried: a script that timed out may have run, and
    running it again would count a request, or refund tokens, twice. EVALSHA's
    NOSCRIPT after a restart is answered by redis-py's Script, which loads the script
    and runs it again."""
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        retry=Retry(ExponentialWithJitterBackoff(cap=0.05, base=0.005), 1, (RedisConnectionError,)),
        health_check_interval=HEALTH_CHECK_INTERVAL,
    )
    return redis.asyncio.Redis.from_pool(pool)


def _nothing() -> None:
    return None


class RedisLimiter:
    """Limits shared by every worker, one atomic script per check.

    At most as many scripts run at once as the client's pool has connections; other
    callers wait in arrival order, up to ``pool_timeout`` seconds, then get
    LimiterUnavailable. ``on_counters_lost`` is called when this worker is the one
    that noticed the counters were lost."""

    def __init__(
        self,
        client,
        *,
        prefix: str = "sg:rl:",
        pool_timeout: float = 2.0,
        on_counters_lost: Callable[[], object] = _nothing,
    ) -> None:
        self.client = client  # a redis.asyncio.Redis
        self.prefix = prefix
        # redis-py's BlockingConnectionPool is not first come, first served: a waiter it
        # wakes goes back to the end of the queue when a newcomer took the connection
        # first, so under sustained load a few callers starve until the timeout (256
        # tasks on 8 connections: p99 wait 0.1 ms, longest 14 s). A semaphore as wide
        # as the pool queues callers in arrival order instead (longest wait 0.15 s).
        self._turns = asyncio.Semaphore(client.connection_pool.max_connections)
        self._pool_timeout = pool_timeout
        self._acquire = client.register_script(ACQUIRE_LUA)
        self._settle = client.register_script(SETTLE_LUA)
        self._marker_key = f"{prefix}marker"
        self._new_marker_id = uuid.uuid4().hex  # the script appends the minute
        self._marker_id: bytes = b""
        self._marker_seen = -math.inf
        self._on_counters_lost = on_counters_lost

    @classmethod
    def from_settings(cls) -> RedisLimiter:
        from django.conf import settings

        from monitoring import metrics

        return cls(
            redis_client(
                settings.REDIS_URL,
                max_connections=settings.STAGEGATE_REDIS_MAX_CONNECTIONS,
                pool_timeout=settings.STAGEGATE_REDIS_POOL_TIMEOUT,
            ),
            pool_timeout=settings.STAGEGATE_REDIS_POOL_TIMEOUT,
            on_counters_lost=metrics.LIMIT_COUNTERS_LOST.inc,
        )

    async def acquire(self, scope: str, limits: TierLimits, tokens: int, now: float) -> LimitResult:
        minute, day = _windows(now)
        known = self._marker_id if now - self._marker_seen < MARKER_TTL else b""
        outcome, requests, minute_tokens, day_tokens, marker_id, found = await self._run(
            self._acquire,
            keys=[*_keys(self.prefix, scope, minute, day), self._marker_key],
            args=[
                limits.requests_per_minute,
                limits.tokens_per_minute,
                limits.tokens_per_day,
                tokens,
                MINUTE * 2,
                DAY + MINUTE,
                minute,
                known,
                self._new_marker_id,
                MARKER_TTL,
            ],
        )
        self._marker_id, self._marker_seen = marker_id, now
        if found:
            self._on_counters_lost()
            log.warning(
                "the rate-limit counters in Redis were lost (restarted without persistence,"
                " flushed or failed over): refusing every request until the end of this minute"
            )
        reservation = Reservation(scope, minute, day, tokens) if outcome == ALLOWED else None
        return LimitResult(outcome, limits, requests, minute_tokens, day_tokens, now, reservation)

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """Raises LimiterUnavailable when Redis cannot be reached; the reservation then
        stands, as reserved, until its window ends (the proxy counts it)."""
        delta = used_tokens - reservation.tokens
        if delta:
            await self._run(
                self._settle,
                keys=_keys(self.prefix, reservation.scope, reservation.minute, reservation.day),
                args=[delta],
            )

    async def _run(self, script, *, keys: list[str], args: list):
        """Run ``script`` when a connection is this caller's turn; LimiterUnavailable if
        none comes within the pool timeout or Redis fails."""
        try:
            async with asyncio.timeout(self._pool_timeout):
                await self._turns.acquire()
        except TimeoutError:
            raise LimiterUnavailable(
                f"rate limit store busy: no Redis connection free within {self._pool_timeout} s"
            ) from None
        try:
            return await script(keys=keys, args=args)
        except Exception as exc:  # connection refused, timeout, READONLY, ...
            raise LimiterUnavailable(f"rate limit store unreachable: {exc}") from exc
        finally:
            self._turns.release()

    async def close(self) -> None:
        await self.client.aclose()


class LocalLimiter:
    """The same limits in process (embedded mode: one worker process)."""

    def __init__(self) -> None:
        self._minutes: dict[tuple[str, int], list[int]] = {}  # -> [requests, tokens]
        self._days: dict[tuple[str, int], int] = {}
        self._current_minute = 0

    async def acquire(self, scope: str, limits: TierLimits, tokens: int, now: float) -> LimitResult:
        # No await between read and write: atomic on the event loop.
        minute, day = _windows(now)
        if minute != self._current_minute:
            self._expire(minute, day)
        counts = self._minutes.get((scope, minute)) or [0, 0]
        day_tokens = self._days.get((scope, day), 0)
        outcome = _outcome(limits, counts[0], counts[1], day_tokens, tokens)
        if outcome != ALLOWED:
            return LimitResult(outcome, limits, counts[0], counts[1], day_tokens, now, None)
        counts = [counts[0] + 1, counts[1] + tokens]
        self._minutes[(scope, minute)] = counts
        self._days[(scope, day)] = day_tokens + tokens
        return LimitResult(
            ALLOWED,
            limits,
            counts[0],
            counts[1],
            day_tokens + tokens,
            now,
            Reservation(scope, minute, day, tokens),
        )

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        delta = used_tokens - reservation.tokens
        counts = self._minutes.get((reservation.scope, reservation.minute))
        if counts is not None:
            counts[1] += delta
        day_key = (reservation.scope, reservation.day)
        if day_key in self._days:
            self._days[day_key] += delta

    def _expire(self, minute: int, day: int) -> None:
        self._current_minute = minute
        self._minutes = {k: v for k, v in self._minutes.items() if k[1] >= minute - 1}
        self._days = {k: v for k, v in self._days.items() if k[1] >= day - 1}

    async def close(self) -> None:
        return None
