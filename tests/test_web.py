"""Who answered: `Server: apigw` on what the gateway makes, `Via` on what it relays."""

import pytest
import pytest_twisted

from tests.helpers import http, raw_exchange, start_gateway
from tests.upstreams import TestUpstream, refused_url


@pytest_twisted.async_yield_fixture
async def upstream():
    up = TestUpstream().start()
    yield up
    await up.stop()


def _config(url):
    return (
        "services:\n"
        f"  pub:\n    url: {url}\n    auth: false\n"
        f"  keyed:\n    url: {url}\n"
        f"  small:\n    url: {url}\n    auth: false\n    max_body_bytes: 10\n"
        f"  down:\n    url: {refused_url()}\n    auth: false\n    retries: 0\n"
    )


@pytest_twisted.async_yield_fixture
async def gateway(upstream):
    service, base = await start_gateway(_config(upstream.url), admin_port="tcp:0:interface=127.0.0.1")
    admin = await service.when_admin_listening()
    yield service, base, f"http://127.0.0.1:{admin.getHost().port}"
    await service.stopService()


GATEWAY_MADE = [
    ("GET", "/healthz", None, 200),
    ("HEAD", "/healthz", None, 200),
    ("GET", "/readyz", None, 200),
    ("GET", "/metrics", None, 200),
    ("POST", "/healthz", None, 405),
    ("GET", "/nope/x", None, 404),
    ("GET", "/", None, 404),
    ("TRACE", "/pub/x", None, 405),
    ("GET", "/keyed/x", None, 401),
    ("POST", "/small/x", b"x" * 100, 413),
    ("GET", "/down/x", None, 502),
    ("GET", "/pub/../admin", None, 400),
]


@pytest.mark.parametrize("method,path,body,status", GATEWAY_MADE)
@pytest_twisted.ensureDeferred
async def test_gateway_made_answers_say_server_apigw_without_version(gateway, method, path, body,
                                                                    status):
    """When the gateway answers by itself, Server is exactly `apigw` and no Via is added."""
    _, base, _ = gateway
    reply = await http(method, base + path, body=body)
    assert reply.code == status
    assert reply.headers.getRawHeaders(b"server") == [b"apigw"]
    assert reply.headers.getRawHeaders(b"via") is None


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/admin/keys", 403),
    ("POST", "/admin/reload", 403),
    ("GET", "/admin/nothing-here", 403),
    ("GET", "/elsewhere", 404),
])
@pytest_twisted.ensureDeferred
async def test_admin_listener_answers_say_server_apigw(gateway, method, path, status):
    """When the --admin-port listener answers, Server is exactly `apigw`."""
    _, _, admin = gateway
    reply = await http(method, admin + path)
    assert reply.code == status
    assert reply.headers.getRawHeaders(b"server") == [b"apigw"]


@pytest_twisted.ensureDeferred
async def test_parser_refusals_say_server_apigw(gateway):
    """When the channel refuses an over-long request line, its 414 says Server: apigw."""
    service, _, _ = gateway
    port = (await service.when_listening()).getHost().port
    answer = await raw_exchange(port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 414")
    assert b"\r\nserver: apigw\r\n" in head + b"\r\n"


@pytest_twisted.ensureDeferred
async def test_proxied_answer_keeps_upstream_server_and_gets_via(gateway, upstream):
    """When an answer is relayed, the upstream's Server stays and Via names the gateway."""
    _, base, _ = gateway
    reply = await http("GET", base + "/pub/x")
    assert reply.code == 200
    assert reply.headers.getRawHeaders(b"server") != [b"apigw"]
    assert reply.headers.getRawHeaders(b"via") == [b"1.1 apigw"]


@pytest_twisted.ensureDeferred
async def test_via_is_appended_after_the_upstreams_own(gateway, upstream):
    """When the upstream's answer already has a Via, the gateway's entry comes after it."""
    _, base, _ = gateway
    reply = await http("GET", base + "/pub/via")
    assert reply.code == 200
    assert b", ".join(reply.headers.getRawHeaders(b"via")) == b"1.1 cache-a, 1.1 apigw"
