"""Our own HTTP/1.1 upstream client: an IAgent over a keep-alive pool.

Agent spends most of a proxied request's client-side CPU re-parsing the
target URL, building an endpoint and running Deferred state machines per
request. Here a target (scheme://host:port) is parsed and its endpoint built
once, idle connections are reused LIFO, and one Deferred per request is all
the plumbing. Message framing is left to httptools, the binding of Node's
llhttp: a well-kept C parser, not framing code of our own.

Differences from twisted.web.client.Agent a caller can see:
- `UpstreamResponse.headers` holds every response header as received,
  Content-Length, Connection and Transfer-Encoding included (Agent hides
  them); dropping hop-by-hop headers is the caller's job.
- The request target goes out byte for byte; only spaces and control bytes
  are refused (Agent also refuses non-ASCII).
- A stale keep-alive connection is dropped before use when the peer's close
  is already queued in its socket; otherwise a reused connection that closes
  before any response byte is retried once on a fresh connection, for
  idempotent methods (all methods with `retry_non_idempotent=True`) whose
  body can be sent again: none, or a producer with `restartable = True`.
  Anything else fails with ResponseNeverReceived naming the reason.
Kept as Agent does it: cancelling before the headers aborts the connection
and fails with ResponseNeverReceived([CancelledError]); a close-delimited
body ends with PotentialDataLoss, a complete framed one with ResponseDone,
a cut one with ResponseFailed; connect failures pass through unchanged.
"""

import re

from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from twisted.web.client import BrowserLikePolicyForHTTPS, ResponseFailed, ResponseNeverReceived
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgent
from zope.interface import implementer

from apigw.h1connection import NotRetried, UpstreamResponse, WrongBodyLength, _Connection

__all__ = ["FastAgent", "NotRetried", "UpstreamPool", "UpstreamResponse", "WrongBodyLength"]

# What would break the request line; other bytes go out exactly as given.
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")
_TOKEN = re.compile(rb"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_DEFAULT_PORTS = {b"http": 80, b"https": 443}
_MAX_PREFIXES = 1024


class _Target:
    """One scheme://host:port: its endpoint and its idle connections (oldest
    first, so the most recently used is popped)."""

    __slots__ = ("key", "host_header", "endpoint", "factory", "idle")


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, pool, target):
        self._pool = pool
        self._target = target

    def buildProtocol(self, addr):
        return _Connection(self._pool, self._target)


class UpstreamPool:
    """Keep-alive connections per target, reused LIFO, at most
    `max_idle_per_target` idle ones, each closed after `idle_timeout_s` idle."""

    def __init__(self, reactor, max_idle_per_target=64, idle_timeout_s=120,
                 tls_policy=None, endpoint_for=None, retry_non_idempotent=False):
        self._reactor = reactor
        self.max_idle_per_target = max_idle_per_target
        self.idle_timeout_s = idle_timeout_s
        self._tls_policy = tls_policy
        self._endpoint_for = endpoint_for or self._default_endpoint
        # Off by default: a POST whose connection died after it was written
        # may have been processed; only the caller knows if a replay is safe.
        self.retry_non_idempotent = retry_non_idempotent
        self._by_prefix = {}
        self._by_key = {}
        self._sweep_call = None

    def _default_endpoint(self, scheme, host, port):
        # An IP literal needs no resolution and no Happy Eyeballs: with
        # HostnameEndpoint a refused connect was only reported after its
        # 0.3 s attempt delay, on every attempt to a dead target.
        text = host.decode("ascii")
        if isIPAddress(text):
            endpoint = TCP4ClientEndpoint(self._reactor, text, port)
        elif isIPv6Address(text):
            endpoint = TCP6ClientEndpoint(self._reactor, text, port)
        else:
            endpoint = HostnameEndpoint(self._reactor, host, port)
        if scheme == b"https":
            if self._tls_policy is None:
                self._tls_policy = BrowserLikePolicyForHTTPS()
            endpoint = wrapClientTLS(self._tls_policy.creatorForNetloc(host, port), endpoint)
        return endpoint

    def target(self, prefix):
        """The target for b"scheme://authority", parsed once."""
        target = self._by_prefix.get(prefix)
        if target is not None:
            return target
        scheme, host, port = _parse_prefix(prefix)
        key = (scheme, host, port)
        target = self._by_key.get(key)
        if target is None:
            target = _Target()
            target.key = key
            bracketed = b"[" + host + b"]" if b":" in host else host
            default = _DEFAULT_PORTS[scheme] == port
            target.host_header = bracketed if default else b"%b:%d" % (bracketed, port)
            target.endpoint = self._endpoint_for(scheme, host, port)
            target.factory = _ConnectionFactory(self, target)
            target.idle = []
            self._by_key[key] = target
        if len(self._by_prefix) >= _MAX_PREFIXES:
            self._by_prefix.clear()
        self._by_prefix[prefix] = target
        return target

    def idle_count(self, prefix):
        return len(self.target(prefix).idle)

    def _take(self, target):
        idle = target.idle
        while idle:
            conn = idle.pop()
            conn._idle = False
            if conn._alive():
                return conn
            conn.transport.abortConnection()
        return None

    def _connect(self, req):
        target = req.target
        d = target.endpoint.connect(target.factory)
        req.connecting = d
        d.addCallbacks(self._connected, self._connect_failed,
                       callbackArgs=(req,), errbackArgs=(req,))

    def _connected(self, conn, req):
        req.connecting = None
        if req.d is None:
            # Cancelled while connecting: the connection is still good.
            self._release(conn)
            return
        conn._send(req, reused=False)

    def _connect_failed(self, failure, req):
        req.connecting = None
        if req.d is not None:
            req.fail(failure)

    def _release(self, conn):
        if conn._lost:
            return
        idle = conn._target.idle
        if len(idle) >= self.max_idle_per_target:
            if not idle:
                conn.transport.loseConnection()
                return
            oldest = idle.pop(0)
            oldest._idle = False
            oldest.transport.loseConnection()
        conn._idle = True
        conn.idle_since = self._reactor.seconds()
        idle.append(conn)
        if self._sweep_call is None:
            self._sweep_call = self._reactor.callLater(self.idle_timeout_s, self._sweep)

    def _forget(self, conn):
        conn._idle = False
        try:
            conn._target.idle.remove(conn)
        except ValueError:
            pass

    def _sweep(self):
        # One timer for the whole pool: the oldest idle connections sit at the
        # front of each list, so expired ones are a prefix.
        self._sweep_call = None
        now = self._reactor.seconds()
        cutoff = now - self.idle_timeout_s
        next_due = None
        for target in self._by_key.values():
            idle = target.idle
            while idle and idle[0].idle_since <= cutoff:
                conn = idle.pop(0)
                conn._idle = False
                conn.transport.loseConnection()
            if idle:
                due = idle[0].idle_since + self.idle_timeout_s
                next_due = due if next_due is None else min(next_due, due)
        if next_due is not None:
            self._sweep_call = self._reactor.callLater(max(0, next_due - now), self._sweep)

    def closeCachedConnections(self):
        """Close every idle connection; fires when all are gone."""
        if self._sweep_call is not None:
            self._sweep_call.cancel()
            self._sweep_call = None
        waits = []
        for target in self._by_key.values():
            idle, target.idle = target.idle, []
            for conn in idle:
                conn._idle = False
                waits.append(conn._when_lost())
                conn.transport.loseConnection()
        return defer.gatherResults(waits).addCallback(lambda _: None)

    close_idle = closeCachedConnections


