"""Rate limiting: one decision per request, in process or shared through Redis.

Both limiters compute at check time from a small per-bucket state (window
index, count in it, count in the previous one): no per-key timers. Only
admitted requests are counted, so a flood of 429s cannot eat the next window.
"""

import hashlib
import math
import weakref

import attr
from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from apigw._twisted_compat import closing, write_at_once
from apigw.config import SentinelRedisURL
from apigw.deadlines import Timeouts
from apigw.errors import GatewayError
from apigw.outage import OutageLog
from apigw.sentinel import MasterWatch, client_endpoint

log = Logger()

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


class MasterUnreachable(Exception):
    """The server the sentinels name as master does not take connections."""


def bucket_for(service_name, consumer_id, client_ip):
    """Per key per service; per client IP where there is no key (auth: false)."""
    if consumer_id is not None:
        return f"{service_name}:k:{consumer_id}"
    return f"{service_name}:ip:{client_ip}"


def rate_limit_headers(decision, period_s):
    """Both header families (IETF draft and GitHub style), same values."""
    fixed = _FIXED_HEADERS.get((decision.limit, period_s))
    if fixed is None:
        fixed = _fixed_headers(decision.limit, period_s)
    remaining = b"%d" % decision.remaining
    reset = b"%d" % decision.reset_s
    headers = [
        fixed[0],
        (b"RateLimit-Remaining", remaining),
        (b"RateLimit-Reset", reset),
        fixed[1],
        fixed[2],
        (b"X-RateLimit-Remaining", remaining),
        (b"X-RateLimit-Reset", reset),
    ]
    if not decision.allowed:
        headers.append((b"Retry-After", b"%d" % decision.retry_after_s))
    return headers


# (limit, period) -> the header pairs that depend on nothing else, made
# once: a service has one limit, and keys with their own are few.
_FIXED_HEADERS = {}


def _fixed_headers(limit, period_s):
    encoded = b"%d" % limit
    fixed = ((b"RateLimit-Limit", encoded),
             (b"RateLimit-Policy", b"%d;w=%d" % (limit, max(1, round(period_s)))),
             (b"X-RateLimit-Limit", encoded))
    if len(_FIXED_HEADERS) >= 1000:
        _FIXED_HEADERS.clear()
    _FIXED_HEADERS[(limit, period_s)] = fixed
    return fixed


def _checked(algorithm):
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown rate limit algorithm {algorithm!r}")
    return algorithm


def _period_ms(period_s):
    return max(1, round(period_s * 1000))


def _decision(limit, allowed, remaining, reset_ms, retry_ms):
    # Once per request: positional, and conditionals rather than max().
    remaining = int(remaining)
    reset_s = math.ceil(reset_ms / 1000)
    if allowed:
        retry_s = 0
    else:
        retry_s = math.ceil(retry_ms / 1000)
        if retry_s < 1:
            retry_s = 1
    return Decision(True if allowed else False, limit, remaining if remaining > 0 else 0,
                    reset_s if reset_s > 1 else 1, retry_s)


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
        self._algorithm = _checked(algorithm)
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

    def check(self, bucket, limit, period_s, algorithm=None):
        """A Deferred Decision; `algorithm` overrides the default (config reloads)."""
        sliding = _checked(algorithm or self._algorithm) == "sliding_window"
        now_ms = round(self._clock.seconds() * 1000)
        self._sweep(now_ms)
        period_ms = _period_ms(period_s)
        entry = self._buckets.get(bucket)
        state, outcome = decide(entry[0] if entry else None, now_ms, limit, period_ms, sliding)
        if outcome[0]:
            # A sliding window's count still matters during the next window.
            lifetime = (state[0] + (2 if sliding else 1)) * period_ms
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
_LUA_CHECK_SHA_BYTES = LUA_CHECK_SHA.encode("ascii")


