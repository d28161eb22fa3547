"""Rate limiter: the in-process one on a Clock, the Redis one on real servers."""

import os
import signal
import subprocess
import time
import uuid

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from apigw.config import Environment, RedisURL, Settings, parse_config
from apigw.errors import GatewayError
from apigw.metrics import Metrics
from apigw.ratelimit import (
    Decision,
    LimiterUnavailable,
    MemoryLimiter,
    RateLimiting,
    RedisLimiter,
    bucket_for,
    rate_limit_headers,
)
from tests.ratelimit_support import PrivateRedis, sleep

SHARED_REDIS = RedisURL(host="127.0.0.1", port=6379, db=9, password=None)


def result_of(d):
    results = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def admitted(limiter, bucket, limit, period_s, n):
    return sum(result_of(limiter.check(bucket, limit, period_s)).allowed for _ in range(n))


# --- in process ----------------------------------------------------------------


def test_fixed_window_admits_limit_then_resets_on_the_period():
    """When a bucket uses its budget, the next request waits for the aligned window to end."""
    clock = Clock()
    clock.advance(2.5)
    limiter = MemoryLimiter("fixed_window", clock)
    first = result_of(limiter.check("svc:k:1", 3, 10))
    assert first == Decision(allowed=True, limit=3, remaining=2, reset_s=8, retry_after_s=0)
    assert admitted(limiter, "svc:k:1", 3, 10, 2) == 2
    refused = result_of(limiter.check("svc:k:1", 3, 10))
    assert refused == Decision(allowed=False, limit=3, remaining=0, reset_s=8, retry_after_s=8)
    clock.advance(7.4)
    assert not result_of(limiter.check("svc:k:1", 3, 10)).allowed
    clock.advance(0.1)
    again = result_of(limiter.check("svc:k:1", 3, 10))
    assert again == Decision(allowed=True, limit=3, remaining=2, reset_s=10, retry_after_s=0)


def test_rejected_requests_do_not_count_against_the_next_window():
    """When a client keeps hammering after its 429s, the next window still weighs only what was admitted."""
    clock = Clock()
    limiter = MemoryLimiter("sliding_window", clock)
    assert admitted(limiter, "b", 10, 10, 60) == 10
    clock.advance(15)  # half of the next window: the previous one weighs 0.5
    assert admitted(limiter, "b", 10, 10, 60) == 5


def test_sliding_window_weighs_the_previous_window():
    """When a window starts right after a full one, the sliding limiter admits only what has slid out."""
    clock = Clock()
    limiter = MemoryLimiter("sliding_window", clock)
    assert admitted(limiter, "b", 10, 10, 10) == 10
    clock.advance(10)  # next window starts; the previous one still weighs 1.0
    refused = result_of(limiter.check("b", 10, 10))
    assert (refused.allowed, refused.remaining, refused.retry_after_s) == (False, 0, 1)
    clock.advance(2.5)  # weight 0.75: 7.5 of 10 used
    assert admitted(limiter, "b", 10, 10, 10) == 2
    clock.advance(12.5)  # mid window 2: window 1's 2 requests weigh 1; window 0 is gone
    assert admitted(limiter, "b", 10, 10, 20) == 9


def test_fixed_window_admits_a_full_budget_at_the_boundary():
    """When a window starts right after a full one, the fixed limiter admits the whole budget again."""
    clock = Clock()
    limiter = MemoryLimiter("fixed_window", clock)
    assert admitted(limiter, "b", 10, 10, 10) == 10
    clock.advance(10)
    assert admitted(limiter, "b", 10, 10, 20) == 10


def test_buckets_are_separate():
    """When one key or service runs out, other buckets keep their own budgets."""
    limiter = MemoryLimiter("fixed_window", Clock())
    a = bucket_for("service1", "key-a", "10.0.0.1")
    b = bucket_for("service1", "key-b", "10.0.0.1")
    other_service = bucket_for("service2", "key-a", "10.0.0.1")
    assert len({a, b, other_service}) == 3
    assert admitted(limiter, a, 2, 60, 5) == 2
    assert admitted(limiter, b, 2, 60, 5) == 2
    assert admitted(limiter, other_service, 3, 60, 5) == 3


def test_public_services_are_limited_per_client_ip():
    """When a service has no keys, each client address gets its own bucket."""
    assert bucket_for("pub", None, "10.0.0.1") != bucket_for("pub", None, "10.0.0.2")
    assert bucket_for("pub", None, "10.0.0.1") == bucket_for("pub", None, "10.0.0.1")


