"""Retries, timeouts, circuit breakers and round robin against real loopback upstreams."""

import hashlib
import socket
import time

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher
from twisted.web import server
from twisted.web.resource import Resource

from apigw.config import Environment, parse_config
from tests.helpers import http, raw_exchange, start_gateway


class _Scripted(Resource):
    """Answers each request with the next scripted action, then `default`:
    an int status, "hang" (held until the test releases it) or "cut"
    (headers and a little body, then the connection dies)."""

    isLeaf = True

    def __init__(self, upstream):
        super().__init__()
        self._up = upstream

    def render(self, request):
        up = self._up
        body = request.content.read()
        up.hits.append((request.method, hashlib.sha256(body).hexdigest()))
        up.order.append(up.name)
        action = up.script.pop(0) if up.script else up.default
        if action == "hang":
            up.held.append(request)
            return server.NOT_DONE_YET
        if action == "cut":
            request.setHeader(b"content-length", b"1000")
            request.write(b"x" * 10)
            # Let the partial body leave before the connection dies.
            reactor.callLater(0.05, request.channel.transport.abortConnection)
            return server.NOT_DONE_YET
        request.setResponseCode(action)
        return b"%s says %d" % (up.name.encode(), action)


class Upstream:
    __test__ = False

    def __init__(self, name, script, default, order):
        self.name = name
        self.script = list(script)
        self.default = default
        self.order = order
        self.hits = []
        self.held = []
        site = server.Site(_Scripted(self))
        site.noisy = False
        site.log = lambda request: None
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port.getHost().port}"

    def release(self, code=200):
        for request in self.held:
            if not request._disconnected:
                request.setResponseCode(code)
                request.write(b"released")
                request.finish()
        self.held = []

    def stop(self):
        for request in self.held:
            if not request._disconnected:
                request.channel.transport.abortConnection()
        return self.port.stopListening()


@pytest_twisted.async_yield_fixture
async def upstreams():
    """make(name, script=(), default=200) starts a scripted upstream; all stop afterwards."""
    made = []
    order = []

    def make(name, script=(), default=200):
        up = Upstream(name, script, default, order)
        made.append(up)
        return up

    yield make
    for up in made:
        await up.stop()


@pytest_twisted.async_yield_fixture
async def gateways(tmp_path):
    """start(yaml, **kwargs) -> (service, base URL, access records); all stop afterwards."""
    started = []
    env = Environment(database_url=f"sqlite:///{tmp_path}/gw.db")

    async def start(yaml_text, **kwargs):
        service, base = await start_gateway(yaml_text, env=env, **kwargs)
        records = []
        service.access_log.record = records.append
        started.append(service)
        return service, base, records

    yield start
    for service in started:
        await service.stopService()


def service_yaml(name, urls, **fields):
    fields.setdefault("auth", "false")
    fields.setdefault("rate_limit", "null")
    lines = ["services:", f"  {name}:", f"    urls: [{', '.join(urls)}]"]
    lines += [f"    {k}: {v}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


def with_settings(yaml_text, **settings):
    lines = ["settings:"] + [f"  {k}: {v}" for k, v in settings.items()]
    return yaml_text + "\n".join(lines) + "\n"


FAST = {"backoff_base": 0, "backoff_max": 0}


def sample(service, name, labels):
    return service.metrics.registry.get_sample_value(name, labels)


def refused_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


async def sleep(seconds):
    await deferLater(reactor, seconds, lambda: None)


async def until(predicate, timeout_s=2.0):
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        await sleep(0.01)
    return predicate()


class LogCapture:
    def __init__(self, needle):
        self.needle = needle
        self.events = []

    def __call__(self, event):
        if self.needle in (event.get("log_format") or ""):
            self.events.append(event)

    def __enter__(self):
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self)


# --- retries -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_get_retried_until_success(upstreams, gateways):
    """When a GET meets 503 then 502 then 200, the client gets 200 after three attempts."""
    up = upstreams("a", script=[503, 502], default=200)
    service, base, records = await gateways(
        with_settings(service_yaml("svc", [up.url], retries=2), **FAST)
    )
    reply = await http("GET", base + "/svc/x")
    assert reply.code == 200
    assert len(up.hits) == 3
    assert records[-1]["attempts"] == 3
    assert sample(service, "gateway_upstream_retries_total", {"service": "svc"}) == 2


