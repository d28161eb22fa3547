"""Reuse: keep-alive connections per upstream target, and the requests sent
over them.

A target is the already-parsed `apigw.config.Target`, used as the key as
is: nothing is turned back into a URI. Its endpoint is built once. Idle
connections are reused newest first (LIFO), at most `max_idle_per_target`
of them, each closed after `idle_timeout_s` idle. The pool sees a
connection only through its public face: `state`, `alive()`, `send()`,
`abort()`, `close()`; the connection hands itself back through the
callbacks it was built with.

Behaviour a caller can see, beyond Agent's:
- The request target goes out byte for byte; only spaces and control bytes
  are refused (Agent also refuses non-ASCII).
- A stale keep-alive connection is dropped before use when the peer's close
  is already queued in its socket; otherwise a reused connection that closes
  before any response byte is retried once on a fresh connection, for
  idempotent methods (all methods with `retry_non_idempotent=True`) whose
  body can be sent again: none, or a producer with `restartable = True`.
  Anything else fails with ResponseNeverReceived naming the reason
  (NotRetried).
Kept as Agent does it: cancelling before the headers aborts the connection
and fails with ResponseNeverReceived([CancelledError]) (ResponseFailed once
response bytes came); a close-delimited body ends with PotentialDataLoss, a
complete framed one with ResponseDone, a cut one with ResponseFailed;
connect failures pass through unchanged.
"""

import re

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from apigw.upstream_client.connection import (
    RECEIVING,
    TRANSMITTING_AFTER_RESPONSE,
    UpstreamConnection,
)
from apigw.upstream_client.endpoints import EndpointMaker

__all__ = ["ConnectionPool", "NotRetried"]

# Idle longer than this, a connection's socket is checked for the peer's
# close before reuse even when the request could be resent.
_PEEK_AFTER_IDLE_S = 1.0
# RFC 9110 9.2.2's idempotent methods, as Agent resends them (the client
# stands alone; the gateway's own retry rule is apigw.retry).
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# What would break the request line; other bytes go out exactly as given.
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")
_TOKEN = re.compile(rb"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# Clients pick methods: remember only this many good ones.
_MAX_METHODS = 64


class NotRetried(Exception):
    """A reused connection closed before any response byte, and the request
    could not safely be sent again."""


class ConnectionPool:
    """Keep-alive connections per target; `request()` sends over one."""

    def __init__(self, reactor, max_idle_per_target=64, idle_timeout_s=120,
                 tls_policy=None, endpoint_for=None, retry_non_idempotent=False,
                 max_head_bytes=64 * 1024, max_headers=100):
        self._reactor = reactor
        # Limits of an upstream's response head, for every connection.
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.max_idle_per_target = max_idle_per_target
        self.idle_timeout_s = idle_timeout_s
        self._endpoint_for = endpoint_for or EndpointMaker(reactor, tls_policy)
        # Off by default: a POST whose connection died after it was written
        # may have been processed; only the caller knows if a replay is safe.
        self.retry_non_idempotent = retry_non_idempotent
        self._slots = {}
        self._methods = set()
        self._sweep_call = None

    def configure(self, max_idle_per_target, idle_timeout_s, max_head_bytes, max_headers):
        """New limits (a config reload): idle connections beyond the new
        count go when next released; new connections take the head limits."""
        self.max_idle_per_target = max_idle_per_target
        self.idle_timeout_s = idle_timeout_s
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers

    def request(self, target, method, path, headers=None, body_producer=None):
        """Send one request to `target`; fires with an UpstreamResponse once
        its headers are in.

        `path` is the request target (path and query), sent byte for byte.
        `headers` is a Headers or a sequence of (name, value) byte pairs,
        written in order; Content-Length and Transfer-Encoding are dropped
        (the framing is ours), Host is added from `target.host_header` when
        absent.
        """
        try:
            slot = self._slots.get(target)
            if slot is None:
                slot = self._add_slot(target)
            if method not in self._methods:
                self._check_method(method)
            if not path or _BAD_TARGET.search(path):
                raise ValueError(f"invalid request target {path!r}")
        except Exception:
            return defer.fail()
        request = _Request(self, slot, target, method, path, headers, body_producer)
        d = request.d  # sending may already fire it
        conn = slot.take(request.why_not_resent() is None)
        if conn is None:
            slot.connect(request)
        else:
            request.reused = True
            request.connection = conn
            conn.send(request)
        return d

    def idle_count(self, target):
        """How many idle connections to `target` wait for a request."""
        slot = self._slots.get(target)
        return 0 if slot is None else len(slot.idle)

    def close_idle(self):
        """Close every idle connection; fires when all are gone."""
        if self._sweep_call is not None:
            self._sweep_call.cancel()
            self._sweep_call = None
        waits = []
        for slot in self._slots.values():
            idle = slot.idle
            slot.idle, slot.since = [], []
            for conn in idle:
                waits.append(conn.close())
        return defer.gatherResults(waits).addCallback(lambda _: None)

    # Agent's HTTPConnectionPool name, for callers written against it.
    closeCachedConnections = close_idle

    def _add_slot(self, target):
        slot = _Slot(self, self._endpoint_for(target.scheme, target.host, target.port))
        self._slots[target] = slot
        return slot

    def _check_method(self, method):
        if not _TOKEN.match(method):
            raise ValueError(f"invalid method {method!r}")
        if len(self._methods) < _MAX_METHODS:
            self._methods.add(method)

    def _idled(self):
        if self._sweep_call is None:
            self._sweep_call = self._reactor.callLater(self.idle_timeout_s, self._sweep)

    def _sweep(self):
        # One timer for the whole pool: the oldest idle connections sit at the
        # front of each list, so expired ones are a prefix.
        self._sweep_call = None
        now = self._reactor.seconds()
        cutoff = now - self.idle_timeout_s
        next_due = None
        for slot in self._slots.values():
            idle, since = slot.idle, slot.since
            while since and since[0] <= cutoff:
                del since[0]
                idle.pop(0).close()
            if since:
                due = since[0] + self.idle_timeout_s
                next_due = due if next_due is None else min(next_due, due)
        if next_due is not None:
            self._sweep_call = self._reactor.callLater(max(0, next_due - now), self._sweep)


class _Slot:
    """One target's endpoint and idle connections: `idle` oldest first, so
    the most recently used is popped, and `since` when each became idle."""

    __slots__ = ("pool", "endpoint", "factory", "idle", "since")

    def __init__(self, pool, endpoint):
        self.pool = pool
        self.endpoint = endpoint
        self.factory = _ConnectionFactory(self)
        self.idle = []
        self.since = []

    def take(self, resendable):
        """The most recently idle connection that can take a request.

        Asking the socket whether the peer closed costs a syscall per
        request. A connection idle for under a second was very likely not
        closed by its server meanwhile, and if it was, a request that may be
        resent goes out again on a fresh connection (stale()): for those,
        the check is skipped.
        """
        idle = self.idle
        now = self.pool._reactor.seconds()
        while idle:
            conn = idle.pop()
            since = self.since.pop()
            if conn.alive(peek=not resendable or now - since >= _PEEK_AFTER_IDLE_S):
                return conn
            conn.abort()
        return None

    def connect(self, request):
        d = self.endpoint.connect(self.factory)
        request.connecting = d
        d.addCallbacks(self._connected, self._connect_failed,
                       callbackArgs=(request,), errbackArgs=(request,))

    def _connected(self, conn, request):
        request.connecting = None
        if request.d is None:
            # Cancelled while connecting: the connection is still good.
            self.release(conn)
            return
        request.connection = conn
        conn.send(request)

    def _connect_failed(self, failure, request):
        request.connecting = None
        request.fail(failure)

    def release(self, conn):
        """The connection's quiescent callback: it can take a request."""
        pool = self.pool
        idle = self.idle
        if len(idle) >= pool.max_idle_per_target:
            if not idle:
                conn.close()
                return
            del self.since[0]
            idle.pop(0).close()
        idle.append(conn)
        self.since.append(pool._reactor.seconds())
        pool._idled()

    def forget(self, conn):
        """The connection's idle-lost callback: an idle one went away."""
        try:
            i = self.idle.index(conn)
        except ValueError:
            return  # taken or closed by us already
        del self.idle[i]
        del self.since[i]


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, slot):
        self._slot = slot

    def buildProtocol(self, addr):
        pool = self._slot.pool
        return UpstreamConnection(self._slot.release, self._slot.forget,
                                  pool.max_head_bytes, pool.max_headers)


