"""Rate limiting through the gateway: real HTTP, real upstream, real Redis."""

import subprocess
import time
import uuid

import attr
import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool

from apigw.config import Environment
from tests.helpers import (
    Reply, assert_no_secrets, free_port, http, run_twistd, start_gateway, wait_for_port,
)
from tests.ratelimit_support import PrivateRedis, delete_keys, sleep
from tests.upstreams import TestUpstream, refused_url

HEADER_NAMES = (
    "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "RateLimit-Policy",
    "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset",
)
TWO_PROCESS_DB = 11


@pytest_twisted.async_yield_fixture
async def upstream():
    up = TestUpstream().start()
    yield up
    await up.stop()


def gateway_yaml(services, **settings):
    lines = ["services:"]
    for name, fields in services.items():
        lines.append(f"  {name}:")
        lines.extend(f"    {key}: {value}" for key, value in fields.items())
    lines.append("settings:")
    settings.setdefault("rate_period", 60)
    lines.extend(f"  {key}: {value}" for key, value in settings.items())
    return "\n".join(lines) + "\n"


def public(url, rate_limit, **extra):
    return {"url": url, "auth": "false", "rate_limit": rate_limit, "retries": 0, **extra}


@pytest_twisted.async_yield_fixture
async def gateway_factory(tmp_path):
    started = []

    async def make(yaml_text, env=None, clock=None):
        # The key store's SQLite file goes to tmp_path, not the working directory.
        env = attr.evolve(env or Environment(), database_url=f"sqlite:///{tmp_path}/gw.db")
        service, base = await start_gateway(yaml_text, env=env, clock=clock or Clock())
        started.append(service)
        deadline = time.monotonic() + 5
        while not service.key_store.ready:
            assert time.monotonic() < deadline, "key store not ready"
            await sleep(0.02)
        return service, base

    yield make
    for service in started:
        await service.stopService()


async def get_from(url, source):
    """A GET whose connection comes from the loopback address `source`."""
    agent = Agent(reactor, bindAddress=(source, 0), pool=HTTPConnectionPool(reactor, False))
    response = await agent.request(b"GET", url.encode())
    return Reply(response.code, response.headers, await treq.content(response))


def limit_headers(reply):
    return {name: reply.header(name.encode()) for name in HEADER_NAMES}


def rate_limited_count(service, name):
    value = service.metrics.registry.get_sample_value(
        "gateway_rate_limited_total", {"service": name}
    )
    return value or 0


@pytest_twisted.ensureDeferred
async def test_over_the_limit_is_a_json_429_with_retry_after(gateway_factory, upstream):
    """When a client exceeds its limit, it gets a JSON 429 with Retry-After and the upstream sees nothing."""
    clock = Clock()
    clock.advance(30)
    service, base = await gateway_factory(
        gateway_yaml({"a": public(upstream.url, 3)}), clock=clock
    )
    replies = [await http("GET", base + "/a/x") for _ in range(4)]
    assert [r.code for r in replies] == [200, 200, 200, 429]
    assert [r.header(b"RateLimit-Remaining") for r in replies] == ["2", "1", "0", "0"]
    refused = replies[3]
    assert refused.header(b"Content-Type") == "application/json"
    body = refused.json()
    assert "rate limit" in body["error"] and body["request_id"] == refused.header(b"X-Request-ID")
    assert refused.header(b"Retry-After") == "30"
    assert limit_headers(refused) == {
        "RateLimit-Limit": "3", "RateLimit-Remaining": "0", "RateLimit-Reset": "30",
        "RateLimit-Policy": "3;w=60", "X-RateLimit-Limit": "3",
        "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "30",
    }
    assert len(upstream.requests) == 3
    assert rate_limited_count(service, "a") == 1

    clock.advance(30)  # the window ends
    again = await http("GET", base + "/a/x")
    assert again.code == 200 and again.header(b"RateLimit-Remaining") == "2"


