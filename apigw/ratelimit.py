"""Rate limiting: one decision per request, in process or shared through Redis.

Both limiters compute at check time from a small per-bucket state (window
index, count in it, count in the previous one): no per-key timers. Only
admitted requests are counted, so a flood of 429s cannot eat the next window.
"""

import hashlib
import math

import attr
from twisted.internet import defer
from twisted.logger import Logger

ALGORITHMS = ("fixed_window", "sliding_window")


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int  # seconds until the current window ends, >= 1
    retry_after_s: int  # 0 when allowed


class LimiterUnavailable(Exception):
    """The shared counter store could not decide in time."""


def bucket_for(service_name, consumer_id, client_ip):
    """Per key per service; per client IP where there is no key (auth: false)."""
    if consumer_id is not None:
        return f"{service_name}:k:{consumer_id}"
    return f"{service_name}:ip:{client_ip}"


def rate_limit_headers(decision, period_s):
    """Both header families (IETF draft and GitHub style), same values."""
    limit = b"%d" % decision.limit
    remaining = b"%d" % decision.remaining
    reset = b"%d" % decision.reset_s
    headers = [
        (b"RateLimit-Limit", limit),
        (b"RateLimit-Remaining", remaining),
        (b"RateLimit-Reset", reset),
        (b"RateLimit-Policy", b"%d;w=%d" % (decision.limit, max(1, round(period_s)))),
        (b"X-RateLimit-Limit", limit),
        (b"X-RateLimit-Remaining", remaining),
        (b"X-RateLimit-Reset", reset),
    ]
    if not decision.allowed:
        headers.append((b"Retry-After", b"%d" % decision.retry_after_s))
    return headers


def _period_ms(period_s):
    return max(1, round(period_s * 1000))


def _decision(limit, allowed, remaining, reset_ms, retry_ms):
    return Decision(
        allowed=bool(allowed),
        limit=limit,
        remaining=max(0, int(remaining)),
        reset_s=max(1, math.ceil(reset_ms / 1000)),
        retry_after_s=0 if allowed else max(1, math.ceil(retry_ms / 1000)),
    )


