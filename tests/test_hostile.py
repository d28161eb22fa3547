"""Hostile HTTP input: each gets a clear 4xx or a closed connection, reaches no
upstream, and the gateway keeps serving everyone else."""

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher

from tests.helpers import _Collect, http, raw_exchange, start_gateway
from tests.upstreams import TestUpstream


@pytest_twisted.async_yield_fixture
async def gw():
    upstream = TestUpstream().start()
    service, base = await start_gateway(
        f"services:\n  pub:\n    url: {upstream.url}\n    auth: false\n"
    )
    yield service, base, upstream
    await service.stopService()
    await upstream.stop()


@pytest_twisted.async_yield_fixture
async def gw_with():
    """gw_with(**settings) -> (service, base, upstream): a gateway with those settings."""
    started = []

    async def start(**settings):
        upstream = TestUpstream().start()
        lines = "".join(f"  {name}: {value}\n" for name, value in settings.items())
        service, base = await start_gateway(
            f"services:\n  pub:\n    url: {upstream.url}\n    auth: false\n"
            f"settings:\n{lines}")
        started.append((service, upstream))
        return service, base, upstream

    yield start
    for service, upstream in started:
        await service.stopService()
        await upstream.stop()


def _port(base):
    return int(base.rsplit(":", 1)[1])