@pytest_twisted.ensureDeferred
async def test_every_response_of_a_limited_service_carries_the_headers(gateway_factory, upstream):
    """When a limited service answers with the upstream's status or a gateway error, the headers agree."""
    clock = Clock()
    clock.advance(10)
    _, base = await gateway_factory(gateway_yaml({
        "a": public(upstream.url, 5),
        "dead": public(refused_url(), 5),
    }), clock=clock)
    ok = await http("GET", base + "/a/x")
    upstream_error = await http("GET", base + "/a/status?code=500")
    gateway_error = await http("GET", base + "/dead/x")
    assert (ok.code, upstream_error.code, gateway_error.code) == (200, 500, 502)
    assert limit_headers(ok) == {
        "RateLimit-Limit": "5", "RateLimit-Remaining": "4", "RateLimit-Reset": "50",
        "RateLimit-Policy": "5;w=60", "X-RateLimit-Limit": "5",
        "X-RateLimit-Remaining": "4", "X-RateLimit-Reset": "50",
    }
    assert upstream_error.header(b"X-RateLimit-Remaining") == "3"
    assert gateway_error.header(b"RateLimit-Remaining") == "4"
    assert ok.header(b"Retry-After") is None


@pytest_twisted.ensureDeferred
async def test_unlimited_service_has_no_limit_and_no_headers(gateway_factory, upstream):
    """When a service says rate_limit: null, nothing is limited and no rate-limit header is sent."""
    _, base = await gateway_factory(gateway_yaml({"free": public(upstream.url, "null")}))
    replies = [await http("GET", base + "/free/x") for _ in range(5)]
    assert all(r.code == 200 for r in replies)
    assert all(v is None for r in replies for v in limit_headers(r).values())


@pytest_twisted.ensureDeferred
async def test_budgets_are_per_service_and_per_client_ip(gateway_factory, upstream):
    """When one client exhausts one service, other services and other clients keep their budgets."""
    _, base = await gateway_factory(gateway_yaml({
        "a": public(upstream.url, 2),
        "b": public(upstream.url, 2),
    }))
    first = [(await get_from(base + "/a/x", "127.0.0.1")).code for _ in range(3)]
    other_service = [(await get_from(base + "/b/x", "127.0.0.1")).code for _ in range(3)]
    other_client = [(await get_from(base + "/a/x", "127.0.0.2")).code for _ in range(3)]
    assert first == other_service == other_client == [200, 200, 429]


@pytest_twisted.ensureDeferred
async def test_budgets_are_per_key_and_a_key_limit_replaces_the_service_limit(
    gateway_factory, upstream
):
    """When keys share a service, each has its own budget, and a key's rate_limit overrides the service's."""
    service, base = await gateway_factory(
        gateway_yaml({"keyed": {"url": upstream.url, "rate_limit": 2, "retries": 0}})
    )
    _, key_a = await service.key_store.create_key("alice")
    _, key_b = await service.key_store.create_key("bob")
    _, key_c = await service.key_store.create_key("carol", rate_limit=4)

    async def codes(key, n):
        return [(await http("GET", base + "/keyed/x", {b"X-API-Key": key.encode()})).code
                for _ in range(n)]

    assert await codes(key_a, 3) == [200, 200, 429]
    assert await codes(key_b, 3) == [200, 200, 429]
    assert await codes(key_c, 5) == [200, 200, 200, 200, 429]
    carol = await http("GET", base + "/keyed/x", {b"X-API-Key": key_c.encode()})
    assert carol.header(b"RateLimit-Limit") == "4"
    assert carol.header(b"RateLimit-Policy") == "4;w=60"


@pytest_twisted.ensureDeferred
async def test_sliding_window_setting_weighs_the_previous_window(gateway_factory, upstream):
    """When the config picks sliding_window, a full window still counts against the next one."""
    clock = Clock()
    yaml_text = gateway_yaml(
        {"a": public(upstream.url, 4)}, rate_period=10, rate_limit_algorithm="sliding_window"
    )
    _, base = await gateway_factory(yaml_text, clock=clock)
    assert [(await http("GET", base + "/a/x")).code for _ in range(4)] == [200] * 4
    clock.advance(15)  # half of the next window: the previous 4 weigh 2
    codes = [(await http("GET", base + "/a/x")).code for _ in range(4)]
    assert codes == [200, 200, 429, 429]


def warnings_from(events, namespace="apigw.ratelimit.RateLimiting"):
    return [
        e for e in events
        if e.get("log_namespace") == namespace and e["log_level"].name == "warn"
    ]


@pytest.fixture
def log_events():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path)
    yield server
    server.stop()


