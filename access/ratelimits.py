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
# ARGV: rpm, tpm, tpd, requests needed (0 or 1), minute TTL, day TTL, the current
# minute, the marker id this worker last saw ('' if none within MARKER_TTL), an id for
# a new marker, MARKER_TTL, minute tokens needed, day tokens needed, the lease share
# (a lease takes at most 1/share of what remains), the most requests a lease may add.
# Counts the grant (what was needed plus a share of what remains) and returns
# {outcome, requests, minute tokens, day tokens, marker id, 1 if this call found the
# counters lost, requests granted, minute tokens granted, day tokens granted}.
LEASE_LUA = """
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
local rpm, tpm, tpd = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local r = tonumber(redis.call('HGET', KEYS[1], 'r') or '0')
local t = tonumber(redis.call('HGET', KEYS[1], 't') or '0')
local d = tonumber(redis.call('GET', KEYS[2]) or '0')
local need_r, need_t, need_d = tonumber(ARGV[4]), tonumber(ARGV[11]), tonumber(ARGV[12])
if lost == minute then return {1, rpm, t, d, id, found, 0, 0, 0} end
if r + need_r > rpm then return {1, r, t, d, id, found, 0, 0, 0} end
if t + need_t > tpm then return {2, r, t, d, id, found, 0, 0, 0} end
if d + need_d > tpd then return {3, r, t, d, id, found, 0, 0, 0} end
local share = tonumber(ARGV[13])
local extra_t = math.floor((tpm - t - need_t) / share)
local grant_r = need_r + math.min(tonumber(ARGV[14]), math.floor((rpm - r - need_r) / share))
local grant_t = need_t + extra_t
local grant_d = need_d + math.min(extra_t, math.floor((tpd - d - need_d) / share))
r = redis.call('HINCRBY', KEYS[1], 'r', grant_r)
t = redis.call('HINCRBY', KEYS[1], 't', grant_t)
redis.call('EXPIRE', KEYS[1], ARGV[5])
d = redis.call('INCRBY', KEYS[2], grant_d)
redis.call('EXPIRE', KEYS[2], ARGV[6])
return {0, r, t, d, id, found, grant_r, grant_t, grant_d}
"""