def test_expired_buckets_are_swept():
    """When buckets go idle for a while, the in-process limiter forgets them."""
    clock = Clock()
    limiter = MemoryLimiter("sliding_window", clock)
    for i in range(100):
        result_of(limiter.check(f"b{i}", 5, 10))
    clock.advance(limiter.sweep_interval_s + 20)
    result_of(limiter.check("fresh", 5, 10))
    assert list(limiter._buckets) == ["fresh"]


def test_zero_limit_refuses_everything():
    """When a limit is 0, every request is refused with a Retry-After."""
    limiter = MemoryLimiter("sliding_window", Clock())
    decision = result_of(limiter.check("b", 0, 60))
    assert not decision.allowed and decision.retry_after_s >= 1


@settings(max_examples=150, deadline=None)
@given(
    algorithm=st.sampled_from(["fixed_window", "sliding_window"]),
    limit=st.integers(1, 12),
    period_s=st.sampled_from([1, 7, 60]),
    steps=st.lists(st.tuples(st.integers(0, 8000), st.integers(0, 15)), max_size=6),
)
def test_remaining_and_retry_after_tell_the_truth(algorithm, limit, period_s, steps):
    """When a client trusts the headers, Remaining more requests pass now and one passes after Retry-After."""
    clock = Clock()
    clock.advance(1_000_000.123)
    limiter = MemoryLimiter(algorithm, clock)
    for wait_ms, burst in steps:
        clock.advance(wait_ms / 1000)
        decisions = [result_of(limiter.check("b", limit, period_s)) for _ in range(burst + 1)]
        last = decisions[-1]
        assert 1 <= last.reset_s <= period_s
        if last.allowed:
            assert admitted(limiter, "b", limit, period_s, last.remaining) == last.remaining
            last = result_of(limiter.check("b", limit, period_s))
            assert not last.allowed
        assert last.remaining == 0
        clock.advance(last.retry_after_s - 0.001)
        early = result_of(limiter.check("b", limit, period_s))
        clock.advance(0.001)
        if not early.allowed:
            assert result_of(limiter.check("b", limit, period_s)).allowed


def test_headers_carry_both_families_and_retry_after_on_refusal():
    """When a decision is rendered, both header families agree and a refusal adds Retry-After."""
    ok = Decision(allowed=True, limit=100, remaining=42, reset_s=17, retry_after_s=0)
    headers = dict(rate_limit_headers(ok, 60))
    assert headers == {
        b"RateLimit-Limit": b"100",
        b"RateLimit-Remaining": b"42",
        b"RateLimit-Reset": b"17",
        b"RateLimit-Policy": b"100;w=60",
        b"X-RateLimit-Limit": b"100",
        b"X-RateLimit-Remaining": b"42",
        b"X-RateLimit-Reset": b"17",
    }
    refused = Decision(allowed=False, limit=100, remaining=0, reset_s=17, retry_after_s=17)
    assert dict(rate_limit_headers(refused, 60))[b"Retry-After"] == b"17"


# --- Redis ---------------------------------------------------------------------


async def redis_time(limiter):
    seconds, micros = await limiter._factory.handler.time()
    return int(seconds) + int(micros) / 1e6


async def clear_of_boundary(limiter, period_s, margin_s):
    """Wait until the current window has at least margin_s left, so a burst stays in one."""
    now = await redis_time(limiter)
    left = period_s - now % period_s
    if left < margin_s:
        await sleep(left + 0.01)


async def wait_connected(limiter, timeout_s=8.0):
    deadline = time.monotonic() + timeout_s
    while not await limiter.ping():
        assert time.monotonic() < deadline, "limiter did not (re)connect"
        await sleep(0.05)


async def delete_prefix(limiter, prefix):
    redis = limiter._factory.handler
    cursor, deleted = 0, 0
    for _ in range(1000):
        cursor, keys = await redis.scan(cursor, pattern=prefix + "*", count=500)
        if keys:
            deleted += await redis.delete(keys)
        if int(cursor) == 0:
            break
    return deleted


