"""The proxy end to end over loopback: routing, bytes, headers, errors."""

import hashlib
import json
import uuid

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.web.client import HTTPConnectionPool

from tests.helpers import http, raw_exchange, start_gateway
from tests.upstreams import GZIPPED, RawUpstream, TestUpstream, refused_url


@pytest_twisted.async_yield_fixture
async def upstream():
    up = TestUpstream().start()
    yield up
    await up.stop()


def config_for(url, **extra):
    lines = [
        "services:",
        "  pub:",
        f"    url: {url}",
        "    auth: false",
        "  nostrip:",
        f"    url: {url}/base",
        "    auth: false",
        "    strip_prefix: false",
        "  small:",
        f"    url: {url}",
        "    auth: false",
        "    max_body_bytes: 10",
        "  keyed:",
        f"    url: {url}",
    ]
    for key, value in extra.items():
        lines.append(f"    {key}: {value}")
    return "\n".join(lines) + "\n"


@pytest_twisted.async_yield_fixture
async def gateway(upstream):
    service, base = await start_gateway(config_for(upstream.url))
    yield base
    await service.stopService()


@pytest_twisted.ensureDeferred
async def test_path_and_query_forwarded_byte_for_byte(gateway, upstream):
    """When a path holds %2F and the query odd bytes, the upstream sees them unchanged."""
    reply = await http("GET", gateway + "/pub/a%2Fb/c%20d;p=1?x=%2F&y=a+b&&z")
    assert reply.code == 200
    assert upstream.requests[-1]["uri"] == "/a%2Fb/c%20d;p=1?x=%2F&y=a+b&&z"


@pytest_twisted.ensureDeferred
async def test_service_root_with_and_without_slash(gateway, upstream):
    """When the path is just the service, with or without slash, the upstream gets /."""
    await http("GET", gateway + "/pub")
    await http("GET", gateway + "/pub/")
    await http("GET", gateway + "/pub?q=1")
    assert [r["uri"] for r in upstream.requests] == ["/", "/", "/?q=1"]


@pytest_twisted.ensureDeferred
async def test_strip_prefix_false_keeps_service_segment(gateway, upstream):
    """When strip_prefix is false, the upstream path keeps /<service> after its base path."""
    await http("GET", gateway + "/nostrip/a/b?c=d")
    assert upstream.requests[-1]["uri"] == "/base/nostrip/a/b?c=d"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
@pytest_twisted.ensureDeferred
async def test_every_method_and_body_forwarded(gateway, upstream, method):
    """When a client sends any method with a body, the upstream gets it intact."""
    body = bytes(range(256)) * 300
    reply = await http(method, gateway + "/pub/x", body=body)
    assert reply.code == 200
    seen = upstream.requests[-1]
    assert seen["method"] == method
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()


@pytest_twisted.ensureDeferred
async def test_head_has_no_body(gateway, upstream):
    """When a client sends HEAD, it gets the headers and no body."""
    reply = await http("HEAD", gateway + "/pub/hop")
    assert reply.code == 200
    assert reply.body == b""
    assert reply.header(b"content-length") == "3"  # what GET /hop would send
    assert upstream.requests[-1]["method"] == "HEAD"


@pytest_twisted.ensureDeferred
async def test_forwarding_headers(gateway, upstream):
    """When proxied, the upstream sees X-Forwarded-*, its own Host, no key, no hop-by-hop."""
    reply = await http("GET", gateway + "/pub/x", headers={
        b"X-API-Key": b"super-secret-key",
        b"X-Forwarded-For": b"203.0.113.9",
        b"Connection": b"keep-alive, X-Drop-Me",
        b"X-Drop-Me": b"1",
        b"Keep-Alive": b"timeout=5",
        b"Proxy-Authorization": b"Basic Zm9vOmJhcg==",
        b"TE": b"trailers",
        b"X-Consumer-ID": b"forged",
        b"X-Kept": b"yes",
        b"Host": b"gw.example:8443",
    })
    assert reply.code == 200
    h = upstream.requests[-1]["headers"]
    assert "x-api-key" not in h
    assert "x-drop-me" not in h and "keep-alive" not in h and "te" not in h
    assert "proxy-authorization" not in h and "x-consumer-id" not in h
    assert h["x-kept"] == ["yes"]
    assert h["x-forwarded-for"] == ["203.0.113.9, 127.0.0.1"]
    assert h["x-forwarded-proto"] == ["http"]
    assert h["x-forwarded-host"] == ["gw.example:8443"]
    assert h["x-forwarded-prefix"] == ["/pub"]
    assert h["host"] == [upstream.url.split("//")[1]]
    assert "super-secret-key" not in json.dumps(upstream.requests)


