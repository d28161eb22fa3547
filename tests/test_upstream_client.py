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

from apigw.upstream_client import ConnectionPool, FastAgent, UpstreamConnection
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


@pytest.fixture
def mem():
    clock = MemoryReactorClock()
    endpoint = MemoryEndpoint()
    built = []

    def endpoint_for(scheme, host, port):
        built.append((scheme, host, port))
        return endpoint

    pool = ConnectionPool(clock, max_idle_per_target=2, idle_timeout_s=30, endpoint_for=endpoint_for)
    agent = FastAgent(clock, pool)
    agent.clock, agent.endpoint, agent.built = clock, endpoint, built
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