@pytest.fixture
def redis_limiter_factory():
    """Limiters on the shared Redis, db 9, under a key prefix unique to the test."""
    from twisted.internet import reactor

    made = []

    def make(algorithm="fixed_window", url=SHARED_REDIS, timeout_s=0.1, key_prefix=None):
        prefix = key_prefix or f"apigw:test:{uuid.uuid4().hex}:"
        limiter = RedisLimiter(url, algorithm, reactor, timeout_s=timeout_s, key_prefix=prefix)
        limiter.start()
        made.append((limiter, prefix))
        return limiter

    yield make

    async def cleanup():
        for limiter, prefix in made:
            if limiter.connected and limiter._url == SHARED_REDIS:
                await delete_prefix(limiter, prefix)
            await limiter.stop()

    pytest_twisted.blockon(defer.ensureDeferred(cleanup()))


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path)
    yield server
    server.stop()


@pytest_twisted.ensureDeferred
async def test_redis_admits_exactly_the_limit_under_concurrency(redis_limiter_factory):
    """When 60 checks race on one bucket with limit 20, Redis admits exactly 20."""
    limiter = redis_limiter_factory()
    await wait_connected(limiter)
    await clear_of_boundary(limiter, 3600, 5)
    decisions = await defer.gatherResults(
        [limiter.check("svc:k:1", 20, 3600) for _ in range(60)], consumeErrors=True
    )
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 20
    assert sorted(d.remaining for d in allowed) == list(range(20))
    assert all(d.retry_after_s >= 1 and d.remaining == 0 for d in decisions if not d.allowed)


@pytest_twisted.ensureDeferred
async def test_redis_sliding_window_admits_exactly_the_limit(redis_limiter_factory):
    """When a burst hits the sliding limiter in Redis, exactly the limit passes and buckets stay apart."""
    limiter = redis_limiter_factory("sliding_window")
    await wait_connected(limiter)
    await clear_of_boundary(limiter, 3600, 5)
    first = await defer.gatherResults([limiter.check("a", 7, 3600) for _ in range(20)])
    other = await defer.gatherResults([limiter.check("b", 3, 3600) for _ in range(10)])
    assert sum(d.allowed for d in first) == 7
    assert sum(d.allowed for d in other) == 3


@pytest_twisted.ensureDeferred
async def test_redis_window_resets_and_keys_expire(redis_limiter_factory):
    """When a short window ends, the budget is back and the bucket's key is already expiring."""
    limiter = redis_limiter_factory()
    await wait_connected(limiter)
    await clear_of_boundary(limiter, 1, 0.4)
    decisions = [await limiter.check("w", 2, 1) for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, True, False]
    assert decisions[2].retry_after_s == 1 and decisions[2].reset_s == 1
    ttl_ms = await limiter._factory.handler.execute_command("PTTL", limiter._prefix + "w")
    assert 0 < ttl_ms <= 1000
    await sleep(1.05)
    assert (await limiter.check("w", 2, 1)).allowed


@pytest_twisted.ensureDeferred
async def test_redis_rejections_do_not_feed_the_sliding_window(redis_limiter_factory):
    """When a client keeps going after its 429s, the next sliding window still lets it through."""
    limiter = redis_limiter_factory("sliding_window")
    await wait_connected(limiter)
    await clear_of_boundary(limiter, 1, 0.7)
    burst = await defer.gatherResults([limiter.check("s", 4, 1) for _ in range(40)])
    assert sum(d.allowed for d in burst) == 4
    now = await redis_time(limiter)
    await sleep(1 - now % 1 + 0.5)  # middle of the next window: previous weighs ~0.5
    later = await defer.gatherResults([limiter.check("s", 4, 1) for _ in range(10)])
    # 4 admitted weigh ~2, leaving ~2; 40 counted would weigh ~20 and leave none.
    assert 1 <= sum(d.allowed for d in later) <= 3


@pytest_twisted.ensureDeferred
async def test_redis_reloads_the_script_after_script_flush(redis_limiter_factory, private_redis):
    """When Redis forgets the script (SCRIPT FLUSH), the next check loads it again and decides."""
    private_redis.start()
    limiter = redis_limiter_factory(url=private_redis.url)
    await wait_connected(limiter)
    assert (await limiter.check("f", 5, 3600)).allowed
    await limiter._factory.handler.script_flush()
    decision = await limiter.check("f", 5, 3600)
    assert decision.allowed and decision.remaining in (3, 4)  # 3 unless the hour turned


@pytest_twisted.ensureDeferred
async def test_redis_outage_is_unavailable_then_recovers(redis_limiter_factory, private_redis):
    """When Redis dies the check fails fast; when it returns the same limiter works again."""
    private_redis.start()
    limiter = redis_limiter_factory(url=private_redis.url, timeout_s=0.1)
    await wait_connected(limiter)
    assert (await limiter.check("o", 5, 60)).allowed

    private_redis.stop()
    await sleep(0.05)
    started = time.monotonic()
    with pytest.raises(LimiterUnavailable):
        await limiter.check("o", 5, 60)
    assert time.monotonic() - started < 0.5
    assert not await limiter.ping()

    private_redis.start()
    await wait_connected(limiter)
    assert (await limiter.check("o", 5, 60)).allowed