HOSTILE = {
    "request line too long": (b"GET /pub/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"414"),
    "header line too long": (b"GET /pub/x HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n", b"431"),
    "too many headers": (b"GET /pub/x HTTP/1.1\r\nHost: x\r\n"
                         + b"".join(b"X-%d: a\r\n" % i for i in range(150)) + b"\r\n", b"400"),
    "headers too large in total": (b"GET /pub/x HTTP/1.1\r\nHost: x\r\n"
                                   + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 4000) for i in range(9)) + b"\r\n", b"400"),
    "NUL in a header value": (b"GET /pub/x HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", b"400"),
    "bare CR in a header value": (b"GET /pub/x HTTP/1.1\r\nHost: x\r\nX-A: a\rX-Injected: 1\r\n\r\n", b"400"),
    "Content-Length with Transfer-Encoding": (
        b"POST /pub/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /pub/smuggled HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
    "two different Content-Lengths": (
        b"POST /pub/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", b"400"),
    "invalid chunk size": (
        b"POST /pub/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", b"400"),
    "transfer coding other than chunked": (
        b"POST /pub/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", b"400"),
    "negative Content-Length": (b"POST /pub/x HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", b"400"),
    # Well-formed HTTP, so the connection may stay open: ask for close.
    "absolute-URI request target": (
        b"GET http://evil.example/pub/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"400"),
    "CONNECT": (
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n", b"405"),
    "TRACE": (b"TRACE /pub/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"405"),
    "non-ASCII path": (b"GET /pub/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
    "DEL in the path": (b"GET /pub/a\x7fb?x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"400"),
    "space before colon": (b"GET /pub/x HTTP/1.1\r\nHost: x\r\nX-A : b\r\n\r\n", b"400"),
    "HTTP/0.9 request": (b"GET /pub/x\r\n\r\n", b"400"),
    "HTTP/1.1 without Host": (b"GET /pub/x HTTP/1.1\r\nConnection: close\r\n\r\n", b"400"),
    "two Host headers": (
        b"GET /pub/x HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n", b"400"),
    "two hosts in one Host header": (
        b"GET /pub/x HTTP/1.1\r\nHost: a, b\r\nConnection: close\r\n\r\n", b"400"),
    "raw # in the target": (
        b"GET /pub/x#/../../admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"400"),
    "unknown HTTP version": (b"GET /pub/x HTTP/9.9\r\nHost: x\r\n\r\n", b"400"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest_twisted.ensureDeferred
async def test_hostile_request_gets_4xx_and_reaches_nothing(gw, case):
    """When a client sends a malformed or dangerous request, it gets a 4xx, nothing reaches the upstream, and others are still served."""
    service, base, upstream = gw
    payload, status = HOSTILE[case]
    data = await raw_exchange(_port(base), payload)
    assert data.split(b"\r\n", 1)[0].split(b" ")[1] == status, data[:200]
    assert upstream.requests == []
    assert b"X-Injected" not in data
    reply = await http("GET", base + "/pub/ok")
    assert reply.code == 200


@pytest_twisted.ensureDeferred
async def test_slowloris_head_is_dropped_while_others_are_served(gw_with):
    """When a client trickles its request head, it is dropped after the header timeout while other clients are served."""
    service, base, upstream = await gw_with(client_header_timeout=0.5)
    proto = _Collect()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", _port(base)), proto)
    started = reactor.seconds()
    line = b"GET /pub/x HTTP/1.1\r\nHost: x\r\nX-Slow: "
    for i, byte in enumerate(line):
        if proto.done.called:
            break
        proto.transport.write(bytes([byte]))
        await deferLater(reactor, 0.02, lambda: None)
        if i == 5:
            # Meanwhile, another client is served at once.
            assert (await http("GET", base + "/pub/fast")).code == 200
    data = await proto.done
    assert reactor.seconds() - started < 3
    assert data.startswith(b"HTTP/1.1 408")
    assert [r["uri"] for r in upstream.requests] == ["/fast"]


@pytest_twisted.ensureDeferred
async def test_idle_connection_is_dropped_after_header_timeout(gw_with):
    """When a client connects and sends nothing, the connection is closed after the header timeout."""
    service, base, upstream = await gw_with(client_header_timeout=0.3)
    started = reactor.seconds()
    data = await raw_exchange(_port(base), b"", timeout_s=5)
    assert 0.25 < reactor.seconds() - started < 3
    assert data.startswith(b"HTTP/1.1 408")


@pytest_twisted.ensureDeferred
async def test_connection_flood_is_capped_with_one_log_line(gw_with):
    """When idle connections exceed the limit, extra ones get a 503 and a close at once, and one log line says so."""
    service, base, upstream = await gw_with(max_connections=3)
    events = []
    globalLogPublisher.addObserver(events.append)
    held = []
    try:
        for _ in range(3):
            proto = _Collect()
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", _port(base)), proto)
            held.append(proto)
        refused = []
        for _ in range(5):
            proto = _Collect()
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", _port(base)), proto)
            refused.append(proto)
        for proto in refused:
            answer = await proto.done  # closed by the gateway, politely
            assert answer.startswith(b"HTTP/1.1 503 "), answer[:100]
        assert all(not p.done.called for p in held)
        for proto in held:
            proto.transport.loseConnection()
            await proto.done
        await deferLater(reactor, 0.05, lambda: None)
        assert (await http("GET", base + "/pub/after")).code == 200
    finally:
        globalLogPublisher.removeObserver(events.append)
    limit_lines = [e for e in events if "connection limit" in e.get("log_format", "")]
    assert len(limit_lines) == 1
    assert limit_lines[0]["limit"] == 3


@pytest_twisted.ensureDeferred
async def test_declared_oversized_body_is_refused_before_it_is_sent(gw):
    """When Content-Length is over every limit, the 413 comes at once (no 100 Continue) and the connection closes without reading the body."""
    service, base, upstream = gw
    port = _port(base)
    started = reactor.seconds()
    data = await raw_exchange(port, (
        b"POST /pub/x HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000000\r\n"
        b"Expect: 100-continue\r\n\r\n" + b"x" * 1000), timeout_s=5)
    assert reactor.seconds() - started < 2
    assert data.startswith(b"HTTP/1.1 413"), data[:100]
    assert b"100 Continue" not in data
    assert b'"request_id"' in data and b"connection: close" in data.lower()
    assert upstream.requests == []
    assert (await http("GET", base + "/pub/ok")).code == 200


@pytest_twisted.ensureDeferred
async def test_chunked_body_outgrowing_every_limit_is_cut_short(upstream_for_small_limit):
    """When a chunked upload passes every limit, the 413 comes while the client is still sending."""
    base, upstream = upstream_for_small_limit
    proto = _Collect()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", _port(base)), proto)
    proto.transport.write(b"POST /pub/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(3):
        proto.transport.write(b"50\r\n" + b"x" * 80 + b"\r\n")
    # No terminating chunk: the client would go on; the gateway answers anyway.
    guard = reactor.callLater(5, proto.transport.loseConnection)
    data = await proto.done
    if guard.active():
        guard.cancel()
    assert data.startswith(b"HTTP/1.1 413"), data[:100]
    assert upstream.requests == []


@pytest_twisted.async_yield_fixture
async def upstream_for_small_limit():
    upstream = TestUpstream().start()
    service, base = await start_gateway(
        f"services:\n  pub:\n    url: {upstream.url}\n    auth: false\nsettings:\n  max_body_bytes: 100\n"
    )
    yield base, upstream
    await service.stopService()
    await upstream.stop()


async def _until(condition, timeout_s=5.0):
    waited = 0.0
    while not condition():
        if waited >= timeout_s:
            return False
        await deferLater(reactor, 0.05, lambda: None)
        waited += 0.05
    return True


@pytest_twisted.ensureDeferred
async def test_trickled_body_is_cut_off_after_the_body_timeout(gw_with):
    """When a client stops sending its request body, it gets 408 after the body timeout and nothing reaches the upstream."""
    service, base, upstream = await gw_with(client_body_timeout=0.3)
    started = reactor.seconds()
    data = await raw_exchange(_port(base), b"POST /pub/x HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Length: 10\r\n\r\nab", timeout_s=5)
    assert 0.25 < reactor.seconds() - started < 3
    assert data.startswith(b"HTTP/1.1 408")
    assert upstream.requests == []


@pytest.mark.parametrize("path", [b"/healthz", b"/pub/x"])
@pytest_twisted.ensureDeferred
async def test_half_closed_client_gets_its_answer(gw, path):
    """When a client shuts down its sending side after its request, it still gets the answer, then the connection closes."""
    service, base, upstream = gw
    proto = _Collect()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", _port(base)), proto)
    proto.transport.write(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    proto.transport.loseWriteConnection()
    guard = reactor.callLater(5, proto.transport.abortConnection)
    data = await proto.done
    if guard.active():
        guard.cancel()
    assert data.startswith(b"HTTP/1.1 200"), data[:100]


@pytest_twisted.ensureDeferred
async def test_client_that_stops_reading_is_cut_off_and_frees_the_upstream():
    """When a client stops reading a large answer, it is cut off after the send timeout and the upstream connection is let go."""
    from tests.upstreams import RawUpstream

    raw = RawUpstream("endless-body").start()
    service, base = await start_gateway(
        f"services:\n  big:\n    url: {raw.url}\n    auth: false\n    retries: 0\n"
        "settings:\n  client_send_timeout: 0.5\n")
    try:
        proto = _Collect()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", _port(base)), proto)
        proto.transport.pauseProducing()  # never read a byte
        proto.transport.write(b"GET /big/x HTTP/1.1\r\nHost: x\r\n\r\n")
        started = reactor.seconds()
        assert await _until(lambda: raw.lost == 1, timeout_s=10)
        assert reactor.seconds() - started < 8
        proto.transport.resumeProducing()
        await proto.done  # the gateway closed it
    finally:
        await service.stopService()
        await raw.stop()


@pytest_twisted.async_yield_fixture
async def keyed():
    """A gateway whose service needs a key, and its upstream."""
    upstream = TestUpstream().start()
    service, base = await start_gateway(
        f"services:\n  priv:\n    url: {upstream.url}\n")
    yield service, base, upstream
    await service.stopService()
    await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_expect_continue_gets_the_refusal_before_any_upload(keyed):
    """When a client asks 100-continue without a valid key, it gets the 401 at once, never a 100, and the connection closes unread."""
    service, base, upstream = keyed
    started = reactor.seconds()
    data = await raw_exchange(_port(base), (
        b"POST /priv/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n"
        b"Expect: 100-continue\r\n\r\n"), timeout_s=5)
    assert reactor.seconds() - started < 2
    assert data.startswith(b"HTTP/1.1 401"), data[:100]
    assert b"100 Continue" not in data and b"connection: close" in data.lower()
    assert upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_body_without_a_key_is_refused_before_it_is_read(keyed):
    """When an unauthenticated client starts a large upload, the 401 comes while it is still sending and nothing reaches the upstream."""
    service, base, upstream = keyed
    proto = _Collect()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", _port(base)), proto)
    proto.transport.write(b"POST /priv/x HTTP/1.1\r\nHost: x\r\nContent-Length: 10485760\r\n"
                          b"Content-Type: application/x-www-form-urlencoded\r\n\r\n")
    proto.transport.write(b"ab=c&" * 1000)
    guard = reactor.callLater(5, proto.transport.abortConnection)
    data = await proto.done
    if guard.active():
        guard.cancel()
    assert data.startswith(b"HTTP/1.1 401"), data[:100]
    assert upstream.requests == [] and service.in_flight == 0


@pytest_twisted.ensureDeferred
async def test_expect_continue_with_a_valid_key_is_invited_then_proxied(keyed):
    """When a client with a valid key asks 100-continue, it gets 100 Continue, then the upstream's answer to the whole body."""
    service, base, upstream = keyed
    from tests.helpers import http as _http

    created = (await _http("POST", base + "/admin/keys", headers={
        b"X-Master-Key": b"", b"Content-Type": b"application/json"}, body=b"{}"))
    assert created.code == 403  # no master key configured: make one in the store instead
    record, raw_key = await service.key_store.create_key("tester")
    proto = _Collect()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", _port(base)), proto)
    proto.transport.write(b"POST /priv/x HTTP/1.1\r\nHost: x\r\nX-API-Key: " + raw_key.encode()
                          + b"\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
                          b"Connection: close\r\n\r\n")
    assert await _until(lambda: b"100 Continue" in proto.data)
    proto.transport.write(b"hello")
    guard = reactor.callLater(5, proto.transport.abortConnection)
    data = await proto.done
    if guard.active():
        guard.cancel()
    assert data.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"), data[:200]
    assert upstream.requests[-1]["body_length"] == 5


@pytest_twisted.ensureDeferred
async def test_client_leaving_after_its_checks_is_not_left_in_flight(gw):
    """When a client passes the checks, sends part of its body and leaves, the request is accounted and nothing stays in flight."""
    service, base, upstream = gw
    proto = _Collect()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", _port(base)), proto)
    proto.transport.write(b"POST /pub/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
    assert await _until(lambda: service.in_flight == 1)
    proto.transport.abortConnection()
    assert await _until(lambda: service.in_flight == 0)
    assert upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_large_form_body_does_not_delay_other_clients(gw):
    """When an unauthenticated client uploads a 10 MiB form body to an unrouted path, /healthz still answers within 100 ms."""
    service, base, upstream = gw
    body = b"ab=c&" * (10 * 1024 * 1024 // 5)
    upload = ensureDeferred(raw_exchange(_port(base), b"POST /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                          b"Content-Type: application/x-www-form-urlencoded\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body, timeout_s=20))
    slowest = 0.0
    for _ in range(20):
        started = reactor.seconds()
        assert (await http("GET", base + "/healthz")).code == 200
        slowest = max(slowest, reactor.seconds() - started)
        if upload.called:
            break
    answer = await upload
    assert answer.startswith(b"HTTP/1.1 404")
    assert slowest < 0.1, slowest