class RedisLimiter:
    """Counters in Redis, shared by every gateway process: one EVALSHA each."""

    log = Logger()

    def __init__(
        self, redis_url, algorithm, clock, timeout_s=0.1, key_prefix="apigw:rl:",
        poolsize=2, reactor=None,
    ):
        self._url = redis_url
        self._algorithm = _checked(algorithm)
        self._clock = clock
        self._timeout_s = timeout_s
        self._prefix = key_prefix
        self._poolsize = poolsize
        self._reactor = reactor
        self._factory = None
        self._retries = None
        self.watch = None  # a MasterWatch when the URL names sentinels
        self._next = 0
        # Connection -> when its first unanswered timeout happened: a silent
        # partition leaves the socket open for ever unless we close it.
        self._silent_since = weakref.WeakKeyDictionary()
        # Whether _silent_since may hold anything: asking the weak dictionary
        # itself (a Python __len__) on every answer costs more than this.
        self._maybe_silent = False
        self._commands = {}  # see _command()
        # One timer for the deadlines of all checks under way.
        self._deadlines = Timeouts(clock, patient=True)
        self._turn = _TurnBatch(clock, self._deadlines, timeout_s)
        self.outage = OutageLog(
            redis_url.describe(), clock, self.log,
            consequence="requests get the rate_limit_failure policy until it answers")

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
        if isinstance(self._url, SentinelRedisURL):
            self.watch = MasterWatch(self._url, self._clock, reactor, self._master_changed)
            endpoint = _MasterEndpoint(self.watch, reactor)
            where = f"sentinel:{self._url.master_name}"
        else:
            endpoint = HostnameEndpoint(reactor, self._url.host, self._url.port, timeout=2)
            where = f"{self._url.host}:{self._url.port}"
        factory = txredisapi.RedisFactory(
            where, self._url.db, self._poolsize,
            isLazy=True, password=self._url.password,
            # No timer per command: check() keeps the deadline, and
            # _timed_out() replaces a connection that stopped answering.
            replyTimeout=None,
        )
        # After a dropped connection the pool waits this long before its
        # first new connect (later ones wait inside _QuietRetries): a
        # limiter outage costs every request, the library's 10 s is long.
        factory.initialDelay = 0.2 if self.watch is None else 0.05
        factory.maxDelay = 2.0
        self._retries = _QuietRetries(endpoint, self._clock, self.outage)
        factory.startConnecting(self._retries)
        self._factory = factory
        if self.watch is not None:
            self.watch.start()

    def stop(self):
        # Checks of this turn not yet sent: their answers would never be
        # read now.
        self._turn.fail_unsent(LimiterUnavailable("the rate limiter is stopping"))
        factory, self._factory = self._factory, None
        if factory is None:
            return defer.succeed(None)
        watch, self.watch = self.watch, None
        stopping = [factory.disconnect()]
        if watch is not None:
            stopping.append(watch.stop())
        return defer.gatherResults(stopping, consumeErrors=True)

    @property
    def master(self):
        """The master in use, as host:port, when Sentinel names it; else None."""
        return self.watch.describe_address() if self.watch is not None else None

    def _master_changed(self, old, new):
        # Connections to the old master either died with it or now reach a
        # replica that answers READONLY: replace them, and connect to the
        # new one now rather than at the next retry.
        if old is not None and self._factory is not None:
            self._silent_since.clear()
            for redis in list(self._factory.pool):
                transport = getattr(redis, "transport", None)
                if transport is not None:
                    transport.abortConnection()
        self._retries.kick()

    def _not_master(self, redis):
        # A demoted master keeps its connections open: only asking the
        # sentinels again (and a new connection) gets us to the new one.
        if self.watch is None:
            return
        transport = getattr(redis, "transport", None)
        if transport is not None:
            transport.abortConnection()
        self.watch.refresh()

    def ping(self):
        if not self.connected:
            return defer.succeed(False)
        d = self._factory.handler.ping()
        d.addTimeout(self._timeout_s, self._clock)
        d.addCallbacks(lambda _: True, lambda _: False)
        return d

    def check(self, bucket, limit, period_s, algorithm=None):
        """A Deferred Decision, or LimiterUnavailable within about timeout_s.

        A plain callback chain straight onto a connected protocol: this runs
        once per request, and txredisapi's handler adds a generator and a
        DeferredQueue round per command on top of the one round trip, and
        its execute_command() encodes the same command afresh each time.
        The checks of one reactor turn go out together (_TurnBatch).
        """
        command = self._commands.get((bucket, limit, period_s, algorithm))
        if command is None:
            command = self._command(bucket, limit, period_s, algorithm)
        redis = self._turn.connection
        if redis is None or not _usable(redis):
            try:
                redis = self._connection()
            except LimiterUnavailable:
                return defer.fail()
        d = self._turn.send(redis, command[0])
        d.addErrback(self._load_script, redis, command[1], command[2])
        self._deadlines.add(d, self._timeout_s, _timed_out)
        d.addCallbacks(self._answered, self._unavailable,
                       callbackArgs=(limit, redis), errbackArgs=(redis,))
        return d

    # A bucket sends the same EVALSHA request after request: its encoding
    # is kept rather than built again by txredisapi every time.
    max_cached_commands = 10000

    def _command(self, bucket, limit, period_s, algorithm):
        """(the encoded EVALSHA, its key, its arguments), remembered."""
        sliding = _checked(algorithm or self._algorithm) == "sliding_window"
        # Bytes throughout: txredisapi passes them through as they are.
        args = (b"%d" % limit, b"%d" % _period_ms(period_s), b"1" if sliding else b"0")
        key = (self._prefix + bucket).encode("utf-8")
        command = (_encode_command((b"EVALSHA", _LUA_CHECK_SHA_BYTES, b"1", key, *args)),
                   key, args)
        if len(self._commands) >= self.max_cached_commands:
            self._commands.clear()
        # Keyed by what the caller passed: `algorithm` None means this
        # limiter's default, which never changes.
        self._commands[(bucket, limit, period_s, algorithm)] = command
        return command

    # A connection whose commands have all timed out for this long is
    # closed, so that txredisapi connects afresh.
    silent_abort_s = 2.0

    def _answered(self, reply, limit, redis):
        if self._maybe_silent:
            self._silent_since.pop(redis, None)
            self._maybe_silent = len(self._silent_since) > 0
        allowed, remaining, reset_ms, retry_ms = reply
        return _decision(limit, allowed, remaining, reset_ms, retry_ms)

    def _timed_out(self, redis):
        now = self._clock.seconds()
        since = self._silent_since.setdefault(redis, now)
        self._maybe_silent = True
        if now - since >= self.silent_abort_s:
            del self._silent_since[redis]
            log.warn("Redis connection silent for {seconds}s; closing it to connect afresh",
                     seconds=self.silent_abort_s)
            transport = getattr(redis, "transport", None)
            if transport is not None:
                transport.abortConnection()

    def _connection(self):
        # With reconnect on, txredisapi queues commands while disconnected and
        # never fails them (its issue #112): answer at once instead.
        pool = self._factory.pool if self._factory is not None else ()
        for _ in range(len(pool)):
            self._next = (self._next + 1) % len(pool)
            conn = pool[self._next]
            if _usable(conn):
                return conn
        raise LimiterUnavailable("not connected to Redis")

    @staticmethod
    def _load_script(failure, redis, key, args):
        # First use, SCRIPT FLUSH or a restarted server: EVAL loads it.
        from txredisapi import ResponseError

        if failure.check(ResponseError) and str(failure.value).startswith("NOSCRIPT"):
            return redis.execute_command(b"EVAL", LUA_CHECK, b"1", key, *args)
        return failure

    def _unavailable(self, failure, redis):
        from txredisapi import ResponseError

        if failure.check(defer.CancelledError, LimiterUnavailable):
            return failure  # cancelled: the client left, Redis is fine
        if failure.check(defer.TimeoutError):
            self._timed_out(redis)
            raise LimiterUnavailable(f"no answer from Redis in {self._timeout_s} s")
        if failure.check(ResponseError) and str(failure.value).startswith("READONLY"):
            self._not_master(redis)
            raise LimiterUnavailable("Redis answered READONLY: it is a replica now")
        raise LimiterUnavailable(f"Redis failed: {failure.getErrorMessage()}")