@pytest_twisted.ensureDeferred
async def test_redis_that_stops_answering_times_out(redis_limiter_factory, private_redis):
    """When Redis hangs with the connection open, the check fails after about the timeout."""
    private_redis.start()
    limiter = redis_limiter_factory(url=private_redis.url, timeout_s=0.1)
    await wait_connected(limiter)
    os.kill(private_redis.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(LimiterUnavailable):
            await limiter.check("h", 5, 60)
        assert 0.09 <= time.monotonic() - started < 0.5
        # A client that leaves cancels its check: that is no limiter failure.
        abandoned = limiter.check("h", 5, 60)
        abandoned.cancel()
        with pytest.raises(defer.CancelledError):
            await abandoned
    finally:
        os.kill(private_redis.process.pid, signal.SIGCONT)
    assert (await limiter.check("h", 5, 60)).allowed


def _connections_received(port):
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "stats"],
                         capture_output=True, text=True, timeout=10).stdout
    return int(next(line.split(":")[1] for line in out.splitlines()
                    if line.startswith("total_connections_received:")))


@pytest_twisted.ensureDeferred
async def test_redis_connection_silent_too_long_is_replaced(redis_limiter_factory, private_redis):
    """When Redis leaves its connections open but silent for longer than silent_abort_s, they are closed and fresh ones answer once it is back."""
    private_redis.start()
    limiter = redis_limiter_factory(url=private_redis.url, timeout_s=0.05)
    limiter.silent_abort_s = 0.3
    await wait_connected(limiter)
    before = _connections_received(private_redis.port)
    os.kill(private_redis.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        while time.monotonic() - started < 1.0:
            with pytest.raises(LimiterUnavailable):
                await limiter.check("s", 5, 60)
            await sleep(0.05)
    finally:
        os.kill(private_redis.process.pid, signal.SIGCONT)
    await wait_connected(limiter)
    assert (await limiter.check("s", 5, 60)).allowed
    # Both pooled connections were silent: both were replaced.
    assert _connections_received(private_redis.port) >= before + 2


@pytest_twisted.ensureDeferred
async def test_redis_down_at_start_does_not_block_and_connects_later(
    redis_limiter_factory, private_redis
):
    """When Redis is down at startup, start returns at once and the limiter connects once it is up."""
    started = time.monotonic()
    limiter = redis_limiter_factory(url=private_redis.url)
    assert time.monotonic() - started < 0.1
    with pytest.raises(LimiterUnavailable):
        await limiter.check("d", 5, 60)
    private_redis.start()
    await wait_connected(limiter)
    assert (await limiter.check("d", 5, 60)).allowed


def test_limiter_outage_is_logged_once_per_interval_and_counted():
    """When the shared limiter is down, every request counts but the log gets one line per interval."""
    clock = Clock()
    unstarted = RedisLimiter(SHARED_REDIS, "fixed_window", clock)
    gate = RateLimiting(unstarted, Metrics(), clock)
    service = parse_config(
        "services:\n  a:\n    url: http://127.0.0.1:1\n", "t.yaml", Environment()
    ).services["a"]
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        for _ in range(3):
            assert result_of(defer.ensureDeferred(
                gate.check(service, None, "10.1.2.3", Settings())
            )) == ()
        clock.advance(gate.failure_report_interval_s)
        closed = Settings(rate_limit_failure="closed")
        with pytest.raises(GatewayError) as refused:
            result_of(defer.ensureDeferred(gate.check(service, None, "10.1.2.3", closed)))
        assert refused.value.status == 503
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e for e in events if e.get("log_namespace") == "apigw.ratelimit.RateLimiting"]
    assert [e["count"] for e in warnings] == [1, 3]
    assert gate.failures == 4


class _TurnClock:
    """A Clock whose zero-delay calls wait for an explicit reactor turn, as
    the real reactor's do (they run after the next poll)."""

    def __init__(self):
        from twisted.internet.task import Clock

        self.timers, self.turns = Clock(), Clock()

    def callLater(self, delay, f, *args, **kwargs):
        clock = self.turns if delay == 0 else self.timers
        return clock.callLater(delay, f, *args, **kwargs)

    def seconds(self):
        return self.timers.seconds()