def _parse_prefix(prefix):
    scheme, sep, authority = prefix.partition(b"://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS:
        raise SchemeNotSupported(f"Unsupported scheme: {scheme!r}")
    authority = authority.rpartition(b"@")[2]
    if authority.startswith(b"["):
        host, _, rest = authority[1:].partition(b"]")
        port = rest[1:] if rest.startswith(b":") else b""
    else:
        host, _, port = authority.partition(b":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"bad authority in {prefix!r}")
    return scheme, host, int(port) if port else _DEFAULT_PORTS[scheme]


@implementer(IAgent)
class FastAgent:
    """IAgent sending each request over a pooled keep-alive connection."""

    def __init__(self, reactor, pool=None):
        self.pool = pool if pool is not None else UpstreamPool(reactor)
        self._checked_methods = set()

    def request(self, method, uri, headers=None, bodyProducer=None):
        start = uri.find(b"://")
        slash = uri.find(b"/", start + 3) if start >= 0 else -1
        if slash < 0:
            prefix, path = uri, b"/"
            query = uri.find(b"?", start + 3) if start >= 0 else -1
            if query >= 0:
                prefix, path = uri[:query], b"/" + uri[query:]
        else:
            prefix, path = uri[:slash], uri[slash:]
        try:
            target = self.pool.target(prefix)
            if method not in self._checked_methods:
                if not _TOKEN.match(method):
                    raise ValueError(f"invalid method {method!r}")
                if len(self._checked_methods) < 64:  # clients pick methods
                    self._checked_methods.add(method)
            if _BAD_TARGET.search(path):
                raise ValueError(f"invalid request target {path!r}")
        except Exception:
            return defer.fail()
        req = _Request(method, path, headers, bodyProducer, target)
        d = req.d  # sending may already fire it
        conn = self.pool._take(target)
        if conn is not None:
            conn._send(req, reused=True)
        else:
            self.pool._connect(req)
        return d


@implementer(IConsumer)
class _Request:
    """One request and its one Deferred; also the consumer its body producer
    writes to, so a late write from an abandoned attempt goes nowhere."""

    __slots__ = ("method", "path", "headers", "producer", "target", "d", "conn",
                 "connecting", "retried", "close")

    def __init__(self, method, path, headers, producer, target):
        self.method = method
        self.path = path
        self.headers = headers
        self.producer = producer
        self.target = target
        self.d = defer.Deferred(self._cancel)
        self.conn = None
        self.connecting = None
        self.retried = False
        self.close = False

    def fire(self, response):
        d = self.d
        if d is not None:
            self.d = None
            d.callback(response)

    def fail(self, failure):
        d = self.d
        if d is not None:
            self.d = None
            d.errback(failure)

    def _cancel(self, d):
        # Agent's outcome for a cancelled request, so callers map it the same.
        self.d = None
        got_bytes = False
        if self.connecting is not None:
            connecting, self.connecting = self.connecting, None
            connecting.cancel()
        conn = self.conn
        if conn is not None and conn._req is self:
            got_bytes = conn._got_byte
            conn._abort(None)
        cls = ResponseFailed if got_bytes else ResponseNeverReceived
        d.errback(Failure(cls([Failure(defer.CancelledError())])))

    def write(self, data):
        conn = self.conn
        if conn is not None and conn._req is self and conn._sending:
            conn._write_body(data)

    def registerProducer(self, producer, streaming):
        pass  # the connection registers the body producer with the socket

    def unregisterProducer(self):
        pass
