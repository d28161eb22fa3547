"""The Redis limiter behind Sentinel: which master, and following it."""

import time

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from apigw.config import SentinelRedisURL, parse_redis_url
from apigw.ratelimit import LimiterUnavailable, RedisLimiter
from apigw.sentinel import MasterWatch
from tests.ratelimit_support import sleep
from tests.sentinel_support import MASTER_NAME, SentinelRedis, redis_cli

pytestmark = pytest.mark.slow


def _watch():
    url = SentinelRedisURL(sentinels=(("127.0.0.1", 1), ("127.0.0.1", 2)), master_name="m",
                           db=0, password=None)
    changes = []
    reactor = MemoryReactorClock()
    watch = MasterWatch(url, reactor, reactor, lambda old, new: changes.append((old, new)))
    return watch, changes


def test_highest_config_epoch_wins_and_older_answers_are_ignored():
    """When sentinels disagree during a failover, the answer with the newest epoch is kept."""
    watch, changes = _watch()
    a, b = watch._links
    watch.answered(a, {"ip": "10.0.0.1", "port": "6379", "config-epoch": "3"})
    watch.answered(b, {"ip": "10.0.0.1", "port": "6379", "config-epoch": "3"})
    assert changes == [(None, ("10.0.0.1", 6379))]
    watch.answered(a, {"ip": "10.0.0.2", "port": "6380", "config-epoch": "4"})
    # b has not heard of the failover yet: it must not take us back.
    watch.answered(b, {"ip": "10.0.0.1", "port": "6379", "config-epoch": "3"})
    assert watch.address == ("10.0.0.2", 6380) and watch.describe_address() == "10.0.0.2:6380"
    assert changes[1:] == [(("10.0.0.1", 6379), ("10.0.0.2", 6380))]


def test_switch_message_for_another_master_is_ignored():
    """When +switch-master names another master, nobody is asked; for ours, every sentinel is."""
    watch, _ = _watch()
    asked = []
    for link in watch._links:
        link.ask = lambda link=link: asked.append(link)
    watch.switched("other 10.0.0.1 6379 10.0.0.2 6379")
    assert asked == []
    watch.switched("m 10.0.0.1 6379 10.0.0.2 6379")
    assert asked == watch._links


def test_when_known_waits_for_the_first_answer():
    """When no sentinel has answered yet, when_known fires with the first address."""
    watch, _ = _watch()
    d = watch.when_known()
    assert not d.called
    watch.answered(watch._links[0], {"ip": "10.0.0.1", "port": "6379", "config-epoch": "0"})
    assert d.result == ("10.0.0.1", 6379)


@pytest.fixture
def sentinel_redis(tmp_path):
    servers = SentinelRedis(tmp_path)
    try:
        yield servers.start()
    finally:
        servers.stop()


@pytest.fixture
def sentinel_limiter(sentinel_redis):
    from twisted.internet import reactor

    limiter = RedisLimiter(parse_redis_url(sentinel_redis.url), "fixed_window", reactor)
    limiter.start()
    yield limiter
    pytest_twisted.blockon(limiter.stop())


async def wait_deciding(limiter, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await limiter.check("probe", 1000000, 3600)
        except LimiterUnavailable:
            assert time.monotonic() < deadline, "the limiter never decided"
            await sleep(0.01)


@pytest_twisted.ensureDeferred
async def test_limiter_finds_the_master_and_follows_a_killed_one(sentinel_redis, sentinel_limiter):
    """When the master is SIGKILLed, checks fail until Sentinel promotes the replica; within 2 s of that the count continues there."""
    limiter = sentinel_limiter
    await wait_deciding(limiter)
    first_master = sentinel_redis.ports[0]
    assert limiter.master == f"127.0.0.1:{first_master}"
    decisions = await defer.gatherResults([limiter.check("k", 10, 3600) for _ in range(4)])
    assert sorted(d.remaining for d in decisions) == [6, 7, 8, 9]

    replica = sentinel_redis.replica_port(first_master)
    # Following is under test here, not replication lag.
    deadline = time.monotonic() + 5
    while redis_cli(replica, "HGET", limiter._prefix + "k", "c") != "4":
        assert time.monotonic() < deadline, "the count never reached the replica"
        await sleep(0.01)
    sentinel_redis.server(first_master).kill()
    killed = time.monotonic()
    promoted = None
    while True:
        now = time.monotonic()
        assert now - killed < 20, "no failover within 20 s"
        if promoted is None and sentinel_redis.role(replica) == "master":
            promoted = now
        try:
            decision = await limiter.check("k", 10, 3600)
            break
        except LimiterUnavailable:
            await sleep(0.02)
    decided = time.monotonic()
    assert promoted is not None or sentinel_redis.role(replica) == "master"
    promoted = promoted if promoted is not None else decided
    assert decided - promoted < 2.0, f"first decision {decided - promoted:.2f}s after promotion"
    assert limiter.master == f"127.0.0.1:{replica}"
    # What the old master counted reached the replica before it died.
    assert decision.allowed and decision.remaining == 5, decision


@pytest_twisted.ensureDeferred
async def test_limiter_leaves_a_demoted_master(sentinel_redis, sentinel_limiter):
    """When Sentinel hands the master role over while the old one lives on as a replica, the limiter moves to the new master and keeps counting."""
    limiter = sentinel_limiter
    await wait_deciding(limiter)
    first_master = sentinel_redis.ports[0]
    assert (await limiter.check("d", 1000, 3600)).remaining == 999
    assert redis_cli(sentinel_redis.sentinel_ports[0], "SENTINEL", "FAILOVER", MASTER_NAME) == "OK"
    new_master = sentinel_redis.replica_port(first_master)
    deadline = time.monotonic() + 20
    on_new = []
    while len(on_new) < 3:
        assert time.monotonic() < deadline, f"still on {limiter.master}"
        try:
            decision = await limiter.check("d", 1000, 3600)
        except LimiterUnavailable:
            pass  # the connection that met READONLY, or one moving over
        else:
            if limiter.master == f"127.0.0.1:{new_master}":
                on_new.append(decision.remaining)
        await sleep(0.02)
    # Sentinel loses what the old master takes between the promotion and
    # its demotion (asynchronous replication); the new one counts on from
    # what it had, one by one.
    assert on_new[0] <= 998
    assert on_new == list(range(on_new[0], on_new[0] - 3, -1))
    assert sentinel_redis.role(first_master) in ("slave", "master")