def decide(state, now_ms, limit, period_ms, sliding):
    """The algorithm both limiters share (the Lua script below mirrors it).

    `state` is (window, count, previous count) or None. Integer arithmetic
    scaled by period_ms keeps Python and Lua bit-for-bit alike. Returns the new
    state and (allowed, remaining, reset_ms, retry_ms).
    """
    window = now_ms // period_ms
    elapsed = now_ms - window * period_ms
    reset = period_ms - elapsed
    w, c, p = state if state is not None else (None, 0, 0)
    if w != window:
        p = c if sliding and w == window - 1 else 0
        c = 0
    # The previous window counts in proportion to how much of it still lies
    # inside the sliding period.
    budget = limit * period_ms - (p * (period_ms - elapsed) if sliding else 0)
    if (c + 1) * period_ms <= budget:
        c += 1
        return (window, c, p), (True, (budget - c * period_ms) // period_ms, reset, 0)
    retry = reset
    if sliding and c + 1 <= limit:
        # p > 0 here: wait until enough of the previous window has slid out.
        retry = reset - (limit - c - 1) * period_ms // p
    elif sliding and limit > 0:
        # Next window: this one becomes the weighted previous.
        retry = reset + max(0, period_ms - (limit - 1) * period_ms // c)
    return (window, c, p), (False, (budget - c * period_ms) // period_ms, reset, retry)


class MemoryLimiter:
    """Counters in this process: the embedded default without REDIS_URL."""

    sweep_interval_s = 60.0

    def __init__(self, algorithm, clock):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown rate limit algorithm {algorithm!r}")
        self._sliding = algorithm == "sliding_window"
        self._clock = clock
        self._buckets = {}  # bucket -> (state, expires_ms)
        self._next_sweep_ms = 0

    def start(self):
        pass

    def stop(self):
        self._buckets.clear()
        return defer.succeed(None)

    def ping(self):
        return defer.succeed(True)

    def check(self, bucket, limit, period_s):
        now_ms = round(self._clock.seconds() * 1000)
        self._sweep(now_ms)
        period_ms = _period_ms(period_s)
        entry = self._buckets.get(bucket)
        state, outcome = decide(
            entry[0] if entry else None, now_ms, limit, period_ms, self._sliding
        )
        if outcome[0]:
            # A sliding window's count still matters during the next window.
            lifetime = (state[0] + (2 if self._sliding else 1)) * period_ms
            self._buckets[bucket] = (state, lifetime)
        return defer.succeed(_decision(limit, *outcome))

    def _sweep(self, now_ms):
        # Amortised cleanup instead of a timer per bucket.
        if now_ms < self._next_sweep_ms:
            return
        self._next_sweep_ms = now_ms + self.sweep_interval_s * 1000
        for bucket in [b for b, (_, expires) in self._buckets.items() if expires <= now_ms]:
            del self._buckets[bucket]


# KEYS[1]: the bucket's hash. ARGV: limit, period in ms, "1" for sliding.
# Redis TIME, not the caller's clock, so every gateway process sees the same
# windows. Mirrors decide() above.
LUA_CHECK = """
local limit = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local sliding = ARGV[3] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = math.floor(now / period)
local elapsed = now - window * period
local reset = period - elapsed
local state = redis.call('HMGET', KEYS[1], 'w', 'c', 'p')
local w = tonumber(state[1])
local c = tonumber(state[2]) or 0
local p = tonumber(state[3]) or 0
if w ~= window then
  if sliding and w == window - 1 then p = c else p = 0 end
  c = 0
end
local budget = limit * period
if sliding then budget = budget - p * (period - elapsed) end
if (c + 1) * period <= budget then
  c = c + 1
  redis.call('HSET', KEYS[1], 'w', window, 'c', c, 'p', p)
  if sliding then
    redis.call('PEXPIRE', KEYS[1], reset + period)
  else
    redis.call('PEXPIRE', KEYS[1], reset)
  end
  return {1, math.floor((budget - c * period) / period), reset, 0}
end
local retry = reset
if sliding and c + 1 <= limit then
  retry = reset - math.floor((limit - c - 1) * period / p)
elseif sliding and limit > 0 then
  retry = reset + math.max(0, period - math.floor((limit - 1) * period / c))
end
return {0, math.floor((budget - c * period) / period), reset, retry}
"""
LUA_CHECK_SHA = hashlib.sha1(LUA_CHECK.encode("utf-8")).hexdigest()


class RedisLimiter:
    """Counters in Redis, shared by every gateway process: one EVALSHA each."""

    log = Logger()

    def __init__(
        self, redis_url, algorithm, clock, timeout_s=0.1, key_prefix="apigw:rl:",
        poolsize=2, reactor=None,
    ):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown rate limit algorithm {algorithm!r}")
        self._url = redis_url
        self._sliding = b"1" if algorithm == "sliding_window" else b"0"
        self._clock = clock
        self._timeout_s = timeout_s
        self._prefix = key_prefix
        self._poolsize = poolsize
        self._reactor = reactor
        self._factory = None

    @property
    def connected(self):
        return self._factory is not None and self._factory.size > 0

    def start(self):
        """Connect in the background; reconnects by itself for ever."""
        # txredisapi imports the global reactor: keep it out of module import.
        import txredisapi
        from twisted.internet.endpoints import HostnameEndpoint

        if self._factory is not None:
            return
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        factory = txredisapi.RedisFactory(
            f"{self._url.host}:{self._url.port}", self._url.db, self._poolsize,
            isLazy=True, password=self._url.password,
            # Aborts a connection that stopped answering (a silent partition)
            # so it gets replaced; far above a healthy round trip.
            replyTimeout=max(2.0, 20 * self._timeout_s),
        )
        # A limiter outage costs every request, so retry sooner than the
        # library's 10 s ceiling; a connect to a down server is cheap.
        factory.initialDelay = 0.2
        factory.maxDelay = 2.0
        factory.startConnecting(
            HostnameEndpoint(reactor, self._url.host, self._url.port, timeout=2)
        )
        self._factory = factory

    def stop(self):
        factory, self._factory = self._factory, None
        if factory is None:
            return defer.succeed(None)
        return factory.disconnect()

    def ping(self):
        if not self.connected:
            return defer.succeed(False)
        d = self._factory.handler.ping()
        d.addTimeout(self._timeout_s, self._clock)
        d.addCallbacks(lambda _: True, lambda _: False)
        return d

    def check(self, bucket, limit, period_s):
        return defer.Deferred.fromCoroutine(self._check(bucket, limit, period_s))

    async def _check(self, bucket, limit, period_s):
        # With reconnect on, txredisapi queues commands while disconnected and
        # never fails them (its issue #112): answer at once instead, and bound
        # everything else with a timeout.
        if not self.connected:
            raise LimiterUnavailable("not connected to Redis")
        keys = [self._prefix + bucket]
        args = [limit, _period_ms(period_s), self._sliding]
        d = self._evaluate(keys, args)
        d.addTimeout(self._timeout_s, self._clock)
        try:
            allowed, remaining, reset_ms, retry_ms = await d
        except defer.TimeoutError:
            raise LimiterUnavailable(f"no answer from Redis in {self._timeout_s} s") from None
        except LimiterUnavailable:
            raise
        except Exception as e:
            raise LimiterUnavailable(f"Redis failed: {e}") from None
        return _decision(limit, allowed, remaining, reset_ms, retry_ms)

    def _evaluate(self, keys, args):
        from txredisapi import ScriptDoesNotExist

        redis = self._factory.handler

        def reload(failure):
            # First use, SCRIPT FLUSH or a restarted server: EVAL loads it.
            failure.trap(ScriptDoesNotExist)
            return redis.execute_command("EVAL", LUA_CHECK, len(keys), *keys, *args)

        return redis.evalsha(LUA_CHECK_SHA, keys, args).addErrback(reload)