@pytest_twisted.ensureDeferred
async def test_spoofable_and_underscore_headers_never_reach_the_upstream(gateway, upstream):
    """When a client sends identity or forwarding headers an upstream may trust, or names with '_' that CGI/WSGI read as their '-' twins, none reaches the upstream."""
    port = int(gateway.rsplit(":", 1)[1])
    forged = [
        b"X_Consumer_ID: admin-id", b"Transfer_Encoding: chunked", b"X_Forwarded_For: 10.0.0.1",
        b"Forwarded: for=10.0.0.1;proto=https", b"X-Real-IP: 10.0.0.1",
        b"X-Forwarded-Port: 443", b"X-Consumer-Groups: admins", b"X-Consumer-Custom-ID: 1",
        b"X-Credential-Identifier: admin", b"X-Anonymous-Consumer: false",
        b"True-Client-IP: 10.0.0.1",
    ]
    await raw_exchange(port, b"GET /pub/x HTTP/1.1\r\nHost: gw\r\n" + b"".join(
        line + b"\r\n" for line in forged) + b"X-Kept: yes\r\nConnection: close\r\n\r\n")
    seen = upstream.requests[-1]["headers"]
    assert seen["x-kept"] == ["yes"]
    for line in forged:
        assert line.split(b":")[0].decode().lower() not in seen, line
    assert seen["x-forwarded-for"] == ["127.0.0.1"]


@pytest_twisted.ensureDeferred
async def test_response_hop_by_hop_headers_dropped(gateway, upstream):
    """When the upstream answers with hop-by-hop headers, the client does not get them."""
    reply = await http("GET", gateway + "/pub/hop")
    assert reply.header(b"x-end-to-end") == "kept"
    for name in (b"x-secret-hop", b"keep-alive", b"proxy-authenticate"):
        assert reply.header(name) is None, name


@pytest_twisted.ensureDeferred
async def test_request_id_kept_when_safe_replaced_otherwise(gateway, upstream):
    """When X-Request-ID is plain it is kept and sent upstream; otherwise a fresh one is made."""
    reply = await http("GET", gateway + "/pub/x", headers={b"X-Request-ID": b"abc.DEF-123_x"})
    assert reply.header(b"x-request-id") == "abc.DEF-123_x"
    assert upstream.requests[-1]["headers"]["x-request-id"] == ["abc.DEF-123_x"]
    for bad in (b"a" * 129, b"has space", b"semi;colon", b"<script>"):
        reply = await http("GET", gateway + "/pub/x", headers={b"X-Request-ID": bad})
        rid = reply.header(b"x-request-id")
        assert len(rid) == 32 and uuid.UUID(hex=rid).version == 4
        assert upstream.requests[-1]["headers"]["x-request-id"] == [rid]