def test_limiter_timeout_waits_one_turn_for_an_answer_already_read():
    """When the deadline passes during a stall but the answer is read in the next poll, the decision stands and no timeout is reported."""
    from twisted.internet.defer import Deferred

    from apigw.deadlines import Timeouts
    from apigw.ratelimit import _timed_out

    clock = _TurnClock()
    d = Deferred()
    results = []
    Timeouts(clock, patient=True).add(d, 0.1, _timed_out).addBoth(results.append)
    clock.timers.advance(0.5)  # the stall: the timer is long overdue
    assert results == []
    d.callback("answer")  # the poll after the stall reads Redis's reply
    clock.turns.advance(0)
    assert results == ["answer"]


def test_limiter_timeout_fires_when_no_answer_came():
    """When nothing arrives by the turn after the deadline, the call fails with a timeout."""
    from twisted.internet.defer import Deferred, TimeoutError

    from apigw.deadlines import Timeouts
    from apigw.ratelimit import _timed_out

    clock = _TurnClock()
    d = Deferred()
    results = []
    Timeouts(clock, patient=True).add(d, 0.1, _timed_out).addBoth(results.append)
    clock.timers.advance(0.1)
    clock.turns.advance(0)
    assert len(results) == 1 and results[0].check(TimeoutError)


# --- what the Redis limiter relies on in txredisapi ---------------------------------

class _Writes(StringTransport):
    """A transport that keeps each write apart."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, data):
        self.writes.append(data)
        super().write(data)


def test_encoded_command_is_what_txredisapi_writes():
    """When the limiter encodes its EVALSHA itself, the bytes are those txredisapi's execute_command writes for the same arguments."""
    from apigw.ratelimit import _LUA_CHECK_SHA_BYTES, _encode_command

    args = (b"EVALSHA", _LUA_CHECK_SHA_BYTES, b"1", "apigw:rl:s:k:\u00e9".encode(),
            b"2000000000", b"60000", b"1")
    protocol, transport = _redis_protocol()
    protocol.execute_command(*args)
    assert _encode_command(args) == transport.value()


def _turn_batch(clock=None):
    from twisted.internet.task import Clock

    from apigw.deadlines import Timeouts
    from apigw.ratelimit import _TurnBatch

    clock = clock if clock is not None else Clock()
    deadlines = Timeouts(clock, patient=True)
    return _TurnBatch(clock, deadlines, 0.1), deadlines, clock


def _redis_protocol():
    """A txredisapi protocol on a transport that keeps each write apart."""
    import txredisapi

    protocol = txredisapi.RedisProtocol()
    transport = _Writes()
    protocol.makeConnection(transport)
    return protocol, transport


def test_a_turns_commands_go_out_together_and_get_their_own_replies_in_order():
    """When several checks are made in one reactor turn, their commands go
    out in one write once the turn ends, behind anything txredisapi wrote
    meanwhile; each gets its own reply in order, an error reply fails as
    ResponseError, one cancelled before the turn ends is not sent, and one
    cancelled after it does not shift the replies of the next."""
    import txredisapi

    from apigw.ratelimit import _encode_command

    protocol, transport = _redis_protocol()
    turn, _, clock = _turn_batch()
    commands = [_encode_command((b"ECHO", b"%d" % n)) for n in range(5)]
    sent = [turn.send(protocol, command) for command in commands[:2]]
    ping = protocol.execute_command("PING")  # txredisapi's own, written at once
    sent += [turn.send(protocol, command) for command in commands[2:]]
    assert turn.connection is protocol
    results = [[] for _ in sent]
    for d, got in zip(sent, results):
        d.addBoth(got.append)
    sent[2].cancel()  # the client left within the turn
    sent[4].cancel()
    assert transport.writes == [_encode_command((b"PING",))]
    clock.advance(0)
    assert transport.writes[1:] == [commands[0] + commands[1] + commands[3]]
    assert turn.connection is None
    sent[1].cancel()
    assert results[1][0].check(defer.CancelledError)
    protocol.dataReceived(b"+PONG\r\n*2\r\n:1\r\n:2\r\n+late\r\n"
                          b"-NOSCRIPT No matching script\r\n")
    assert ping.result == "PONG"
    assert results[0] == [[1, 2]]
    assert results[2][0].check(defer.CancelledError)
    assert results[3][0].check(txredisapi.ResponseError)
    assert str(results[3][0].value).startswith("NOSCRIPT")
    assert results[4][0].check(defer.CancelledError)
    assert clock.getDelayedCalls() == []


