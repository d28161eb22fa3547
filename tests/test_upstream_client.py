"""apigw.upstream_client: framing, pooling and the connection state in
memory, then differential tests of FastAgent against twisted.web.client.Agent
over real loopback servers."""

import hashlib
import socket

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, ssl, task
from twisted.internet.error import ConnectError, ConnectionClosed, ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    PotentialDataLoss,
    RequestGenerationFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from apigw.config import Target
from apigw.upstream_client import ConnectionPool, FastAgent, UpstreamConnection
from apigw.upstream_client import response as response_module
from apigw.upstream_client.connection import (
    CLOSING,
    LOST,
    QUIESCENT,
    RECEIVING,
    STATES,
    TRANSMITTING,
    TRANSMITTING_AFTER_RESPONSE,
    UPGRADED,
    WAITING,
)
from tests.upstream_client_support import (
    BIG,
    Bytes,
    Collect,
    CountingSite,
    MemoryEndpoint,
    ScriptedServer,
    Stream,
    firehose,
    reply,
    self_signed,
)
from tests.upstreams import RawUpstream, refused_url

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
MB = 1024 * 1024


# In memory: one MemoryEndpoint, StringTransports, a clock.


def _memory_pool():
    """A pool on a MemoryReactorClock whose every connection goes to one
    MemoryEndpoint; `clock`, `endpoint` and `built` (the endpoints asked
    for) ride along for the test."""
    clock = MemoryReactorClock()
    endpoint = MemoryEndpoint()
    built = []

    def endpoint_for(scheme, host, port):
        built.append((scheme, host, port))
        return endpoint

    pool = ConnectionPool(clock, max_idle_per_target=2, idle_timeout_s=30,
                          endpoint_for=endpoint_for)
    pool.clock, pool.endpoint, pool.built = clock, endpoint, built
    return pool


@pytest.fixture
def mem():
    pool = _memory_pool()
    agent = FastAgent(pool.clock, pool)
    agent.clock, agent.endpoint, agent.built = pool.clock, pool.endpoint, pool.built
    return agent


def start(agent, method=b"GET", uri=b"http://up.example/p", headers=None, body=None):
    results = []
    agent.request(method, uri, headers, body).addBoth(results.append)
    return results


def answer(agent, raw, n=-1):
    proto, transport = agent.endpoint.connections[n]
    proto.dataReceived(raw)
    return transport


def body_of(response):
    collector = Collect()
    response.deliverBody(collector)
    return collector


SWITCH = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
          b"Connection: Upgrade\r\nSec-WebSocket-Accept: abc\r\n\r\n")


def test_101_to_an_upgrade_leaves_the_pool_for_whoever_takes_it_over(mem):
    """When a request that asked to upgrade gets 101 with bytes behind it, the
    response is the 101, take_over() gets those bytes, later ones and the end,
    and the connection never goes back to the pool."""
    results = start(mem, headers=Headers({b"Connection": [b"Upgrade"],
                                          b"Upgrade": [b"websocket"]}))
    proto, transport = mem.endpoint.connections[0]
    proto.dataReceived(SWITCH + b"\x81\x02hi")
    start(mem)
    assert len(mem.endpoint.connections) == 2  # not back in the pool, even before take_over
    [response] = results
    assert response.code == 101 and proto.state is UPGRADED
    assert (b"Upgrade", b"websocket") in response.raw_headers
    taker = Collect()
    response.take_over(taker)
    proto.dataReceived(b"\x81\x03you")
    assert b"".join(taker.chunks) == b"\x81\x02hi\x81\x03you"
    assert taker.transport is transport
    proto.connectionLost(Failure(ConnectionDone()))
    assert taker.done.called
    start(mem)
    assert len(mem.endpoint.connections) == 3  # nor after it ended


def test_101_that_was_not_asked_for_fails_the_request(mem):
    """When a plain request gets 101, the request fails and the connection goes."""
    results = start(mem)
    answer(mem, SWITCH)
    assert isinstance(results[0], Failure) and results[0].check(ResponseFailed)
    assert mem.endpoint.connections[0][0].state is CLOSING


def test_request_line_keeps_raw_target_and_adds_host(mem):
    """When a target has odd but legal bytes, they go out unchanged with Host from the URI."""
    agent = mem
    start(agent, uri=b"http://up.example:8080/a%2Fb/c;p=1?x=%2F&y=a+b&&z=\xc3\xa9",
          headers=Headers({b"X-Test": [b"1", b"2"]}))
    sent = agent.endpoint.connections[0][1].value()
    assert sent == (b"GET /a%2Fb/c;p=1?x=%2F&y=a+b&&z=\xc3\xa9 HTTP/1.1\r\n"
                    b"Host: up.example:8080\r\nX-Test: 1\r\nX-Test: 2\r\n\r\n")