@implementer(IStreamClientEndpoint)
class _QuietRetries:
    """An endpoint whose connect() keeps trying until it connects.

    txredisapi's pool reconnects through ClientService, which logs a line
    per connection and attempt, every two seconds for as long as Redis is
    down. Retried in here, a failed connect never reaches it; the outage
    goes to `outage` (an OutageLog) instead. A limiter outage costs every
    request, so the delay starts at 0.2 s and stops doubling at 2 s, and
    kick() (a new Sentinel master) makes every waiting attempt try now.
    """

    initial_delay_s = 0.2
    max_delay_s = 2.0

    def __init__(self, endpoint, clock, outage):
        self._endpoint = endpoint
        self._clock = clock
        self._outage = outage
        self._waiting = set()  # the retry-now callables of attempts waiting

    def __repr__(self):
        # ClientService still logs one line per connection when a live one
        # drops, naming its endpoint: this.
        return f"<{self._outage.what}>"

    def kick(self):
        """Attempts waiting to retry start now; those under way, once they fail."""
        for now in list(self._waiting):
            now()

    def connect(self, factory):
        attempt = [None]  # the connect or the timer in progress
        delay_s = [self.initial_delay_s]
        kicked = [False]

        def cancel(_):
            pending = attempt[0]
            attempt[0] = None
            self._waiting.discard(now)
            if isinstance(pending, defer.Deferred):
                pending.cancel()
            elif pending is not None and pending.active():
                pending.cancel()

        connected = defer.Deferred(cancel)

        def start():
            kicked[0] = False
            d = attempt[0] = self._endpoint.connect(factory)
            d.addCallbacks(succeeded, failed)

        def now():
            delay_s[0] = self.initial_delay_s
            timer = attempt[0]
            if isinstance(timer, defer.Deferred):
                # Under way, perhaps to the old address: when it fails, the
                # next one starts at once.
                kicked[0] = True
            elif timer is not None and timer.active():
                timer.cancel()
                start()

        def succeeded(protocol):
            attempt[0] = None
            self._waiting.discard(now)
            self._outage.recovered()
            connected.callback(protocol)

        def failed(failure):
            if connected.called:  # cancelled: ClientService is stopping
                return None
            self._outage.failed(failure.getErrorMessage())
            if kicked[0]:
                start()
                return None
            attempt[0] = self._clock.callLater(delay_s[0], start)
            delay_s[0] = min(self.max_delay_s, delay_s[0] * 2)
            return None

        self._waiting.add(now)
        start()
        return connected