def test_a_turns_commands_fail_when_their_connection_closes_first():
    """When a connection closes (or starts to) before the turn's commands
    are written, its commands fail at once and nothing is written on it,
    while those for another connection go out; one lost after the write
    fails the commands still waiting."""
    from apigw.ratelimit import _encode_command

    ping = _encode_command((b"PING",))
    turn, _, clock = _turn_batch()
    lost, lost_transport = _redis_protocol()
    aborted, aborted_transport = _redis_protocol()
    healthy, healthy_transport = _redis_protocol()
    failures = []
    for redis in (lost, aborted, healthy):
        turn.send(redis, ping).addErrback(failures.append)
    lost.connectionLost(Failure(ConnectionDone()))
    aborted_transport.loseConnection()  # still connected until the next turn
    clock.advance(0)
    assert len(failures) == 2 and all(f.check(ConnectionError) for f in failures)
    assert lost_transport.writes == aborted_transport.writes == []
    assert healthy_transport.writes == [ping]
    healthy.connectionLost(Failure(ConnectionDone()))
    assert len(failures) == 3


def test_a_checks_deadline_counts_from_when_its_command_is_written():
    """When the turn that queued a check stalls past its deadline before the
    command goes out, the answer read right after still counts; with no
    answer, the check times out one deadline after the write."""
    from twisted.internet.defer import TimeoutError

    from apigw.ratelimit import _encode_command, _timed_out

    for answered in (True, False):
        protocol, transport = _redis_protocol()
        turn, deadlines, clock = _turn_batch()
        d = turn.send(protocol, _encode_command((b"PING",)))
        results = []
        deadlines.add(d, 0.1, _timed_out).addBoth(results.append)  # as check() does
        clock.advance(0.15)  # the rest of the turn took 150 ms
        assert transport.writes and results == []
        if answered:
            protocol.dataReceived(b"+PONG\r\n")
            assert results == ["PONG"]
        else:
            clock.advance(0.1)
            assert len(results) == 1 and results[0].check(TimeoutError)


@pytest_twisted.ensureDeferred
async def test_checks_not_yet_sent_when_the_limiter_stops_fail_and_count_nothing(
        redis_limiter_factory):
    """When the limiter stops with checks of the current turn not yet sent,
    they fail as the limiter being unavailable, and Redis counts none of
    them."""
    prefix = f"apigw:test:{uuid.uuid4().hex}:"
    limiter = redis_limiter_factory(key_prefix=prefix)
    await wait_connected(limiter)
    assert (await limiter.check("s", 5, 3600)).remaining == 4
    pending = [limiter.check("s", 5, 3600) for _ in range(3)]
    await limiter.stop()
    for d in pending:
        with pytest.raises(LimiterUnavailable):
            await d
    other = redis_limiter_factory(key_prefix=prefix)
    await wait_connected(other)
    assert (await other.check("s", 5, 3600)).remaining in (3, 4)  # 4 if the hour turned


def test_limiter_timeouts_on_one_timer_each_fire_at_their_own_deadline():
    """When several calls share the limiter's deadline timer, each unanswered one times out one turn after its own deadline, answered ones never do, and no timer is left once none is under way."""
    from twisted.internet.defer import Deferred, TimeoutError

    from apigw.deadlines import Timeouts
    from apigw.ratelimit import _timed_out

    clock = _TurnClock()
    deadlines = Timeouts(clock, patient=True)
    first, answered, second = Deferred(), Deferred(), Deferred()
    results = {d: [] for d in (first, answered, second)}
    for d in (first, answered):
        deadlines.add(d, 0.1, _timed_out).addBoth(results[d].append)
    clock.timers.advance(0.05)
    deadlines.add(second, 0.1, _timed_out).addBoth(results[second].append)
    answered.callback("answer")
    clock.timers.advance(0.05)
    assert results[first] == []  # the deadline waits one more turn
    clock.turns.advance(0)
    assert results[first][0].check(TimeoutError) and results[second] == []
    clock.timers.advance(0.049)
    clock.turns.advance(0)
    assert results[second] == []
    clock.timers.advance(0.001)
    clock.turns.advance(0)
    assert results[second][0].check(TimeoutError)
    assert results[answered] == ["answer"]
    assert clock.timers.getDelayedCalls() == [] and clock.turns.getDelayedCalls() == []
