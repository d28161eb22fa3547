"""The gateway's own upstream client against twisted.web's Agent: the same
requests through a gateway on each give the client the same bytes."""

import json

import pytest_twisted
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool

from apigw.forward import AgentClient
from tests.helpers import raw_exchange, start_gateway
from tests.upstreams import TestUpstream

REQUESTS = [
    b"GET /svc/x?a=%2F&b HTTP/1.1\r\nHost: gw\r\nX-Request-ID: same\r\nConnection: close\r\n\r\n",
    b"HEAD /svc/gzip HTTP/1.1\r\nHost: gw\r\nX-Request-ID: same\r\nConnection: close\r\n\r\n",
    b"GET /svc/gzip HTTP/1.1\r\nHost: gw\r\nX-Request-ID: same\r\nConnection: close\r\n\r\n",
    b"GET /svc/redirect HTTP/1.1\r\nHost: gw\r\nX-Request-ID: same\r\nConnection: close\r\n\r\n",
    b"GET /svc/nobody HTTP/1.1\r\nHost: gw\r\nX-Request-ID: same\r\nConnection: close\r\n\r\n",
    b"GET /svc/status?code=503 HTTP/1.1\r\nHost: gw\r\nX-Request-ID: same\r\nConnection: close\r\n\r\n",
    b"POST /svc/echo HTTP/1.1\r\nHost: gw\r\nX-Request-ID: same\r\nContent-Length: 5\r\n"
    b"Connection: close\r\n\r\nhello",
    b"PUT /svc/chunked HTTP/1.1\r\nHost: gw\r\nX-Request-ID: same\r\nTransfer-Encoding: chunked\r\n"
    b"Connection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
]


def _normalise(raw):
    """Status line, header set and body; Date (ours and the upstream's),
    the seconds to the limit window's reset (the two requests may straddle
    a second) and header order may differ."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = []
    for line in lines:
        line = line.lower()
        if line.startswith(b"date:"):
            continue
        name, _, value = line.partition(b": ")
        if name in (b"ratelimit-reset", b"x-ratelimit-reset"):
            assert value.isdigit(), line
            line = name + b": <seconds>"
        headers.append(line)
    headers.sort()
    if body.startswith(b"{"):
        # The echo upstream lists request headers in arrival order, which
        # is each client's own business.
        body = json.loads(body)
    return status, headers, body


@pytest_twisted.ensureDeferred
async def test_same_bytes_through_our_client_and_agent():
    """When the same requests pass through a gateway on our upstream client and one on Agent, the client gets the same bytes."""
    upstream = TestUpstream().start()
    yaml = f"services:\n  svc:\n    url: {upstream.url}\n    auth: false\n    retries: 0\n"
    fast, fast_base = await start_gateway(yaml)
    reference_pool = HTTPConnectionPool(reactor, persistent=True)
    ref, ref_base = await start_gateway(
        yaml, client=AgentClient(Agent(reactor, pool=reference_pool), reference_pool))
    try:
        for payload in REQUESTS:
            a = await raw_exchange(int(fast_base.rsplit(":", 1)[1]), payload)
            b = await raw_exchange(int(ref_base.rsplit(":", 1)[1]), payload)
            assert a.startswith(b"HTTP/1.1 ")
            assert _normalise(a) == _normalise(b), payload
        assert len(upstream.requests) == 2 * len(REQUESTS)
    finally:
        await fast.stopService()
        await ref.stopService()
        await reference_pool.closeCachedConnections()
        await upstream.stop()