@implementer(IStreamClientEndpoint)
class _MasterEndpoint:
    """Connects to whichever server the sentinels last named master."""

    def __init__(self, watch, reactor):
        self._watch = watch
        self._reactor = reactor

    def connect(self, factory):
        address = self._watch.address
        if address is None:
            # Not a failure to log: the sentinels' links say if they fail.
            d = self._watch.when_known()
            d.addCallback(lambda _: self.connect(factory))
            return d
        endpoint = client_endpoint(self._reactor, *address)
        d = endpoint.connect(factory)
        d.addErrback(self._failed, address)
        return d

    def _failed(self, failure, address):
        # Unreachable: perhaps a failover is under way, or done and missed.
        self._watch.refresh()
        host, port = address
        raise MasterUnreachable(f"master {host}:{port}: {failure.getErrorMessage()}")


def _timed_out(result, timeout_s):
    return Failure(defer.TimeoutError(f"no answer within {timeout_s}s"))


def _encode_command(args):
    """A Redis command in RESP, as txredisapi's execute_command() writes
    it for the same (bytes) arguments."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class _TurnBatch:
    """The limiter's commands of one reactor turn, written to Redis together
    once the turn's events are handled: one send(2) per connection, when
    nothing else waits to go out on it.

    Under load one poll brings several requests, each with its EVALSHA: one
    send and one reply read for all of them instead of one each. A send on
    loopback costs about as much as the rest of a request's Redis round
    trip in Python. The commands wait for the turn's other events, a
    fraction of a millisecond, from a callLater(0) on the limiter's clock
    (so that clock must be the reactor's, or a test's that it advances).

    Each command's reply is asked of txredisapi's reply queue as it is
    written, so the queue stays in step with what went out, whatever else
    writes to the connection meanwhile (txredisapi's own PING, the EVAL
    that loads the script). A check cancelled before its turn ends is not
    sent; one cancelled after is answered and its reply dropped. Its
    deadline (`deadlines`) counts from the write: a stall later in the turn
    that queued it is not Redis's delay. Commands for a connection that
    closed before the write fail at once.

    What execute_command() does for each command, minus encoding it again
    and the generator and second Deferred it puts in front of the reply.
    Relies on txredisapi's protocol answering the commands written to its
    `transport` in order from `replyQueue` (a DeferredQueue, one get() per
    command), handing error replies and a lost connection over as exception
    values, and saying `connected`; tests/test_ratelimit.py pins that.
    """

    def __init__(self, clock, deadlines, timeout_s):
        self._clock = clock
        self._deadlines = deadlines
        self._timeout_s = timeout_s
        self._call = None
        # connection -> (encoded commands, their Deferreds), in send order.
        self._queued = {}
        # The connection this turn's latest command went to; None before
        # the first.
        self.connection = None

    def send(self, redis, command):
        """A Deferred of the reply to the encoded `command`, sent on `redis`
        when this turn ends; it fails with the ResponseError of an error
        reply."""
        queued = self._queued.get(redis)
        if queued is None:
            queued = self._queued[redis] = ([], [])
        self.connection = redis
        d = defer.Deferred()
        queued[0].append(command)
        queued[1].append(d)
        if self._call is None:
            self._call = self._clock.callLater(0, self.write)
        return d

    def _take(self):
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        queued, self._queued = self._queued, {}
        self.connection = None
        return queued

    def write(self):
        """Write this turn's commands (the turn's end)."""
        for redis, (commands, waiting) in self._take().items():
            live = [i for i, d in enumerate(waiting) if not d.called]
            if not live:
                continue
            if not _usable(redis):
                for i in live:
                    waiting[i].errback(Failure(ConnectionError("the Redis connection was lost")))
                continue
            write_at_once(redis.transport, b"".join([commands[i] for i in live]))
            queue = redis.replyQueue
            for i in live:
                d = waiting[i]
                self._deadlines.restart(d, self._timeout_s)
                queue.get().addBoth(_reply, d)

    def fail_unsent(self, reason):
        """Fail this turn's commands with `reason` instead of writing them."""
        for _, waiting in self._take().values():
            for d in waiting:
                if not d.called:
                    d.errback(Failure(reason))