@pytest_twisted.ensureDeferred
async def test_post_not_retried(upstreams, gateways):
    """When a POST meets a 503, it is not retried and the upstream's 503 reaches the client."""
    up = upstreams("a", script=[503], default=200)
    service, base, records = await gateways(
        with_settings(service_yaml("svc", [up.url], retries=2), **FAST)
    )
    reply = await http("POST", base + "/svc/x", body=b"once")
    assert reply.code == 503
    assert reply.body == b"a says 503"
    assert len(up.hits) == 1
    assert records[-1]["attempts"] == 1
    assert sample(service, "gateway_upstream_retries_total", {"service": "svc"}) is None


@pytest_twisted.ensureDeferred
async def test_post_retried_with_flag_resends_large_body_intact(upstreams, gateways):
    """When retry_non_idempotent is set, a POST is retried and every attempt carries the whole body."""
    up = upstreams("a", script=[503, 504], default=200)
    _, base, _ = await gateways(with_settings(
        service_yaml("svc", [up.url], retries=2, retry_non_idempotent="true"), **FAST
    ))
    body = bytes(range(256)) * 1024  # 256 KiB: streamed from a file, not one write
    reply = await http("POST", base + "/svc/x", body=body)
    assert reply.code == 200
    expected = hashlib.sha256(body).hexdigest()
    assert up.hits == [(b"POST", expected)] * 3


@pytest_twisted.ensureDeferred
async def test_last_attempt_503_passes_through(upstreams, gateways):
    """When every attempt gets 503, the client sees the upstream's own last 503."""
    up = upstreams("a", default=503)
    _, base, records = await gateways(
        with_settings(service_yaml("svc", [up.url], retries=2), **FAST)
    )
    reply = await http("GET", base + "/svc/x")
    assert reply.code == 503
    assert reply.body == b"a says 503"
    assert len(up.hits) == 3
    assert records[-1]["attempts"] == 3


@pytest_twisted.ensureDeferred
async def test_refusing_upstream_is_502_after_retries(gateways):
    """When the upstream refuses connections, the client gets a JSON 502 after all attempts."""
    service, base, records = await gateways(
        with_settings(service_yaml("svc", [refused_url()], retries=2), **FAST)
    )
    reply = await http("GET", base + "/svc/x")
    assert reply.code == 502
    assert reply.header(b"content-type") == "application/json"
    assert records[-1]["attempts"] == 3
    assert sample(service, "gateway_upstream_retries_total", {"service": "svc"}) == 2


@pytest_twisted.ensureDeferred
async def test_retry_waits_backoff_on_the_reactor(upstreams, gateways):
    """When backoff is configured, retries wait for it without blocking other requests."""
    up = upstreams("a", script=[503], default=200)
    service, base, _ = await gateways(with_settings(
        service_yaml("svc", [up.url], retries=1), backoff_base=0.3, backoff_max=0.3
    ), jitter=lambda: 1.0)
    started = time.monotonic()
    slow = ensureDeferred(http("GET", base + "/svc/x"))
    await until(lambda: len(up.hits) == 1)
    t0 = time.monotonic()
    health = await http("GET", base + "/healthz")
    assert health.code == 200 and time.monotonic() - t0 < 0.2
    reply = await slow
    assert reply.code == 200
    assert time.monotonic() - started >= 0.3


@pytest_twisted.ensureDeferred
async def test_hanging_upstream_is_504_and_connection_dropped(upstreams, gateways):
    """When the upstream never answers, each attempt times out, the client gets 504 and no connection lingers."""
    up = upstreams("a", default="hang")
    _, base, records = await gateways(
        with_settings(service_yaml("svc", [up.url], retries=1, timeout=0.2), **FAST)
    )
    started = time.monotonic()
    reply = await http("GET", base + "/svc/x")
    assert reply.code == 504
    assert 0.4 <= time.monotonic() - started < 2
    assert len(up.hits) == 2
    assert records[-1]["attempts"] == 2
    assert await until(lambda: all(r._disconnected for r in up.held))


@pytest_twisted.ensureDeferred
async def test_healthz_fast_while_upstream_hangs(upstreams, gateways):
    """When an upstream hangs, /healthz and other services still answer at once."""
    stuck = upstreams("stuck", default="hang")
    fine = upstreams("fine", default=200)
    _, base, _ = await gateways(
        service_yaml("slow", [stuck.url], timeout=2, retries=0)
        + service_yaml("fast", [fine.url]).replace("services:\n", "")
    )
    pending = ensureDeferred(http("GET", base + "/slow/x"))
    assert await until(lambda: len(stuck.hits) == 1)
    started = time.monotonic()
    health = await http("GET", base + "/healthz")
    assert health.code == 200
    assert time.monotonic() - started < 0.05
    other = await http("GET", base + "/fast/x")
    assert other.code == 200
    assert not pending.called
    stuck.release()
    assert (await pending).code == 200