# Give back what leases hold beyond need (or owe: negative numbers). Two keys per lease,
# the minute hash and the day counter it was granted from, and three numbers: requests,
# minute tokens, day tokens, subtracted only from windows that still exist, so no key
# lives without a TTL.
RETURN_LUA = """
for i = 1, #KEYS / 2 do
  local minute_key, day_key = KEYS[2 * i - 1], KEYS[2 * i]
  local requests = tonumber(ARGV[3 * i - 2])
  local minute_tokens, day_tokens = tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i])
  if redis.call('EXISTS', minute_key) == 1 then
    if requests ~= 0 then redis.call('HINCRBY', minute_key, 'r', -requests) end
    if minute_tokens ~= 0 then redis.call('HINCRBY', minute_key, 't', -minute_tokens) end
  end
  if day_tokens ~= 0 and redis.call('EXISTS', day_key) == 1 then
    redis.call('INCRBY', day_key, -day_tokens)
  end
end
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


# A lease takes at most this share of what remains in a window (1/8), and at most this
# many requests: near a limit leases shrink to exactly what one request needs.
LEASE_SHARE = 8
LEASE_MAX_REQUESTS = 64
# How often a worker gives back the tokens its leases hold beyond one grant's worth
# (settled reservations return tokens to the lease that reserved them).
LEASE_RETURN_INTERVAL = 1.0


@dataclass(slots=True)
class _Lease:
    """What one worker may still spend in one scope's windows without asking Redis:
    requests and tokens granted to it and counted there, less what it spent. Token
    counts go negative when calls used more than they reserved (owed at the next grant
    or return)."""

    scope: str
    minute: int
    day: int
    limits: tuple[int, int, int]
    requests: int = 0
    tokens: int = 0
    day_tokens: int = 0
    # Redis's counters after this worker's last grant (what the headers report from).
    counted: tuple[int, int, int] = (0, 0, 0)
    # Tokens kept back from a return: the size of the last grant.
    keep_tokens: int = 0
    keep_day_tokens: int = 0


def _spend(lease: _Lease, limits: TierLimits, tokens: int, now: float) -> LimitResult:
    """Admit one request of ``tokens`` from the lease (the caller checked it holds them)."""
    lease.requests -= 1
    lease.tokens -= tokens
    lease.day_tokens -= tokens
    requests, minute_tokens, day_tokens = lease.counted
    return LimitResult(
        ALLOWED,
        limits,
        requests - lease.requests,
        minute_tokens - lease.tokens,
        day_tokens - lease.day_tokens,
        now,
        Reservation(lease.scope, lease.minute, lease.day, tokens),
    )


class RedisLimiter:
    """Limits shared by every worker through quota leases counted in Redis.

    A request is admitted from this worker's lease for its scope when the lease holds
    a request and the tokens it reserves; otherwise one atomic script checks the shared
    windows and grants a new lease: what the request needs plus 1/LEASE_SHARE of what
    remains (at most LEASE_MAX_REQUESTS requests). Grants are counted in Redis before
    they are spent, so the sum over workers never exceeds a limit. Settling a call is
    local (its unused tokens go back to the lease), and once a second the tokens leases
    hold beyond one grant go back to Redis for every worker to use.

    Accuracy: with one worker every decision is the one a single counter would make.
    With several, a request may be refused while another worker still holds granted,
    unspent budget: at most one grant per worker (1/LEASE_SHARE of what remained when
    it was taken), plus up to LEASE_RETURN_INTERVAL of settled tokens. A killed worker's
    unspent lease is lost until its window ends (a graceful stop gives it back).

    At most as many scripts run at once as the client's pool has connections; other
    callers wait in arrival order, up to ``pool_timeout`` seconds, then get
    LimiterUnavailable. Callers in one worker needing a grant for the same scope wait
    for the one grant in flight, then spend from it. ``on_counters_lost`` is called when
    this worker is the one that noticed the counters were lost."""

    def __init__(
        self,
        client,
        *,
        prefix: str = "sg:rl:",
        pool_timeout: float = 2.0,
        on_counters_lost: Callable[[], object] = _nothing,
        return_interval: float = LEASE_RETURN_INTERVAL,
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
        self._lease_script = client.register_script(LEASE_LUA)
        self._return_script = client.register_script(RETURN_LUA)
        self._marker_key = f"{prefix}marker"
        self._new_marker_id = uuid.uuid4().hex  # the script appends the minute
        self._marker_id: bytes = b""
        self._marker_seen = -math.inf
        self._on_counters_lost = on_counters_lost
        self._leases: dict[str, _Lease] = {}
        self._retired: list[_Lease] = []  # replaced leases, to give back whole
        self._granting: dict[str, asyncio.Future] = {}
        self._return_interval = return_interval
        self._returner: asyncio.Task | None = None
        self._now = 0.0  # the latest time a caller asked at (the windows returns go to)

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

    def _lease(self, scope: str, limits: TierLimits, minute: int, day: int) -> _Lease:
        """The scope's lease for these windows and limits: a new, empty one when the
        minute or the limits changed (the day's tokens carry into a new minute of the
        same day; a lease replaced for new limits or a new day is given back whole). A
        caller that waited into a newer minute spends from the newer lease."""
        key = (limits.requests_per_minute, limits.tokens_per_minute, limits.tokens_per_day)
        lease = self._leases.get(scope)
        if lease is not None and lease.minute >= minute and lease.limits == key:
            return lease
        fresh = _Lease(scope, minute, day, key)
        if lease is not None:
            if lease.limits == key and lease.day == day:
                fresh.day_tokens = lease.day_tokens
                fresh.keep_day_tokens = lease.keep_day_tokens
                fresh.counted = (0, 0, lease.counted[2])
            else:
                self._retired.append(lease)
        self._leases[scope] = fresh
        if self._returner is None:
            self._returner = asyncio.get_running_loop().create_task(self._return_loop())
        return fresh

    async def acquire(self, scope: str, limits: TierLimits, tokens: int, now: float) -> LimitResult:
        minute, day = _windows(now)
        if now > self._now:
            self._now = now
        while True:
            lease = self._lease(scope, limits, minute, day)
            if lease.requests >= 1 and lease.tokens >= tokens and lease.day_tokens >= tokens:
                return _spend(lease, limits, tokens, now)
            pending = self._granting.get(scope)
            if pending is not None:  # another caller is asking: spend from its grant, or ask
                await pending
                continue
            done = asyncio.get_running_loop().create_future()
            self._granting[scope] = done
            try:
                outcome, counted = await self._grant(lease, limits, tokens, now)
            finally:
                del self._granting[scope]
                done.set_result(None)
            if outcome == ALLOWED:
                continue  # spend from the grant (asked again if the lease was replaced)
            requests, minute_tokens, day_tokens = counted
            return LimitResult(
                outcome,
                limits,
                requests - lease.requests,
                minute_tokens - lease.tokens,
                day_tokens - lease.day_tokens,
                now,
                None,
            )

    async def _grant(self, lease: _Lease, limits: TierLimits, tokens: int, now: float):
        """Ask Redis for what ``lease`` lacks for one request of ``tokens``, plus a share
        of what remains; add the grant to the scope's lease. Returns the outcome and
        Redis's counters after it."""
        scope, minute, day = lease.scope, lease.minute, lease.day
        known = self._marker_id if now - self._marker_seen < MARKER_TTL else b""
        need_requests = 1 if lease.requests < 1 else 0
        need_tokens = max(0, tokens - lease.tokens)
        need_day = max(0, tokens - lease.day_tokens)
        result = await self._run(
            self._lease_script,
            keys=[*_keys(self.prefix, scope, minute, day), self._marker_key],
            args=[
                limits.requests_per_minute,
                limits.tokens_per_minute,
                limits.tokens_per_day,
                need_requests,
                MINUTE * 2,
                DAY + MINUTE,
                minute,
                known,
                self._new_marker_id,
                MARKER_TTL,
                need_tokens,
                need_day,
                LEASE_SHARE,
                LEASE_MAX_REQUESTS,
            ],
        )
        outcome, requests, minute_tokens, day_tokens, marker_id, found, *granted = result
        self._marker_id, self._marker_seen = marker_id, now
        if found:
            self._on_counters_lost()
            log.warning(
                "the rate-limit counters in Redis were lost (restarted without persistence,"
                " flushed or failed over): refusing every request until the end of this minute"
            )
        counted = (requests, minute_tokens, day_tokens)
        if outcome == ALLOWED:
            if self._leases.get(scope) is lease:
                grant_requests, grant_tokens, grant_day = granted
                lease.requests += grant_requests
                lease.tokens += grant_tokens
                lease.day_tokens += grant_day
                lease.counted = counted
                lease.keep_tokens, lease.keep_day_tokens = grant_tokens, grant_day
            else:  # the lease was replaced while Redis answered: give the grant back whole
                self._retired.append(_Lease(scope, minute, day, lease.limits, *granted))
        return outcome, counted

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """The tokens a call reserved and did not use go back to the lease they came
        from, without Redis. Tokens used beyond the reservation are taken from the lease,
        and what it cannot cover is counted in Redis at once (raises LimiterUnavailable
        if it cannot be: the overrun is then not counted)."""
        delta = reservation.tokens - used_tokens
        lease = self._leases.get(reservation.scope)
        if not delta or lease is None:
            return
        if lease.minute == reservation.minute:
            lease.tokens += delta
        if lease.day == reservation.day:
            lease.day_tokens += delta
        if lease.tokens < 0 or lease.day_tokens < 0:  # owed: count it now, for every worker
            owed_tokens, owed_day = min(0, lease.tokens), min(0, lease.day_tokens)
            lease.tokens -= owed_tokens
            lease.day_tokens -= owed_day
            requests, minute_tokens, day_tokens = lease.counted
            lease.counted = (requests, minute_tokens - owed_tokens, day_tokens - owed_day)
            await self._run(
                self._return_script,
                keys=_keys(self.prefix, lease.scope, lease.minute, lease.day),
                args=[0, owed_tokens, owed_day],
            )

    async def give_back(self, everything: bool = False) -> None:
        """Return to Redis the tokens leases hold beyond one grant's worth (with
        ``everything``, all they hold, requests too), and settle what they owe, in one
        script call. Raises LimiterUnavailable; what was being returned is then lost
        until its window ends (refusing early, never admitting more)."""
        minute, day = _windows(self._now)
        returns = [(old, old.requests, old.tokens, old.day_tokens) for old in self._retired]
        self._retired = []
        for scope, lease in list(self._leases.items()):
            if lease.day < day:  # nothing it holds counts any more
                del self._leases[scope]
                continue
            current = lease.minute >= minute
            returns.append(
                (
                    lease,
                    lease.requests if everything and current else 0,
                    _excess(lease.tokens, 0 if everything else lease.keep_tokens) if current else 0,
                    _excess(lease.day_tokens, 0 if everything else lease.keep_day_tokens),
                )
            )
        keys, args = [], []
        for lease, requests, tokens, day_tokens in returns:
            if not (requests or tokens or day_tokens):
                continue
            lease.requests -= requests
            lease.tokens -= tokens
            lease.day_tokens -= day_tokens
            counted = lease.counted
            lease.counted = (counted[0] - requests, counted[1] - tokens, counted[2] - day_tokens)
            keys += _keys(self.prefix, lease.scope, lease.minute, lease.day)
            args += [requests, tokens, day_tokens]
        if keys:
            await self._run(self._return_script, keys=keys, args=args)

    async def _return_loop(self) -> None:
        while True:
            await asyncio.sleep(self._return_interval)
            try:
                await self.give_back()
            except LimiterUnavailable as exc:
                log.warning("could not give unused rate-limit leases back: %s", exc)

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
        """Give every lease back (a graceful stop wastes nothing), then disconnect."""
        if self._returner is not None:
            self._returner.cancel()
            self._returner = None
        try:
            await self.give_back(everything=True)
        except LimiterUnavailable as exc:
            log.warning("could not give rate-limit leases back on close: %s", exc)
        await self.client.aclose()


def _excess(held: int, keep: int) -> int:
    """What a lease holding ``held`` tokens gives back keeping ``keep``: the surplus, or
    all it owes when negative."""
    if held > keep:
        return held - keep
    return held if held < 0 else 0


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