class _Request:
    """One request and its one Deferred, across attempts.

    What a connection reads and calls is public (see UpstreamConnection.send);
    `connection` is the connection carrying the current attempt, set by
    the pool, for cancelling it.
    """

    __slots__ = ("_pool", "_slot", "target", "method", "path", "headers", "producer", "d",
                 "connection", "connecting", "reused", "retried")

    def __init__(self, pool, slot, target, method, path, headers, producer):
        self._pool = pool
        self._slot = slot
        self.target = target
        self.method = method
        self.path = path
        self.headers = headers
        self.producer = producer
        self.d = defer.Deferred(self._cancel)
        self.connection = None
        self.connecting = None
        self.reused = False
        self.retried = False

    def answer(self, response):
        d = self.d
        if d is not None:
            self.d = None
            d.callback(response)

    def fail(self, failure):
        d = self.d
        if d is not None:
            self.d = None
            d.errback(failure)

    def why_not_resent(self):
        """None when this request may go out again on a fresh connection,
        else the reason it may not."""
        producer = self.producer
        if self.retried:
            return "it was already a retry"
        if producer is not None and not getattr(producer, "restartable", False):
            return "its body cannot be sent again"
        if self.method not in _IDEMPOTENT and not self._pool.retry_non_idempotent:
            return f"{self.method.decode('ascii')} is not idempotent"
        return None

    def stale(self, reason):
        """The reused connection closed before any response byte."""
        why = self.why_not_resent()
        if why is None:
            self.retried = True
            self.reused = False
            self.connection = None
            self._slot.connect(self)
            return
        self.fail(Failure(ResponseNeverReceived([reason, Failure(NotRetried(
            f"a reused connection closed before any response; not retried: {why}"))])))

    def _cancel(self, d):
        # Agent's outcome for a cancelled request, so callers map it the same.
        self.d = None
        got_bytes = False
        if self.connecting is not None:
            connecting, self.connecting = self.connecting, None
            connecting.cancel()
        conn = self.connection
        if conn is not None:
            state = conn.state
            got_bytes = state is RECEIVING or state is TRANSMITTING_AFTER_RESPONSE
            conn.abort()
        cls = ResponseFailed if got_bytes else ResponseNeverReceived
        d.errback(Failure(cls([Failure(defer.CancelledError())])))