def test_host_from_headers_wins_and_default_port_is_left_out(mem):
    """When the headers carry Host it is sent once as given; otherwise :80 is not shown."""
    start(mem, headers=Headers({b"Host": [b"api.example"]}), uri=b"http://10.0.0.1:80/x")
    sent = mem.endpoint.connections[0][1].value()
    assert sent.count(b"Host:") == 1 and b"Host: api.example\r\n" in sent
    start(mem, uri=b"http://up.example:80")
    assert mem.endpoint.connections[1][1].value().startswith(
        b"GET / HTTP/1.1\r\nHost: up.example\r\n")


@pytest.mark.parametrize("method, body, framing", [
    (b"GET", None, None),
    (b"POST", None, b"Content-Length: 0"),
    (b"PUT", Bytes(b"abc"), b"Content-Length: 3"),
    (b"POST", Bytes(b"abc", known_length=False), b"Transfer-Encoding: chunked"),
])
def test_body_framing_is_ours(mem, method, body, framing):
    """When a body is known, unknown or absent, the framing header says so and callers' copies are dropped."""
    headers = Headers({b"Content-Length": [b"999"], b"Transfer-Encoding": [b"gzip"]})
    start(mem, method=method, headers=headers, body=body)
    sent = mem.endpoint.connections[0][1].value()
    head, _, rest = sent.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")[1:]
    assert [l for l in lines if l.split(b":")[0] in (b"Content-Length", b"Transfer-Encoding")] == \
        ([framing] if framing else [])
    if body is not None:
        assert rest == (b"3\r\nabc\r\n0\r\n\r\n" if body.length is UNKNOWN_LENGTH else b"abc")


def test_producer_writing_the_wrong_length_fails_the_request(mem):
    """When a producer writes fewer bytes than its length, the request fails and the connection is dropped."""
    body = Bytes(b"abc")
    body.length = 5
    results = start(mem, method=b"PUT", body=body)
    assert isinstance(results[0], Failure) and results[0].check(RequestGenerationFailed)
    assert mem.endpoint.connections[0][1].disconnected


def test_endpoint_built_once_per_target(mem):
    """When many requests go to one scheme://host:port, its endpoint is built once."""
    for uri in (b"http://up.example/a", b"http://up.example/b?c", b"http://up.example:80/d"):
        start(mem, uri=uri)
    start(mem, uri=b"http://other.example/a")
    assert mem.built == [(b"http", b"up.example", 80), (b"http", b"other.example", 80)]


def test_idle_connections_reused_lifo_and_capped(mem):
    """When connections come back they are reused newest first, and beyond the cap the oldest closes."""
    pending = [start(mem) for _ in range(3)]
    transports = [answer(mem, OK, n) for n in range(3)]
    assert all(isinstance(p[0].code, int) for p in pending)
    assert transports[0].disconnecting and not transports[1].disconnecting
    assert mem.pool.idle_count(mem.target_for(b"http://up.example")) == 2
    start(mem)
    assert len(mem.endpoint.connections) == 3
    assert transports[2].value().count(b"GET") == 2


def test_idle_timeout_closes_connections(mem):
    """When a pooled connection stays idle past the timeout, it is closed."""
    start(mem)
    transport = answer(mem, OK)
    mem.clock.advance(29)
    assert not transport.disconnecting
    mem.clock.advance(2)
    assert transport.disconnecting
    assert mem.pool.idle_count(mem.target_for(b"http://up.example")) == 0


@pytest.mark.parametrize("raw, headers", [
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", None),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", None),
    (OK, Headers({b"Connection": [b"Close"]})),
])
def test_connection_not_reused_when_either_side_says_close(mem, raw, headers):
    """When the response or request says close, or the upstream speaks HTTP/1.0, the connection is closed."""
    results = start(mem, headers=headers)
    transport = answer(mem, raw)
    assert body_of(results[0]).complete
    assert transport.disconnecting
    assert mem.pool.idle_count(mem.target_for(b"http://up.example")) == 0


