"""Client CPU per upstream request, without sockets or reactor: request ->
head bytes -> a canned answer fed to the connection -> body delivered.

    PYTHONPATH=src python bench/upstream_client_micro.py [--post] [--read-headers]

Modes: `agent` (FastAgent, a URI and a Headers), `pool` (pool.request with a
Target and a Headers), `pairs` (pool.request with (name, value) pairs).
`--old` measures the pre-package client (apigw.h1client) instead, for a tree
that still has it: `git archive d548363 apigw | tar -x -C /tmp/old` and run
with PYTHONPATH=/tmp/old.
"""

import argparse
import time

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.http_headers import Headers

BODY = b"x" * 212
ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nServer: bench\r\n"
          b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\nX-Upstream: 1\r\nSet-Cookie: a=1\r\n"
          b"Set-Cookie: b=2\r\nCache-Control: no-cache\r\nContent-Length: %d\r\n\r\n"
          % len(BODY)) + BODY
PREFIX = b"http://up.example:8080"
PATH = b"/svc/items?id=42&x=1"
PAIRS = [
    (b"User-Agent", b"bench/1.0"), (b"Accept", b"application/json"),
    (b"Accept-Encoding", b"gzip, deflate"), (b"Accept-Language", b"en"),
    (b"X-Forwarded-For", b"127.0.0.1"), (b"X-Forwarded-Proto", b"http"),
    (b"X-Forwarded-Host", b"gw"), (b"X-Forwarded-Prefix", b"/svc"),
    (b"X-Request-ID", b"0123456789abcdef"), (b"Host", b"up.example:8080"),
]


class _Endpoint:
    """Every connect gives one in-memory connection the benchmark feeds."""

    def connect(self, factory):
        self.protocol = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        return defer.succeed(self.protocol)


class _Drain(Protocol):
    def connectionLost(self, reason):
        pass


def _headers():
    headers = Headers()
    for name, value in PAIRS:
        headers.addRawHeader(name, value)
    return headers


def _senders(old, post):
    from apigw.upstream import BytesProducer

    method = b"POST" if post else b"GET"

    def body():
        return BytesProducer(b'{"name": "widget", "qty": 3}' * 10) if post else None

    clock = MemoryReactorClock()
    endpoint = _Endpoint()
    if old:
        from apigw.h1client import FastAgent, UpstreamPool
        agent = FastAgent(clock, UpstreamPool(clock, endpoint_for=lambda *a: endpoint))
        return endpoint, {"agent": lambda: agent.request(method, PREFIX + PATH, _headers(), body())}
    from apigw.config import Target
    from apigw.upstream_client import ConnectionPool, FastAgent
    pool = ConnectionPool(clock, endpoint_for=lambda *a: endpoint)
    agent = FastAgent(clock, pool)
    target = Target(url=PREFIX.decode(), scheme=b"http", host=b"up.example", port=8080,
                    base_path=b"", host_header=b"up.example:8080")
    return endpoint, {
        "agent": lambda: agent.request(method, PREFIX + PATH, _headers(), body()),
        "pool": lambda: pool.request(target, method, PATH, _headers(), body()),
        "pairs": lambda: pool.request(target, method, PATH, list(PAIRS), body()),
    }


def _run(endpoint, send, n, read_headers):
    got = []
    for _ in range(n):
        send().addCallback(got.append)
        endpoint.protocol.dataReceived(ANSWER)
        response = got.pop()
        if read_headers:
            list(response.headers.getAllRawHeaders())
        response.deliverBody(_Drain())
        endpoint.transport.clear()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", action="store_true")
    parser.add_argument("--post", action="store_true")
    parser.add_argument("--read-headers", action="store_true",
                        help="also read response.headers, as apigw.upstream does today")
    parser.add_argument("-n", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    for mode in ("agent", "pool", "pairs"):
        endpoint, senders = _senders(args.old, args.post)
        if mode not in senders:
            continue
        _run(endpoint, senders[mode], args.n, args.read_headers)  # warm up
        best = float("inf")
        for _ in range(args.repeats):
            started = time.process_time()
            _run(endpoint, senders[mode], args.n, args.read_headers)
            best = min(best, (time.process_time() - started) / args.n * 1e6)
        print(f"{'old' if args.old else 'new'} {mode:6s} {'POST' if args.post else 'GET':4s} "
              f"{'+headers' if args.read_headers else '':8s} {best:6.2f} us/request (best of "
              f"{args.repeats} x {args.n})")


if __name__ == "__main__":
    main()
