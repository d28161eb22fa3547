"""The request path in memory: a GatewaySite fed raw bytes over a
StringTransport, an upstream client the test answers, and a Clock."""

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web import resource, server
import pytest

from apigw.body import BytesProducer
from apigw.deadlines import Watchdog
from apigw.listener import CannotStart, Listener
from apigw.web import GatewayRequest, HttpDate
from tests.memory_gateway import FakeClient, FakeResponse, connect as _connect, gateway_service as _service


def test_retry_waits_the_jittered_backoff_on_the_injected_clock():
    """When the first attempt answers 503, the retry goes out only after the backoff on the clock, and the client gets the retry's answer."""
    clock, client, records = Clock(), FakeClient(), []
    service = _service(
        "services:\n  svc:\n    url: http://127.0.0.1:9\n    auth: false\n"
        "    rate_limit: null\n    retries: 1\n"
        "settings:\n  backoff_base: 0.4\n  backoff_max: 0.4\n",
        clock, client, jitter=lambda: 0.5)
    service.access_log.record = records.append
    channel, transport = _connect(service.site)
    channel.dataReceived(b"GET /svc/a?b=%2F HTTP/1.1\r\nHost: gw\r\nX-Request-ID: r-1\r\n\r\n")
    [(target, method, path, headers, first)] = client.requests
    # Host is the client's to add, from the target.
    assert (method, path, target.host_header) == (b"GET", b"/a?b=%2F", b"127.0.0.1:9")
    assert b"Host" not in headers
    assert headers[b"X-Request-ID"] == b"r-1" and headers[b"X-Forwarded-For"] == b"10.0.0.7"
    first.callback(FakeResponse(503))
    clock.advance(0.19)
    assert len(client.requests) == 1  # full jitter: 0.5 * 0.4 s
    clock.advance(0.02)
    assert len(client.requests) == 2
    client.requests[1][4].callback(FakeResponse(200, b"hello"))
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nhello")
    assert b"X-Request-ID: r-1\r\n" in answer
    [record] = records
    assert (record["service"], record["status"], record["attempts"]) == ("svc", 200, 2)
    assert record["bytes_sent"] == 5


def test_request_carries_no_state_written_by_other_modules():
    """When a request goes through the whole pipeline, the request object holds only what twisted.web and the request itself set."""
    clock, client = Clock(), FakeClient()
    service = _service(
        "services:\n  svc:\n    url: http://127.0.0.1:9\n    auth: false\n    rate_limit: 5\n",
        clock, client)
    made = []

    class Recording(GatewayRequest):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    service.site.requestFactory = Recording
    service.site.fast_lane = False  # twisted.web's lane (apigw.front has its own test)
    channel, transport = _connect(service.site)
    channel.dataReceived(b"GET /svc/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    client.requests[0][4].callback(FakeResponse(200, b"ok"))
    assert b"RateLimit-Remaining: 4" in transport.value()

    # The same bytes through stock twisted.web: what it sets on a request.
    stock = []

    class Leaf(resource.Resource):
        isLeaf = True

        def render(self, request):
            # The public calls the relay makes, so that what they set counts
            # as twisted.web's own.
            request.registerProducer(BytesProducer(b""), True)
            request.unregisterProducer()
            stock.append(request)
            return b"ok"

    plain = server.Site(Leaf())
    plain_channel = plain.buildProtocol(None)
    plain_channel.makeConnection(StringTransport())
    plain_channel.dataReceived(b"GET /svc/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    twisted_names = set(vars(stock[0])) | set(dir(server.Request))
    # Set by GatewayRequest itself, from what happens on its own connection.
    own = {"request_id", "bytes_sent", "body_length", "client_gone", "_client_ip"}
    assert set(vars(made[0])) - twisted_names <= own
    assert set(vars(made[0])) - twisted_names


def test_watchdog_fires_each_passed_deadline_once_within_its_interval():
    """When a watched item's deadline passes, the watchdog tells it within one interval, and stops ticking once nothing is watched."""
    clock = Clock()
    watchdog = Watchdog(clock, 0.25)
    fired = []

    class Item:
        def __init__(self, deadline):
            self.deadline = deadline

        def check_deadline(self, now):
            if now >= self.deadline:
                fired.append((self, now))
                watchdog.forget(self)

    soon, later = Item(1.0), Item(3.0)
    watchdog.watch(soon)
    watchdog.watch(later)
    clock.advance(0.9)
    assert fired == []
    for _ in range(2):
        clock.advance(0.25)
    assert [item for item, _ in fired] == [soon] and fired[0][1] <= 1.25
    watchdog.forget(later)
    clock.advance(0.25)
    assert clock.getDelayedCalls() == []


def test_http_date_is_formatted_once_per_second():
    """When asked many times within a second, the Date value is the same object; a new second gives a new value."""
    clock = Clock()
    clock.advance(1_700_000_000.2)
    date = HttpDate(clock)
    first = date.now()
    clock.advance(0.5)
    assert date.now() is first and first == b"Tue, 14 Nov 2023 22:13:20 GMT"
    clock.advance(0.5)
    assert date.now() == b"Tue, 14 Nov 2023 22:13:21 GMT"


def test_listener_that_cannot_bind_raises_from_start_service():
    """When the port is taken, starting the listener raises at once with one line naming the port (twistd then exits 1)."""
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory

    taken = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    try:
        listener = Listener(f"tcp:{taken.getHost().port}:interface=127.0.0.1", Factory(),
                            reactor)
        with pytest.raises(CannotStart) as refused:
            listener.startService()
        assert str(refused.value) == (f"cannot listen on tcp:{taken.getHost().port}"
                                      ":interface=127.0.0.1: address already in use")
        assert refused.value.code == 1 and listener.port is None
    finally:
        taken.stopListening()


def test_timeouts_fire_on_time_for_each_deferred_on_one_timer():
    """When Deferreds with different timeouts are under way, each one not fired by its own deadline fails then with what on_timeout makes of it, the others keep their results, and only one timer is ever set."""
    from twisted.internet import defer
    from apigw.deadlines import Timeouts

    clock = Clock()
    timeouts = Timeouts(clock)
    timed_out = []

    def on_timeout(failure, timeout_s):
        timed_out.append(timeout_s)
        return "timed out"

    slow, quick, answered = defer.Deferred(), defer.Deferred(), defer.Deferred()
    results = {}
    for name, d, timeout_s in (("slow", slow, 5.0), ("quick", quick, 2.0),
                               ("answered", answered, 1.0)):
        timeouts.add(d, timeout_s, on_timeout).addBoth(
            lambda result, name=name: results.__setitem__(name, result))
        assert len(clock.getDelayedCalls()) == 1
    answered.callback("ok")
    clock.advance(1.99)
    assert results == {"answered": "ok"}
    clock.advance(0.01)
    assert results == {"answered": "ok", "quick": "timed out"} and timed_out == [2.0]
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(2.99)
    assert "slow" not in results
    clock.advance(0.01)
    assert results["slow"] == "timed out" and timed_out == [2.0, 5.0]
    assert clock.getDelayedCalls() == []