def test_head_answer_with_length_ends_at_headers(mem):
    """When a HEAD answer announces a length, the response ends at its headers and the connection is reused."""
    results = start(mem, method=b"HEAD")
    answer(mem, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    response = results[0]
    assert (response.code, response.length) == (200, 0)
    assert response.headers.getRawHeaders(b"content-length") == [b"1000"]
    assert body_of(response).complete
    start(mem)
    answer(mem, OK)
    assert len(mem.endpoint.connections) == 1


def test_early_bytes_buffered_then_socket_paused(mem):
    """When body bytes outrun deliverBody, a little is buffered and then the socket is paused until delivery."""
    results = start(mem)
    transport = answer(mem, b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"a" * 40000)
    assert transport.producerState == "producing"
    answer(mem, b"b" * 40000)
    assert transport.producerState == "paused"
    collector = body_of(results[0])
    assert collector.received == 80000 and transport.producerState == "producing"
    collector.transport.pauseProducing()
    assert transport.producerState == "paused"
    collector.transport.resumeProducing()
    answer(mem, b"c" * 120000)
    assert collector.complete and collector.received == 200000


def test_timeout_cancel_aborts_connection(mem):
    """When the caller's addTimeout fires before headers, the connection is aborted and onTimeoutCancel sees a failure."""
    d = mem.request(b"GET", b"http://up.example/q")
    d.addTimeout(5, mem.clock, onTimeoutCancel=lambda r, t: Failure(defer.TimeoutError()))
    failures = []
    d.addErrback(failures.append)
    mem.clock.advance(5)
    assert failures[0].check(defer.TimeoutError)
    assert mem.endpoint.connections[0][1].disconnected


def test_cancel_while_connecting_fails_like_agent(mem):
    """When the caller cancels while connecting, the connect attempt is cancelled and the request fails as Agent's would."""
    mem.endpoint.hang = True
    d = mem.request(b"GET", b"http://up.example/r")
    d.cancel()
    failures = []
    d.addErrback(failures.append)
    assert failures[0].check(ResponseNeverReceived) and not mem.endpoint.pending


def stale(mem, method=b"GET", body=None):
    """A reused connection that dies with no answer to the second request."""
    start(mem)
    answer(mem, OK)
    results = start(mem, method=method, body=body)
    proto, transport = mem.endpoint.connections[0]
    proto.connectionLost(Failure(ConnectionDone()))
    return results


def test_stale_connection_retried_once_on_a_fresh_one(mem):
    """When a reused connection closes before any answer, an idempotent request is resent once on a new connection."""
    body = Bytes(b"data")
    results = stale(mem, method=b"PUT", body=body)
    assert not results and len(mem.endpoint.connections) == 2
    assert mem.endpoint.connections[1][1].value().endswith(b"\r\n\r\ndata")
    answer(mem, OK)
    assert results[0].code == 200 and body.starts == 2


@pytest.mark.parametrize("method, body, why", [
    (b"POST", None, "POST is not idempotent"),
    (b"PUT", Bytes(b"data", restartable=False), "body cannot be sent again"),
])
def test_stale_connection_not_retried_when_unsafe(mem, method, body, why):
    """When a resend could repeat a side effect or lacks its body, the request fails with a clear reason."""
    results = stale(mem, method=method, body=body)
    assert len(mem.endpoint.connections) == 1
    assert results[0].check(ResponseNeverReceived)
    assert why in str(results[0].value)


def test_stale_post_retried_when_the_pool_allows_it(mem):
    """When the pool is told non-idempotent replays are safe, a stale POST is resent once."""
    mem.pool.retry_non_idempotent = True
    results = stale(mem, method=b"POST", body=Bytes(b"form"))
    answer(mem, OK)
    assert results[0].code == 200 and len(mem.endpoint.connections) == 2


def test_early_answer_while_sending_closes_connection(mem):
    """When the upstream answers before the body is sent, the producer stops and the connection is not reused."""
    stream = Stream(10 * MB, clock=mem.clock)
    results = start(mem, method=b"POST", body=stream)
    transport = answer(mem, b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    assert results[0].code == 413 and transport.disconnecting
    mem.clock.advance(0)
    assert stream.sent == 0


def test_bytes_on_an_idle_connection_drop_it(mem):
    """When an idle connection receives bytes nobody asked for, it leaves the pool."""
    start(mem)
    transport = answer(mem, OK + b"HTTP/1.1 200 OK\r\n")
    assert transport.disconnected and mem.pool.idle_count(mem.target_for(b"http://up.example")) == 0


def test_idle_check_sees_a_peer_close_before_sending():
    """When the peer has already closed a pooled socket, the connection is found dead before use."""
    ours, theirs = socket.socketpair()
    conn = UpstreamConnection(None, None)
    transport = StringTransport()
    transport.socket = ours
    conn.makeConnection(transport)
    assert conn.alive()
    theirs.close()
    assert not conn.alive()
    ours.close()


# The pool's own contract: parsed Targets, header pairs, the connection state.


def make_target(host=b"up.example", port=80, base_path=b"", scheme=b"http"):
    shown = host if port == 80 else b"%b:%d" % (host, port)
    return Target(url="http://" + shown.decode() + base_path.decode(), scheme=scheme,
                  host=host, port=port, base_path=base_path, host_header=shown)


@pytest.fixture
def pool():
    return _memory_pool()


def send(pool, target, method=b"GET", path=b"/p", headers=None, body=None):
    results = []
    pool.request(target, method, path, headers, body).addBoth(results.append)
    return results


def test_state_goes_through_its_named_states(pool):
    """When a request with a streamed body is sent and answered, the connection's state walks the named states back to QUIESCENT."""
    target = make_target()
    stream = Stream(100000, clock=pool.clock)
    results = send(pool, target, method=b"PUT", body=stream)
    conn, transport = pool.endpoint.connections[0]
    seen = [conn.state]
    pool.clock.advance(0)
    pool.clock.advance(0)
    seen.append(conn.state)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    seen.append(conn.state)
    body = body_of(results[0])
    conn.dataReceived(b"cd")
    seen.append(conn.state)
    assert seen == [TRANSMITTING, WAITING, RECEIVING, QUIESCENT]
    assert body.complete and pool.idle_count(target) == 1
    assert set(seen) <= set(STATES)


def test_state_after_an_early_answer_and_a_close(pool):
    """When the answer starts before the body is sent it is TRANSMITTING_AFTER_RESPONSE; a close ends in CLOSING, then LOST."""
    stream = Stream(10 * MB, clock=pool.clock)
    results = send(pool, make_target(), method=b"POST", body=stream)
    conn, transport = pool.endpoint.connections[0]
    conn.dataReceived(b"HTTP/1.1 413 Too Large\r\n")
    assert conn.state == TRANSMITTING_AFTER_RESPONSE
    conn.dataReceived(b"Content-Length: 0\r\n\r\n")
    assert conn.state == CLOSING and transport.disconnecting
    assert results[0].code == 413
    conn.connectionLost(Failure(ConnectionDone()))
    assert conn.state == LOST


def test_idle_connection_lost_leaves_the_pool(pool):
    """When a quiescent connection is lost, it tells the pool through its callback and is not handed out again."""
    target = make_target()
    send(pool, target)
    conn, transport = pool.endpoint.connections[0]
    conn.dataReceived(OK)
    assert conn.state == QUIESCENT and pool.idle_count(target) == 1
    conn.connectionLost(Failure(ConnectionDone()))
    assert conn.state == LOST and pool.idle_count(target) == 0
    send(pool, target)
    assert len(pool.endpoint.connections) == 2


def test_connections_keyed_by_equal_targets(pool):
    """When two Targets name the same host and port they share connections only if they are equal."""
    first = make_target(base_path=b"/v1")
    same = make_target(base_path=b"/v1")
    other = make_target(base_path=b"/v2")
    assert first is not same and first == same and first != other
    send(pool, first)
    pool.endpoint.connections[0][0].dataReceived(OK)
    send(pool, same)
    assert len(pool.endpoint.connections) == 1
    pool.endpoint.connections[0][0].dataReceived(OK)
    send(pool, other)
    assert len(pool.endpoint.connections) == 2
    assert pool.idle_count(first) == pool.idle_count(same) == 1
    assert pool.idle_count(other) == 0
    assert pool.built == [(b"http", b"up.example", 80)] * 2


def test_path_goes_out_as_given_and_base_path_is_the_callers(pool):
    """When the pool gets a Target and a path, the request line carries the path byte for byte and Host from the Target."""
    send(pool, make_target(port=8080, base_path=b"/base"), path=b"/a%2Fb?q=\xc3\xa9&&x")
    assert pool.endpoint.connections[0][1].value() == (
        b"GET /a%2Fb?q=\xc3\xa9&&x HTTP/1.1\r\nHost: up.example:8080\r\n\r\n")


@pytest.mark.parametrize("method, path", [
    (b"GET", b"/a b"), (b"GET", b"/a\r\nX: y"), (b"GET", b""), (b"GE T", b"/"),
])
def test_bad_method_or_path_refused_before_connecting(pool, method, path):
    """When the method is not a token or the path holds spaces or controls, the request fails at once."""
    results = send(pool, make_target(), method=method, path=path)
    assert results[0].check(ValueError) and not pool.endpoint.connections


def test_header_pairs_written_as_given(pool):
    """When headers come as (name, value) pairs, they go out in order with their case and duplicates; framing is ours."""
    pairs = [
        (b"x-b", b"1"), (b"X-A", b"2"), (b"x-b", b"3"), (b"content-LENGTH", b"99"),
        (b"TRANSFER-encoding", b"gzip"), (b"Accept", b"*/*"),
    ]
    send(pool, make_target(), method=b"PUT", headers=pairs, body=Bytes(b"abc"))
    assert pool.endpoint.connections[0][1].value() == (
        b"PUT /p HTTP/1.1\r\nHost: up.example\r\nx-b: 1\r\nX-A: 2\r\nx-b: 3\r\n"
        b"Accept: */*\r\nContent-Length: 3\r\n\r\nabc")


def test_header_pairs_with_host_and_close(pool):
    """When the pairs carry a Host in any case it is sent once as given; a Connection: close among them closes after the answer."""
    target = make_target()
    send(pool, target, headers=((b"host", b"api.example"), (b"connection", b"Close")))
    conn, transport = pool.endpoint.connections[0]
    assert transport.value() == (
        b"GET /p HTTP/1.1\r\nhost: api.example\r\nconnection: Close\r\n\r\n")
    conn.dataReceived(OK)
    assert transport.disconnecting and pool.idle_count(target) == 0


@pytest.mark.parametrize("pair", [
    (b"X-Evil", b"1\r\nX-Forged: 2"), (b"X-Evil", b"1\nX-Forged: 2"), (b"X-Evil", b"1\r"),
    (b"X-Evil\r\nX-Forged", b"2"),
])
def test_header_pairs_with_line_breaks_refused(pool, pair):
    """When a pair holds CR or LF, nothing is written, the request fails and the connection stays usable."""
    target = make_target()
    send(pool, target)
    conn, transport = pool.endpoint.connections[0]
    conn.dataReceived(OK)
    transport.clear()
    results = send(pool, target, headers=[(b"Accept", b"*/*"), pair])
    assert results[0].check(ValueError)
    assert transport.value() == b"" and conn.state == QUIESCENT
    assert pool.idle_count(target) == 1


def test_raw_headers_keep_order_case_and_duplicates(pool, monkeypatch):
    """When the answer repeats headers in mixed case, raw_headers has them as received; Headers is built only when asked."""
    built = []
    real = response_module.Headers
    monkeypatch.setattr(response_module, "Headers", lambda: built.append(1) or real())
    results = send(pool, make_target())
    pool.endpoint.connections[0][0].dataReceived(
        b"HTTP/1.1 200 OK\r\nset-cookie: a=1\r\nX-Up: 1\r\nSet-Cookie: b=2\r\n"
        b"x-up: 2\r\ncontent-length: 2\r\n\r\nok")
    response = results[0]
    assert response.raw_headers == [
        (b"set-cookie", b"a=1"), (b"X-Up", b"1"), (b"Set-Cookie", b"b=2"),
        (b"x-up", b"2"), (b"content-length", b"2")]
    assert not built
    assert response.headers.getRawHeaders(b"set-cookie") == [b"a=1", b"b=2"]
    assert response.headers.getRawHeaders(b"x-up") == [b"1", b"2"]
    assert response.headers is response.headers and len(built) == 1


def test_failing_body_producer_fails_the_request(pool):
    """When the body producer fails midway, the request fails with RequestGenerationFailed and the connection is dropped."""
    body = Bytes(b"abcdef")
    started = defer.Deferred()

    def half_then_wait(consumer):
        consumer.write(b"abc")
        return started

    body.startProducing = half_then_wait
    results = send(pool, make_target(), method=b"PUT", body=body)
    conn, transport = pool.endpoint.connections[0]
    assert conn.state == TRANSMITTING and transport.producer is body
    started.errback(Failure(ZeroDivisionError()))
    assert results[0].check(RequestGenerationFailed)
    assert results[0].value.reasons[0].check(ZeroDivisionError)
    assert transport.disconnected and conn.state == CLOSING and transport.producer is None


def test_close_idle_fires_when_idle_connections_are_gone(pool):
    """When close_idle is called, idle connections close and its Deferred fires once they are lost."""
    target = make_target()
    for _ in range(2):
        send(pool, target)
    for conn, transport in pool.endpoint.connections:
        conn.dataReceived(OK)
    assert pool.idle_count(target) == 2 and pool.closeCachedConnections == pool.close_idle
    done = []
    pool.close_idle().addCallback(done.append)
    assert pool.idle_count(target) == 0 and not done
    for conn, transport in pool.endpoint.connections:
        assert transport.disconnecting and conn.state == CLOSING
        conn.connectionLost(Failure(ConnectionDone()))
    assert done == [None]


# Loopback: the same requests through Agent and FastAgent.


@pytest_twisted.async_yield_fixture
async def agents():
    agent_pool = HTTPConnectionPool(reactor, persistent=True)
    fast_pool = ConnectionPool(reactor)
    yield Agent(reactor, pool=agent_pool), FastAgent(reactor, fast_pool)
    await agent_pool.closeCachedConnections()
    await fast_pool.closeCachedConnections()


@pytest_twisted.async_yield_fixture
async def site():
    s = CountingSite().start()
    yield s
    await s.stop()


_CONTROL = {b"content-length", b"connection", b"keep-alive", b"te", b"trailers",
            b"transfer-encoding", b"upgrade", b"proxy-connection", b"date"}


def within(d, seconds=10):
    return d.addTimeout(seconds, reactor)


async def fetch(agent, method, url, headers=None, body=None):
    response = await within(agent.request(method, url, Headers(headers or {}), body))
    data, reason = await within(body_of(response).done)
    return {
        "code": response.code, "phrase": response.phrase, "version": response.version,
        "headers": sorted((k.lower(), tuple(v)) for k, v in response.headers.getAllRawHeaders()
                          if k.lower() not in _CONTROL),
        "length": response.length, "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(), "ending": reason.type,
    }


RAW_ROUTES = {
    b"/close-delimited": reply(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end", close=True),
    b"/http10": reply(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\nX-Old: 1\r\n\r\nabc"),
    b"/not-modified": reply(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 1234\r\n\r\n'),
    b"/informational": reply(
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Final: yes\r\n\r\nok"),
    b"/chunks": reply(
        b"HTTP/1.1 201 Made\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nWiki\r\n6;ext=1\r\npedia \r\n0\r\nX-Trailer: t\r\n\r\n"),
}


@pytest_twisted.async_yield_fixture
async def scripted():
    server = ScriptedServer(dict(RAW_ROUTES)).start()
    yield server
    await server.stop()


@pytest.mark.parametrize("method, path, body", [
    (b"GET", b"/fixed", None),
    (b"GET", b"/chunked", None),
    (b"HEAD", b"/fixed", None),
    (b"GET", b"/nocontent", None),
    (b"GET", b"/gzip", None),
    (b"POST", b"/echo", b"x" * 100000),
    (b"PUT", b"/echo", "chunked"),
])
@pytest_twisted.ensureDeferred
async def test_same_answer_as_agent_from_twisted_web(agents, site, method, path, body):
    """When Agent and FastAgent send the same request to twisted.web, status, headers, length and body bytes match."""
    host = {b"Host": [site.url[7:]]}
    results = []
    for agent in agents:
        producer = None
        if body == "chunked":
            producer = Bytes(b"y" * 70000, known_length=False)
        elif body is not None:
            producer = Bytes(body)
        results.append(await fetch(agent, method, site.url + path, host, producer))
    assert results[0] == results[1]
    assert results[1]["ending"] is ResponseDone


@pytest.mark.parametrize("path, ending", [
    (b"/close-delimited", PotentialDataLoss),
    (b"/http10", ResponseDone),
    (b"/not-modified", ResponseDone),
    (b"/informational", ResponseDone),
    (b"/chunks", ResponseDone),
])
@pytest_twisted.ensureDeferred
async def test_same_answer_as_agent_from_raw_server(agents, scripted, path, ending):
    """When a raw server sends close-delimited, HTTP/1.0, 304, 1xx or chunked answers, both clients see the same."""
    agent_result = await fetch(agents[0], b"GET", scripted.url + path)
    fast_result = await fetch(agents[1], b"GET", scripted.url + path)
    assert agent_result == fast_result
    assert fast_result["ending"] is ending


@pytest_twisted.ensureDeferred
async def test_big_body_same_bytes(agents, site):
    """When the body is 20 MB, both clients deliver the same bytes."""
    agent_result = await fetch(agents[0], b"GET", site.url + b"/big")
    fast_result = await fetch(agents[1], b"GET", site.url + b"/big")
    assert agent_result == fast_result
    assert fast_result["sha256"] == hashlib.sha256(BIG).hexdigest()


@pytest_twisted.ensureDeferred
async def test_pool_request_by_target_with_pairs_on_loopback(site):
    """When the pool is given a Target and header pairs, twisted.web answers over one reused connection with its raw headers."""
    port = site.port.getHost().port
    target = Target(url="http://127.0.0.1:%d/base" % port, scheme=b"http", host=b"127.0.0.1",
                    port=port, base_path=b"/base", host_header=b"127.0.0.1:%d" % port)
    pool = ConnectionPool(reactor)
    try:
        for _ in range(3):
            response = await within(pool.request(
                target, b"GET", b"/base/fixed?x=1", [(b"accept", b"text/plain")]))
            data, reason = await within(body_of(response).done)
            assert (response.code, data, reason.type) == (200, b"fixed body\n" * 10, ResponseDone)
            names = [name.lower() for name, value in response.raw_headers]
            assert names.count(b"set-cookie") == 2
            assert (b"X-Seen-Host", b"127.0.0.1:%d" % port) in response.raw_headers
        assert site.connections == 1 and pool.idle_count(target) == 1
    finally:
        await pool.close_idle()


@pytest_twisted.ensureDeferred
async def test_sequential_requests_share_one_connection(agents, site):
    """When ten requests go one after another, the server sees one TCP connection."""
    for _ in range(10):
        assert (await fetch(agents[1], b"GET", site.url + b"/fixed"))["code"] == 200
    assert site.connections == 1


@pytest_twisted.ensureDeferred
async def test_stale_connection_retried_on_loopback(agents):
    """When the server drops a kept-alive connection instead of answering, the next request still succeeds on a new one."""

    def first_only(conn, body):
        if conn.served == 1:
            conn.transport.write(OK)
        else:
            conn.transport.loseConnection()

    server = ScriptedServer({b"/s": first_only}).start()
    try:
        for _ in range(2):
            assert (await fetch(agents[1], b"GET", server.url + b"/s"))["code"] == 200
        assert server.connections == 2
        with pytest.raises(ResponseNeverReceived, match="not idempotent"):
            await fetch(agents[1], b"POST", server.url + b"/s")
    finally:
        await server.stop()



@pytest_twisted.ensureDeferred
async def test_connection_closed_while_idle_is_not_used(agents):
    """When the server closes a pooled connection while it idles, the next request goes out on a fresh one."""

    def answer_then_hang_up(conn, body):
        conn.transport.write(OK)
        reactor.callLater(0.05, conn.transport.loseConnection)

    server = ScriptedServer({b"/s": answer_then_hang_up}).start()
    try:
        await fetch(agents[1], b"GET", server.url + b"/s")
        await within(defer.DeferredList([c.lost for c in list(server.open)]))
        await task.deferLater(reactor, 0.05)
        assert agents[1].pool.idle_count(agents[1].target_for(server.url)) == 0
        assert (await fetch(agents[1], b"GET", server.url + b"/s"))["code"] == 200
        assert server.connections == 2 and len(server.requests) == 2
    finally:
        await server.stop()

@pytest.mark.parametrize("path, headers", [
    (b"/close", None),
    (b"/http10", None),
    (b"/ok", {b"Connection": [b"close"]}),
])
@pytest_twisted.ensureDeferred
async def test_close_honoured_on_loopback(agents, path, headers):
    """When either side says close (or the server speaks HTTP/1.0), the client closes and the next request connects anew."""
    server = ScriptedServer({
        b"/close": reply(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"),
        b"/http10": RAW_ROUTES[b"/http10"],
        b"/ok": reply(OK),
    }).start()
    try:
        await fetch(agents[1], b"GET", server.url + path, headers)
        await within(defer.DeferredList([c.lost for c in list(server.open)]))
        await fetch(agents[1], b"GET", server.url + path, headers)
        assert server.connections == 2
    finally:
        await server.stop()


@pytest.mark.parametrize("raw", [
    b"this is not HTTP at all\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
])
@pytest_twisted.ensureDeferred
async def test_malformed_answer_is_response_failed(agents, raw):
    """When the upstream answers with malformed HTTP, the request fails with ResponseFailed."""
    server = ScriptedServer({b"/bad": reply(raw)}).start()
    try:
        with pytest.raises(ResponseFailed):
            await fetch(agents[1], b"GET", server.url + b"/bad")
    finally:
        await server.stop()


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10,
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\nxxxxxxxxxx\r\n5\r\nab",
])
@pytest_twisted.ensureDeferred
async def test_cut_body_fails_the_body_protocol(agents, raw):
    """When the upstream closes mid-body, the body protocol learns it with a failure, not ResponseDone."""
    server = ScriptedServer({b"/cut": reply(raw, close=True)}).start()
    try:
        response = await within(agents[1].request(b"GET", server.url + b"/cut"))
        collector = body_of(response)
        data, reason = await within(collector.done)
        assert data.startswith(b"x" * 10)
        assert reason.check(ResponseFailed) and not reason.check(ResponseDone, PotentialDataLoss)
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_garbage_and_cut_raw_upstreams(agents):
    """When tests.upstreams' raw garbage or reset servers answer, FastAgent fails as Agent does."""
    for mode, expected in (("garbage", ResponseFailed), ("reset", ConnectionLost)):
        server = RawUpstream(mode).start()
        try:
            for agent in agents:
                with pytest.raises((expected, ResponseNeverReceived)):
                    await within(agent.request(b"GET", server.url.encode() + b"/x"))
        finally:
            await server.stop()


@pytest_twisted.ensureDeferred
async def test_refused_connection_is_a_connect_error(agents):
    """When nothing listens, the request fails with a ConnectError."""
    with pytest.raises(ConnectError):
        await within(agents[1].request(b"GET", refused_url().encode() + b"/x"))


@pytest_twisted.ensureDeferred
async def test_cancel_aborts_the_upstream_connection(agents, site):
    """When a waiting request is cancelled, it fails and the server sees its connection close."""
    d = agents[1].request(b"GET", site.url + b"/hang")
    for _ in range(200):
        if site.resource.hanging:
            break
        await task.deferLater(reactor, 0.01)
    gone = site.resource.hanging[0].notifyFinish()
    d.cancel()
    with pytest.raises(ResponseNeverReceived):
        await d
    with pytest.raises(ConnectionClosed):
        await within(gone)


@pytest_twisted.ensureDeferred
async def test_paused_consumer_stops_reading_the_upstream(agents):
    """When the body consumer pauses, the client stops reading while the server has more; on resume all arrives."""
    total = 32 * MB
    server = ScriptedServer({b"/hose": firehose(total)}).start()
    try:
        response = await within(agents[1].request(b"GET", server.url + b"/hose"))
        collector = Collect(pause_at_start=True)
        response.deliverBody(collector)
        await task.deferLater(reactor, 0.3)
        seen = collector.received
        await task.deferLater(reactor, 0.3)
        assert collector.received == seen < MB
        assert server.open[0].firehose.left > 0
        collector.transport.resumeProducing()
        data, reason = await within(collector.done)
        assert len(data) == total and reason.check(ResponseDone)
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_slow_upstream_reader_pauses_the_body_producer(agents):
    """When the upstream does not read, the request body producer is paused instead of filling memory."""
    total = 32 * MB
    server = ScriptedServer({b"/sink": reply(OK)})
    server.deaf_for_s = 0.5
    server.start()
    try:
        stream = Stream(total)
        d = agents[1].request(b"POST", server.url + b"/sink", None, stream)
        await task.deferLater(reactor, 0.4)
        assert stream.was_paused and stream.sent < total
        response = await within(d)
        assert response.code == 200
        method, url, headers, body = server.requests[0]
        assert len(body) == total
        assert hashlib.sha256(body).hexdigest() == stream.digest.hexdigest()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_https_same_answer_as_agent_and_reused():
    """When the target is https, FastAgent verifies the certificate, answers as Agent does and reuses the TLS connection."""
    key_pem, cert_pem = self_signed()
    site = CountingSite()
    server_options = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem).options()
    site.port = reactor.listenSSL(0, site, server_options, interface="127.0.0.1")
    url = b"https://127.0.0.1:%d" % site.port.getHost().port
    policy = BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(cert_pem))
    agent_pool = HTTPConnectionPool(reactor, persistent=False)
    fast_pool = ConnectionPool(reactor, tls_policy=policy)
    try:
        agent_result = await fetch(Agent(reactor, policy, pool=agent_pool), b"GET", url + b"/fixed")
        fast = FastAgent(reactor, fast_pool)
        for _ in range(3):
            assert await fetch(fast, b"GET", url + b"/fixed") == agent_result
        assert site.connections == 2
        untrusting = FastAgent(reactor, ConnectionPool(reactor))
        with pytest.raises(ResponseNeverReceived):
            await fetch(untrusting, b"GET", url + b"/fixed")
    finally:
        await fast_pool.closeCachedConnections()
        await site.stop()