@pytest_twisted.ensureDeferred
async def test_redis_down_fails_open_then_recovers(
    gateway_factory, upstream, private_redis, log_events
):
    """When Redis is down and the policy is open, requests pass (logged once) and limits return with Redis."""
    env = Environment(redis_url=private_redis.redis_url)
    service, base = await gateway_factory(
        gateway_yaml({"a": public(upstream.url, 3)}), env=env, clock=reactor
    )
    replies = [await http("GET", base + "/a/x") for _ in range(5)]
    assert [r.code for r in replies] == [200] * 5
    assert all(r.header(b"RateLimit-Limit") is None for r in replies)
    assert service.rate_limiting.failures == 5
    assert len(warnings_from(log_events)) == 1
    ready = await http("GET", base + "/readyz")
    assert ready.code == 503 and "redis" in ready.json()["down"]

    private_redis.start()
    deadline = time.monotonic() + 8
    while (await http("GET", base + "/readyz")).code != 200:
        assert time.monotonic() < deadline, "gateway did not reconnect to Redis"
        await sleep(0.05)
    codes = [(await http("GET", base + "/a/x")).code for _ in range(4)]
    assert codes in ([200, 200, 200, 429], [200] * 4)  # [200]*4 only if the minute turned
    assert (await http("GET", base + "/a/x")).header(b"RateLimit-Limit") == "3"


@pytest_twisted.ensureDeferred
async def test_redis_down_fails_closed_with_503(gateway_factory, upstream, private_redis):
    """When Redis is down and the policy is closed, the gateway answers 503 JSON without contacting the upstream."""
    env = Environment(redis_url=private_redis.redis_url)
    _, base = await gateway_factory(
        gateway_yaml({"a": public(upstream.url, 3)}, rate_limit_failure="closed"),
        env=env, clock=reactor,
    )
    reply = await http("GET", base + "/a/x")
    assert reply.code == 503
    assert "rate limiter" in reply.json()["error"]
    assert upstream.requests == []


# --- two real gateway processes sharing Redis --------------------------------


async def redis_seconds():
    out = await deferToThread(
        subprocess.run, ["redis-cli", "TIME"], capture_output=True, text=True, timeout=5
    )
    seconds, micros = out.stdout.split()
    return int(seconds) + int(micros) / 1e6


@pytest.fixture
def twistd_pair(tmp_path):
    processes = []

    def start(yaml_text, env):
        config = tmp_path / "gateway_config.yaml"
        config.write_text(yaml_text)
        ports = [free_port(), free_port()]
        for port in ports:
            processes.append(run_twistd(
                ["--config", str(config), "--port", f"tcp:{port}:interface=127.0.0.1"],
                cwd=str(tmp_path), env=env,
            ))
        for port, process in zip(ports, processes):
            wait_for_port(port, proc=process)
        return [f"http://127.0.0.1:{port}" for port in ports]

    yield start
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            out, err = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate(timeout=5)
        assert_no_secrets(out + err, "twistd output")


@pytest_twisted.ensureDeferred
async def test_two_gateway_processes_share_one_limit(upstream, twistd_pair):
    """When 60 requests race through two gateway processes sharing Redis with limit 20, exactly 20 pass."""
    name = f"shared_{uuid.uuid4().hex[:12]}"
    yaml_text = gateway_yaml({name: public(upstream.url, 20)}, rate_period=3600)
    env = {"REDIS_URL": f"redis://127.0.0.1:6379/{TWO_PROCESS_DB}", "DEBUG": "false"}
    env = {**env, "DATABASE_URL": "sqlite:///apigw.db"}
    try:
        bases = await deferToThread(twistd_pair, yaml_text, env)
        deadline = time.monotonic() + 15
        for base in bases:
            while (await http("GET", base + "/readyz")).code != 200:
                assert time.monotonic() < deadline, "gateway never became ready"
                await sleep(0.1)
        now = await redis_seconds()
        if 3600 - now % 3600 < 3:  # keep the burst inside one window
            await sleep(3600 - now % 3600 + 0.1)
        replies = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(http("GET", f"{bases[i % 2]}/{name}/x"))
             for i in range(60)],
            consumeErrors=True,
        )
        codes = [r.code for r in replies]
        assert codes.count(200) == 20 and codes.count(429) == 40
        assert len(upstream.requests) == 20
        remaining = sorted(int(r.header(b"RateLimit-Remaining")) for r in replies if r.code == 200)
        assert remaining == list(range(20))
    finally:
        await deferToThread(delete_keys, TWO_PROCESS_DB, f"apigw:rl:{name}:*")