@pytest.mark.parametrize("path", [
    "/pub/../admin", "/pub/%2e%2e/admin", "/pub/%2E%2e/metrics", "/pub/a/../../x",
    "/pub/..%2fadmin", "/pub/..%5cadmin", "/pub/%252e%252e/admin", "/nostrip/../x",
    # Spellings some upstreams read as "..": path parameters (Tomcat, Jetty),
    # a NUL, overlong UTF-8 and full-width dots, a full-width solidus.
    "/pub/..;/admin", "/pub/..;jsessionid=1/admin", "/pub/%2e%2e;x/admin", "/pub/..%00/admin",
    "/pub/%c0%ae%c0%ae/admin", "/pub/%ef%bc%8e%ef%bc%8e/admin", "/pub/..%ef%bc%8fadmin",
    "/pub/%00",
])
@pytest_twisted.ensureDeferred
async def test_dot_segments_cannot_escape_the_service(gateway, upstream, path):
    """When a path climbs out of its service, it gets a JSON 400 and reaches nothing."""
    port = int(gateway.rsplit(":", 1)[1])
    raw = await raw_exchange(port, f"GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert json.loads(body)["request_id"]
    assert upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_dot_segments_inside_the_service_pass(gateway, upstream):
    """When dot-segments stay inside the service, the request is forwarded as sent."""
    port = int(gateway.rsplit(":", 1)[1])
    await raw_exchange(port, b"GET /pub/a/../b HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    assert upstream.requests[-1]["uri"] == "/a/../b"


@pytest_twisted.ensureDeferred
async def test_unknown_service_is_json_404(gateway, upstream):
    """When no service matches, the gateway answers a JSON 404 with the request id."""
    for path in ("/nope/x", "/", "/Pub/x"):
        reply = await http("GET", gateway + path)
        assert reply.code == 404
        assert reply.header(b"content-type") == "application/json"
        assert reply.json()["request_id"] == reply.header(b"x-request-id")
        assert reply.json()["error"]
    assert upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_body_over_limit_is_413(gateway, upstream):
    """When a body exceeds max_body_bytes, the gateway answers 413 and forwards nothing."""
    reply = await http("POST", gateway + "/small/x", body=b"x" * 11)
    assert reply.code == 413
    assert "10 bytes" in reply.json()["error"]
    reply = await http("POST", gateway + "/small/x", body=b"x" * 10)
    assert reply.code == 200
    assert len(upstream.requests) == 1


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_global_limit_is_413(upstream):
    """When a chunked body grows past every limit, it is dropped and answered 413."""
    service, base = await start_gateway(
        f"services:\n  pub:\n    url: {upstream.url}\n    auth: false\n"
        "settings:\n  max_body_bytes: 100\n"
    )
    try:
        port = int(base.rsplit(":", 1)[1])
        chunk = b"x" * 80
        payload = (b"POST /pub/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
                   b"Connection: close\r\n\r\n" + (b"50\r\n" + chunk + b"\r\n") * 3 + b"0\r\n\r\n")
        raw = await raw_exchange(port, payload)
        assert raw.startswith(b"HTTP/1.1 413"), raw[:100]
        assert upstream.requests == []
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_auth_required_services_refuse_without_key(gateway, upstream):
    """When a keyed service is called without X-API-Key, it answers 401 and proxies nothing."""
    reply = await http("GET", gateway + "/keyed/x")
    assert reply.code == 401
    assert reply.json()["error"]
    assert upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_set_cookie_never_leaks_between_clients(gateway, upstream):
    """When an upstream sets a cookie for one client, the next client's request carries none."""
    first = await http("GET", gateway + "/pub/setcookie")
    assert first.header(b"set-cookie") == "session=secret-of-a; Path=/"
    await http("GET", gateway + "/pub/x")
    assert "cookie" not in upstream.requests[-1]["headers"]


@pytest_twisted.ensureDeferred
async def test_gzip_passes_through_untouched(gateway, upstream):
    """When the upstream answers gzip, the client gets the same compressed bytes."""
    reply = await http("GET", gateway + "/pub/gzip", headers={b"Accept-Encoding": b"gzip"})
    assert reply.header(b"content-encoding") == "gzip"
    assert reply.body == GZIPPED
    assert upstream.requests[-1]["headers"]["accept-encoding"] == ["gzip"]
    await http("GET", gateway + "/pub/x")
    assert "accept-encoding" not in upstream.requests[-1]["headers"]


@pytest_twisted.ensureDeferred
async def test_redirect_is_handed_to_the_client(gateway, upstream):
    """When the upstream answers 302, the client gets the 302, not the target."""
    reply = await http("GET", gateway + "/pub/redirect")
    assert reply.code == 302
    assert reply.header(b"location") == "/elsewhere"
    assert len(upstream.requests) == 1


@pytest_twisted.ensureDeferred
async def test_upstream_status_and_204_pass_through(gateway, upstream):
    """When the upstream answers 503 or 204, the client gets exactly that."""
    reply = await http("GET", gateway + "/pub/status?code=503")
    assert reply.code == 503
    reply = await http("GET", gateway + "/pub/nobody")
    assert reply.code == 204 and reply.body == b""
    assert reply.header(b"content-type") is None  # none invented


@pytest_twisted.ensureDeferred
async def test_consecutive_requests_reuse_one_upstream_connection(gateway, upstream):
    """When requests follow each other, they share one kept-alive upstream connection."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    try:
        for _ in range(5):
            reply = await http("GET", gateway + "/pub/x", pool=pool)
            assert reply.code == 200
    finally:
        await pool.closeCachedConnections()
    assert upstream.connections == 1


@pytest_twisted.ensureDeferred
async def test_refused_upstream_is_json_502():
    """When nothing listens upstream, the client gets a JSON 502 with the request id."""
    service, base = await start_gateway(
        f"services:\n  down:\n    url: {refused_url()}\n    auth: false\n    retries: 0\n"
    )
    try:
        reply = await http("GET", base + "/down/x")
        assert reply.code == 502
        assert reply.json()["request_id"] == reply.header(b"x-request-id")
    finally:
        await service.stopService()


@pytest.mark.parametrize("mode", ["reset", "garbage"])
@pytest_twisted.ensureDeferred
async def test_reset_or_malformed_upstream_is_502(mode):
    """When the upstream resets or speaks garbage, the client gets a JSON 502."""
    raw = RawUpstream(mode).start()
    service, base = await start_gateway(
        f"services:\n  bad:\n    url: {raw.url}\n    auth: false\n    retries: 0\n"
    )
    try:
        reply = await http("GET", base + "/bad/x")
        assert reply.code == 502
        assert reply.header(b"content-type") == "application/json"
    finally:
        await service.stopService()
        await raw.stop()


@pytest_twisted.ensureDeferred
async def test_body_cut_short_upstream_closes_client_connection():
    """When the upstream dies mid-body, the client connection is cut, not finished cleanly."""
    raw = RawUpstream("cut").start()
    service, base = await start_gateway(
        f"services:\n  cut:\n    url: {raw.url}\n    auth: false\n    retries: 0\n"
    )
    try:
        port = int(base.rsplit(":", 1)[1])
        data = await raw_exchange(port, b"GET /cut/x HTTP/1.1\r\nHost: gw\r\n\r\n")
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"content-length: 1000" in head.lower()
        assert len(body) < 1000
    finally:
        await service.stopService()
        await raw.stop()


async def _raw_through_gateway(mode, access_log=None):
    raw = RawUpstream(mode).start()
    service, base = await start_gateway(
        f"services:\n  raw:\n    url: {raw.url}\n    auth: false\n    retries: 0\n"
        "    timeout: 2\n", access_log=access_log)
    records = []
    service.access_log.record = records.append
    try:
        port = int(base.rsplit(":", 1)[1])
        data = await raw_exchange(
            port, b"GET /raw/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
            timeout_s=5)
    finally:
        await service.stopService()
        await raw.stop()
    return data, records


@pytest.mark.parametrize("mode", ["badchunk", "huge-head", "many-headers"])
@pytest_twisted.ensureDeferred
async def test_broken_upstream_answer_before_any_byte_is_json_502(mode):
    """When the upstream's answer breaks before any of it reached the client (bad chunk size, a head without end or with too many lines), the client gets the gateway's JSON 502."""
    data, records = await _raw_through_gateway(mode)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502"), data[:200]
    assert json.loads(body)["request_id"]
    assert b"X-Filler" not in data
    assert records[-1]["status"] == 502


@pytest_twisted.ensureDeferred
async def test_close_delimited_body_cut_by_a_reset_is_not_completed():
    """When an upstream body that ends with the connection is cut by a reset, the client gets no last chunk and the access record says what happened."""
    data, records = await _raw_through_gateway("until-close-reset")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    assert body.startswith(b"a\r\nxxxxxxxxxx\r\n") and not body.endswith(b"0\r\n\r\n")
    assert (records[-1]["status"], records[-1]["error"]) == (200, "upstream body cut short")


@pytest_twisted.ensureDeferred
async def test_close_delimited_body_ended_by_fin_is_complete():
    """When an upstream body that ends with the connection ends cleanly, the client gets it whole, with the last chunk."""
    data, records = await _raw_through_gateway("until-close-fin")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == b"a\r\nxxxxxxxxxx\r\n0\r\n\r\n"
    assert (records[-1]["status"], records[-1]["error"]) == (200, None)


@pytest_twisted.ensureDeferred
async def test_upstream_stalling_mid_body_is_cut_off_after_timeout():
    """When the upstream goes quiet mid-body for the timeout, the client connection is closed (body truncated) instead of hanging."""
    raw = RawUpstream("stall").start()
    service, base = await start_gateway(
        f"services:\n  stall:\n    url: {raw.url}\n    auth: false\n    timeout: 0.3\n    retries: 0\n"
    )
    try:
        port = int(base.rsplit(":", 1)[1])
        started = reactor.seconds()
        data = await raw_exchange(port, b"GET /stall/x HTTP/1.1\r\nHost: gw\r\n\r\n", timeout_s=10)
        assert 0.25 < reactor.seconds() - started < 3
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and body == b"0123456789"
    finally:
        await service.stopService()
        await raw.stop()


@pytest_twisted.ensureDeferred
async def test_hanging_upstream_is_504_after_timeout(upstream):
    """When the upstream sends no headers within timeout, the client gets 504 and the connection is dropped."""
    service, base = await start_gateway(
        f"services:\n  slow:\n    url: {upstream.url}\n    auth: false\n"
        "    timeout: 0.3\n    retries: 0\n"
    )
    try:
        started = reactor.seconds()
        reply = await http("GET", base + "/slow/hang")
        assert reply.code == 504
        assert 0.25 <= reactor.seconds() - started < 3
        assert "0.3s" in reply.json()["error"]
        # The gateway gave up the upstream connection.
        hung = upstream.hanging[0]
        for _ in range(50):
            if hung._disconnected:
                break
            await _sleep(0.02)
        assert hung._disconnected
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_healthz(gateway):
    """When the process runs, /healthz answers 200 ok in JSON."""
    reply = await http("GET", gateway + "/healthz")
    assert reply.code == 200
    assert reply.json() == {"status": "ok"}


def _sleep(seconds):
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_refused_ip_target_fails_fast():
    """When nothing listens on an IP-literal upstream, the 502 comes without a Happy Eyeballs delay."""
    service, base = await start_gateway(
        f"services:\n  down:\n    url: {refused_url()}\n    auth: false\n    retries: 0\n"
    )
    try:
        started = reactor.seconds()
        reply = await http("GET", base + "/down/x")
        assert reply.code == 502
        assert reactor.seconds() - started < 0.2
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_bodies_cut_short_open_the_targets_breaker():
    """When an upstream keeps cutting its bodies short after a 200 head, those count as failures of the target and its breaker opens."""
    raw = RawUpstream("cut").start()
    service, base = await start_gateway(
        f"services:\n  cut:\n    url: {raw.url}\n    auth: false\n    retries: 0\n"
        "settings:\n  breaker_failure_threshold: 2\n  breaker_min_requests: 1\n")
    try:
        port = int(base.rsplit(":", 1)[1])
        for _ in range(2):
            data = await raw_exchange(port, b"GET /cut/x HTTP/1.1\r\nHost: gw\r\n\r\n")
            assert data.startswith(b"HTTP/1.1 200")
        reply = await http("GET", base + "/cut/x")
        assert reply.code == 503 and "circuit open" in reply.json()["error"]
        assert raw.connections == 2
    finally:
        await service.stopService()
        await raw.stop()


@pytest_twisted.ensureDeferred
async def test_request_checked_before_a_reload_finishes_on_its_route(tmp_path):
    """When the config is reloaded between a request's head and the end of its body, the request goes where it was checked to go."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from apigw.config import load_config
    from apigw.service import GatewayService
    from tests.helpers import _Collect

    upstream = TestUpstream().start()
    path = tmp_path / "gw.yaml"
    path.write_text(f"services:\n  pub:\n    url: {upstream.url}\n    auth: false\n")
    config = load_config(str(path), environ={"DATABASE_URL": f"sqlite:///{tmp_path}/k.db"})
    service = GatewayService(config, port="tcp:0:interface=127.0.0.1")
    service.startService()
    try:
        port = (await service.when_listening()).getHost().port
        proto = _Collect()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
        proto.transport.write(b"POST /pub/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 10\r\n"
                              b"Connection: close\r\n\r\nhello")
        for _ in range(100):
            if service.in_flight:
                break
            await deferLater(reactor, 0.01, lambda: None)
        path.write_text(f"services:\n  other:\n    url: {upstream.url}\n    auth: false\n")
        service.reload()
        proto.transport.write(b"world")
        data = await proto.done
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
        assert upstream.requests[-1]["body_length"] == 10
    finally:
        await service.stopService()
        await upstream.stop()