@pytest_twisted.ensureDeferred
async def test_mid_response_close_not_retried(upstreams, gateways):
    """When the upstream dies after the client got bytes, nothing is retried and the failure counts on the breaker."""
    up = upstreams("a", default="cut")
    _, base, _ = await gateways(with_settings(
        service_yaml("svc", [up.url], retries=2),
        breaker_failure_threshold=1, breaker_min_requests=1, breaker_recovery_time=30, **FAST,
    ))
    port = int(base.rsplit(":", 1)[1])
    data = await raw_exchange(port, b"GET /svc/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200")
    assert len(up.hits) == 1
    reply = await http("GET", base + "/svc/x")
    assert reply.code == 503
    assert len(up.hits) == 1


@pytest_twisted.ensureDeferred
async def test_client_leaving_stops_attempts_without_blaming_target(upstreams, gateways):
    """When the client disconnects while an attempt hangs, no retry follows and the breaker stays closed."""
    up = upstreams("a", default="hang")
    service, base, _ = await gateways(with_settings(
        service_yaml("svc", [up.url], retries=2, timeout=5),
        breaker_failure_threshold=1, breaker_min_requests=1, breaker_recovery_time=30, **FAST,
    ))
    port = int(base.rsplit(":", 1)[1])
    client = await connectProtocol(
        TCP4ClientEndpoint(reactor, "127.0.0.1", port), Protocol()
    )
    client.transport.write(b"GET /svc/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert await until(lambda: len(up.hits) == 1)
    client.transport.abortConnection()
    assert await until(lambda: all(r._disconnected for r in up.held))
    await sleep(0.1)
    assert len(up.hits) == 1
    labels = {"service": "svc", "target": up.url}
    assert sample(service, "gateway_circuit_breaker_state", labels) == 0
    up.default = 200
    assert (await http("GET", base + "/svc/x")).code == 200


# --- circuit breaker ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_open_breaker_fails_fast_without_upstream_contact(upstreams, gateways):
    """When failures reach the threshold, the next request gets 503 with Retry-After and no upstream hit."""
    up = upstreams("a", default=503)
    clock = Clock()
    service, base, _ = await gateways(with_settings(
        service_yaml("svc", [up.url], retries=0),
        breaker_failure_threshold=2, breaker_min_requests=1, breaker_recovery_time=30,
    ), clock=clock)
    with LogCapture("circuit breaker") as logged:
        for _ in range(2):
            assert (await http("GET", base + "/svc/x")).code == 503
        clock.advance(10.5)
        reply = await http("GET", base + "/svc/x")
    assert len(up.hits) == 2
    assert reply.code == 503
    assert reply.header(b"retry-after") == "20"
    assert "circuit" in reply.json()["error"]
    assert [(e["old"], e["new"]) for e in logged.events] == [("closed", "open")]
    gauge = sample(service, "gateway_circuit_breaker_state", {"service": "svc", "target": up.url})
    assert gauge == 1


@pytest_twisted.ensureDeferred
async def test_every_retry_counts_toward_breaker(upstreams, gateways):
    """When retries of one request reach the threshold, the breaker opens mid-request and later requests never reach the upstream."""
    up = upstreams("a", default=502)
    _, base, records = await gateways(with_settings(
        service_yaml("svc", [up.url], retries=5),
        breaker_failure_threshold=2, breaker_min_requests=1, breaker_recovery_time=30, **FAST,
    ))
    first = await http("GET", base + "/svc/x")
    assert first.code == 502
    assert first.body == b"a says 502"  # the last attempt's own answer
    assert len(up.hits) == 2
    assert records[-1]["attempts"] == 2
    second = await http("GET", base + "/svc/x")
    assert second.code == 503
    assert len(up.hits) == 2


@pytest_twisted.ensureDeferred
async def test_half_open_lets_exactly_one_probe_through(upstreams, gateways):
    """When the recovery time passes, one probe reaches the upstream, concurrent requests get 503, and its success closes the breaker."""
    up = upstreams("a", script=[503], default="hang")
    clock = Clock()
    service, base, _ = await gateways(with_settings(
        service_yaml("svc", [up.url], retries=0, timeout=5),
        breaker_failure_threshold=1, breaker_min_requests=1, breaker_recovery_time=30,
    ), clock=clock)
    assert (await http("GET", base + "/svc/x")).code == 503
    clock.advance(30)
    labels = {"service": "svc", "target": up.url}
    assert sample(service, "gateway_circuit_breaker_state", labels) == 2
    probe = ensureDeferred(http("GET", base + "/svc/x"))
    assert await until(lambda: len(up.hits) == 2)
    others = [await http("GET", base + "/svc/x") for _ in range(3)]
    assert [r.code for r in others] == [503, 503, 503]
    assert all(r.header(b"retry-after") == "1" for r in others)
    assert len(up.hits) == 2
    up.release(200)
    assert (await probe).code == 200
    assert sample(service, "gateway_circuit_breaker_state", labels) == 0
    up.default = 200
    assert (await http("GET", base + "/svc/x")).code == 200
    assert len(up.hits) == 3


@pytest_twisted.ensureDeferred
async def test_failed_probe_reopens(upstreams, gateways):
    """When the half-open probe fails, the breaker opens again for a full recovery time."""
    up = upstreams("a", default=503)
    clock = Clock()
    _, base, _ = await gateways(with_settings(
        service_yaml("svc", [up.url], retries=0),
        breaker_failure_threshold=1, breaker_min_requests=1, breaker_recovery_time=30,
    ), clock=clock)
    await http("GET", base + "/svc/x")
    clock.advance(30)
    assert (await http("GET", base + "/svc/x")).code == 503
    assert len(up.hits) == 2
    reply = await http("GET", base + "/svc/x")
    assert reply.header(b"retry-after") == "30"
    assert len(up.hits) == 2


@pytest_twisted.ensureDeferred
async def test_breaker_survives_reload_for_unchanged_target(upstreams, gateways, tmp_path):
    """When the config is reloaded with the same target, its open breaker stays open."""
    up = upstreams("a", default=503)
    other = upstreams("b", default=200)
    clock = Clock()
    settings = {"breaker_failure_threshold": 1, "breaker_min_requests": 1, "breaker_recovery_time": 30}
    service, base, _ = await gateways(
        with_settings(service_yaml("svc", [up.url], retries=0), **settings), clock=clock
    )
    await http("GET", base + "/svc/x")
    env = Environment(database_url=f"sqlite:///{tmp_path}/gw.db")
    reloaded = with_settings(
        service_yaml("svc", [up.url], retries=1, timeout=3)
        + service_yaml("new", [other.url]).replace("services:\n", ""),
        **settings,
    )
    service.apply_config(parse_config(reloaded, "test.yaml", env))
    reply = await http("GET", base + "/svc/x")
    assert reply.code == 503 and reply.header(b"retry-after") == "30"
    assert len(up.hits) == 1
    assert (await http("GET", base + "/new/x")).code == 200


# --- several targets -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_round_robin_across_two_upstreams(upstreams, gateways):
    """When a service has two urls, requests alternate between them."""
    a = upstreams("a")
    b = upstreams("b")
    _, base, _ = await gateways(service_yaml("svc", [a.url, b.url]))
    for _ in range(4):
        assert (await http("GET", base + "/svc/x")).code == 200
    assert a.order == ["a", "b", "a", "b"]


@pytest_twisted.ensureDeferred
async def test_retry_goes_to_the_other_target(upstreams, gateways):
    """When a target fails and plain rotation would hand it out again, the retry still goes to the other target."""
    a = upstreams("a", script=[503], default=200)
    b = upstreams("b", default=200)
    service, base, records = await gateways(with_settings(
        service_yaml("svc", [a.url, b.url], retries=1), backoff_base=0.3, backoff_max=0.3,
    ), jitter=lambda: 1.0)
    first = ensureDeferred(http("GET", base + "/svc/x"))
    assert await until(lambda: len(a.hits) == 1)
    # While the first request waits out its backoff, another takes b, so
    # rotation points at a again.
    assert (await http("GET", base + "/svc/y")).code == 200
    assert (await first).code == 200
    assert a.order == ["a", "b", "b"]
    assert records[-1]["attempts"] == 2


@pytest_twisted.ensureDeferred
async def test_open_target_skipped_in_rotation(upstreams, gateways):
    """When one target's breaker is open, every request goes to the other one."""
    a = upstreams("a", default=503)
    b = upstreams("b", default=200)
    clock = Clock()
    _, base, _ = await gateways(with_settings(
        service_yaml("svc", [a.url, b.url], retries=0),
        breaker_failure_threshold=1, breaker_min_requests=1, breaker_recovery_time=30,
    ), clock=clock)
    codes = [(await http("GET", base + "/svc/x")).code for _ in range(5)]
    assert codes == [503, 200, 200, 200, 200]
    assert a.order == ["a", "b", "b", "b", "b"]