def _usable(redis):
    """Whether commands may still be written on this connection: connected,
    and not being closed (an abort leaves it connected until the next turn)."""
    return bool(redis.connected) and not closing(redis.transport)


def _reply(reply, d):
    # txredisapi hands error replies (and a lost connection) over as
    # exception values, not failures.
    if d.called:
        return
    if isinstance(reply, Exception):
        d.errback(Failure(reply))
    elif isinstance(reply, Failure):
        d.errback(reply)
    else:
        d.callback(reply)


def make_limiter(config, clock, reactor=None):
    """Redis when REDIS_URL is set (shared by every process), else in process."""
    algorithm = config.settings.rate_limit_algorithm
    if config.env.redis_url:
        from apigw.config import parse_redis_url

        url = parse_redis_url(config.env.redis_url)
        return RedisLimiter(url, algorithm, clock, reactor=reactor)
    return MemoryLimiter(algorithm, clock)


class RateLimiting:
    """The request-path side: bucket, limit, headers, 429 and the failure policy."""

    log = Logger()
    failure_report_interval_s = 5.0

    def __init__(self, limiter, metrics, clock):
        self.limiter = limiter
        self._metrics = metrics
        self._clock = clock
        self._failing = False
        self.failures = 0  # requests the limiter could not decide, since start
        self._unreported = 0
        self._reported_at = None

    @property
    def shared(self):
        return isinstance(self.limiter, RedisLimiter)

    def start(self):
        self.limiter.start()

    def stop(self):
        return self.limiter.stop()

    def ping(self):
        return self.limiter.ping()

    async def check(self, service, consumer, client_ip, settings):
        """The rate-limit headers for the answer (empty when unlimited), or
        GatewayError 429 (or 503 when the store is down and the policy is
        closed)."""
        limit = service.rate_limit
        if consumer is not None and consumer.rate_limit is not None:
            limit = consumer.rate_limit
        if limit is None:
            return ()
        bucket = bucket_for(
            service.name, consumer.id if consumer is not None else None, client_ip
        )
        period_s = settings.rate_period_s
        try:
            decision = await self.limiter.check(
                bucket, limit, period_s, settings.rate_limit_algorithm
            )
        except LimiterUnavailable as e:
            closed = settings.rate_limit_failure == "closed"
            self._failed(e, "refused with 503" if closed else "let through without a limit")
            if closed:
                raise GatewayError(503, "the rate limiter is unavailable; try again later")
            return ()
        if self._failing:
            self._recovered()
        headers = rate_limit_headers(decision, period_s)
        if not decision.allowed:
            self._metrics.rate_limited.labels(service.name).inc()
            raise GatewayError(
                429, f"rate limit exceeded: {limit} requests per {period_s:g} s", headers=headers
            )
        return headers

    def _failed(self, why, outcome):
        # One line per interval, not per request: an outage at 1000 req/s
        # must not flood the log.
        self._failing = True
        self.failures += 1
        self._unreported += 1
        now = self._clock.seconds()
        last = self._reported_at
        if last is not None and now - last < self.failure_report_interval_s:
            return
        self.log.warn(
            "rate limiter unavailable ({why}); {count} request(s) {outcome}"
            " since the last report",
            why=why, count=self._unreported, outcome=outcome,
        )
        self._reported_at = now
        self._unreported = 0

    def _recovered(self):
        if self._failing:
            self._failing = False
            self.log.info(
                "rate limiter available again ({count} more request(s) since the last report)",
                count=self._unreported,
            )
            self._unreported = 0
            self._reported_at = None
