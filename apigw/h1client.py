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
- A stale keep-alive connection is detected before use when the peer's close
  is already queued, and otherwise retried once on a fresh connection if no
  response byte came back, for idempotent methods with a re-sendable body
  (none, or a producer with `restartable = True`).
"""

import re
import socket

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    BrowserLikePolicyForHTTPS,
    PotentialDataLoss,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from twisted.web.http_headers import Headers
from zope.interface import implementer

log = Logger()

_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# Agent's rule: these announce an empty body explicitly.
_EMPTY_BODY_LENGTH = frozenset({b"POST", b"PUT"})
# Framing is ours to write; a caller's copy would contradict it.
_FRAMING = frozenset({b"Content-Length", b"Transfer-Encoding"})
# What would break the request line; other bytes go out exactly as given.
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")
_TOKEN = re.compile(rb"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VERSIONS = {"1.1": (b"HTTP", 1, 1), "1.0": (b"HTTP", 1, 0)}
_DEFAULT_PORTS = {b"http": 80, b"https": 443}
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
# Body bytes held for a caller that has not called deliverBody yet, before
# the socket is paused.
_BUFFER_LIMIT = 64 * 1024
_MAX_PREFIXES = 1024


class WrongBodyLength(Exception):
    """The body producer wrote more or fewer bytes than its length said."""


class NotRetried(Exception):
    """A reused connection closed before any response byte, and the request
    could not safely be sent again."""


class _HeadDone(Exception):
    """Stops llhttp after a HEAD answer's headers: it cannot be told that the
    Content-Length there announces no body."""


class _OutOfStep(Exception):
    """Response bytes nobody asked for."""


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


@implementer(IResponse, IPushProducer)
class UpstreamResponse:
    """An IResponse; also the producer the body protocol's transport is, so a
    paused consumer pauses the upstream socket."""

    __slots__ = ("code", "phrase", "version", "headers", "length", "previousResponse",
                 "_conn", "_protocol", "_buffer", "_buffered", "_reason", "_delivered",
                 "_consumer_paused")
    request = None
    # apigw.upstream digs Agent's hidden headers out through this; None tells
    # it that .headers already has them all.
    _transport = None

    def __init__(self, conn, code, phrase, version, headers, length):
        self.code = code
        self.phrase = phrase
        self.version = version
        self.headers = headers
        self.length = length
        self.previousResponse = None
        self._conn = conn
        self._protocol = None
        self._buffer = None
        self._buffered = 0
        self._reason = None
        self._delivered = False
        self._consumer_paused = False

    def setPreviousResponse(self, response):
        self.previousResponse = response

    def deliverBody(self, protocol):
        if self._delivered:
            raise RuntimeError("the response body was already delivered")
        self._delivered = True
        protocol.makeConnection(self)
        self._protocol = protocol
        if self._buffer:
            buffer, self._buffer = self._buffer, None
            for data in buffer:
                protocol.dataReceived(data)
        reason = self._reason
        if reason is not None:
            self._reason = None
            self._protocol = None
            protocol.connectionLost(reason)
        elif self._conn is not None and not self._consumer_paused:
            self._conn._resume()

    def _data(self, data):
        protocol = self._protocol
        if protocol is not None:
            protocol.dataReceived(data)
            return
        if self._buffer is None:
            self._buffer = []
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered > _BUFFER_LIMIT and self._conn is not None:
            self._conn._pause()

    def _finish(self, reason):
        self._conn = None
        protocol = self._protocol
        if protocol is None:
            self._reason = reason
        else:
            self._protocol = None
            protocol.connectionLost(reason)

    def pauseProducing(self):
        self._consumer_paused = True
        if self._conn is not None:
            self._conn._pause()

    def resumeProducing(self):
        self._consumer_paused = False
        if self._conn is not None:
            self._conn._resume()

    def stopProducing(self):
        # The unread rest of the body would put the connection out of step.
        if self._conn is not None:
            self._conn._stop_body(self)


def _done():
    return Failure(ResponseDone("Response body fully received"))


def _has_close(values):
    for value in values:
        for token in value.split(b","):
            if token.strip().lower() == b"close":
                return True
    return False


def _raw_socket(transport):
    # Through a TLS wrapper to the TCP transport under it.
    for _ in range(3):
        sock = getattr(transport, "socket", None)
        if isinstance(sock, socket.socket):
            return sock
        transport = getattr(transport, "transport", None)
        if transport is None:
            return None
    return None


class _Connection(Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, pool, target):
        self._pool = pool
        self._target = target
        self._parser = HttpResponseParser(self)
        self._req = None
        self._resp = None
        self._idle = False
        self.idle_since = 0.0
        self._lost = False
        self._waiters = None
        self._sock = None
        self._paused = False
        self._reused = False
        self._got_byte = False
        self._sending = False
        self._registered = False
        self._producer = None
        self._chunked = False
        self._left = 0
        self._aborted = False
        self._in_headers = False
        self._informational = False
        self._head_done = False
        self._completed = False
        self._fire_at_complete = False
        self._close_delimited = False
        self._keep = False
        self._headers = None
        self._phrase = b""
        self._length = None
        self._te = None
        self._conn_close = False

    def connectionMade(self):
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self._sock = _raw_socket(self.transport)

    def _alive(self):
        """False when the peer's close (or stray bytes) already wait in the
        socket: the stale keep-alive case caught before anything is sent."""
        if self._lost:
            return False
        sock = self._sock
        if sock is None:
            return True
        try:
            sock.recv(1, _PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def _when_lost(self):
        d = defer.Deferred()
        if self._lost:
            d.callback(None)
        else:
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(d)
        return d

    # Sending.

    def _send(self, req, reused):
        self._req = req
        req.conn = self
        self._reused = reused
        self._got_byte = False
        self._aborted = False
        headers = req.headers
        parts = [req.method, b" ", req.path, b" HTTP/1.1\r\n"]
        if headers is None or not headers.hasHeader(b"host"):
            parts += (b"Host: ", self._target.host_header, b"\r\n")
        close = False
        if headers is not None:
            for name, values in headers.getAllRawHeaders():
                if name in _FRAMING:
                    continue
                if name == b"Connection":
                    close = close or _has_close(values)
                for value in values:
                    parts += (name, b": ", value, b"\r\n")
        req.close = close
        producer = req.producer
        if producer is None:
            if req.method in _EMPTY_BODY_LENGTH:
                parts.append(b"Content-Length: 0\r\n")
            parts.append(b"\r\n")
            self._sending = False
            self.transport.write(b"".join(parts))
            return
        length = producer.length
        if length is UNKNOWN_LENGTH:
            self._chunked = True
            parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
        else:
            self._chunked = False
            self._left = length
            parts.append(b"Content-Length: %d\r\n\r\n" % length)
        self._sending = True
        self._producer = producer
        self.transport.write(b"".join(parts))
        try:
            d = producer.startProducing(req)
        except Exception:
            d = defer.fail()
        if d.called and not isinstance(d.result, Failure):
            # Written synchronously (a small body): no callbacks needed.
            self._body_sent(None, req)
            return
        if not d.called and self._req is req and self._sending:
            self.transport.registerProducer(producer, True)
            self._registered = True
        d.addCallbacks(self._body_sent, self._body_failed,
                       callbackArgs=(req,), errbackArgs=(req,))

    def _write_body(self, data):
        if self._chunked:
            if data:
                self.transport.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))
            return
        self._left -= len(data)
        if self._left < 0:
            self._abort(Failure(RequestGenerationFailed(
                [Failure(WrongBodyLength("body producer wrote more than its length"))])))
            return
        self.transport.write(data)

    def _body_sent(self, _, req):
        if self._req is not req or not self._sending:
            return
        self._stop_sending(stop_producer=False)
        if self._chunked:
            self.transport.write(b"0\r\n\r\n")
        elif self._left:
            self._abort(Failure(RequestGenerationFailed(
                [Failure(WrongBodyLength("body producer wrote less than its length"))])))

    def _body_failed(self, failure, req):
        if self._req is req and self._sending:
            self._stop_sending(stop_producer=False)
            self._abort(Failure(RequestGenerationFailed([failure])))
        # An abandoned attempt's producer failing is nobody's concern.

    def _stop_sending(self, stop_producer=True):
        if not self._sending:
            return
        self._sending = False
        if self._registered:
            self._registered = False
            self.transport.unregisterProducer()
        producer, self._producer = self._producer, None
        if stop_producer:
            try:
                producer.stopProducing()
            except Exception:
                pass  # finished or already stopped by the transport

    # Receiving: llhttp callbacks.

    def dataReceived(self, data):
        if self._req is None:
            # Bytes on a connection with nothing asked: out of step.
            self._abort(None)
            return
        self._got_byte = True
        self._completed = False
        try:
            self._parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade) as e:
            if self._head_done:
                self._head_done = False
                self._parser = HttpResponseParser(self)
                if not data.endswith(b"\r\n\r\n"):
                    self._keep = False  # more than the HEAD answer came
                self._message_complete()
                return
            cause = e.__context__
            if cause is not None and not isinstance(cause, (_OutOfStep, _HeadDone)):
                log.failure("h1client parser callback failed",
                            Failure(cause, type(cause), cause.__traceback__))
            self._abort(Failure(e))

    def on_message_begin(self):
        if self._completed or self._req is None:
            raise _OutOfStep()
        self._in_headers = True
        self._headers = Headers()
        self._phrase = b""
        self._length = None
        self._te = None
        self._conn_close = False

    def on_status(self, data):
        self._phrase += data

    def on_header(self, name, value):
        if not self._in_headers:
            return  # a chunked body's trailers
        self._headers.addRawHeader(name, value)
        size = len(name)
        if size == 14 or size == 17 or size == 10:
            lower = name.lower()
            if lower == b"content-length":
                self._length = int(value)
            elif lower == b"transfer-encoding":
                self._te = value
            elif lower == b"connection" and _has_close((value,)):
                self._conn_close = True

    def on_headers_complete(self):
        self._in_headers = False
        parser = self._parser
        code = parser.get_status_code()
        if code < 200:
            self._informational = True  # 1xx: skipped, the answer follows
            return
        req = self._req
        version = parser.get_http_version()
        self._keep = version == "1.1" and not self._conn_close and not req.close
        self._close_delimited = False
        head = req.method == b"HEAD"
        if head or code == 204 or code == 304:
            length = 0
        elif self._te is not None:
            length = UNKNOWN_LENGTH
            if self._te.rpartition(b",")[2].strip().lower() != b"chunked":
                self._close_delimited = True
        elif self._length is not None:
            length = self._length
        else:
            length = UNKNOWN_LENGTH
            self._close_delimited = True
        if self._close_delimited:
            self._keep = False
        major, _, minor = version.partition(".")
        response = UpstreamResponse(
            self, code, self._phrase,
            _VERSIONS.get(version) or (b"HTTP", int(major), int(minor)),
            self._headers, length,
        )
        self._resp = response
        self._headers = None
        if length == 0:
            # Like Agent: the connection is back in the pool before the
            # caller sees a body-less response.
            self._fire_at_complete = True
        else:
            req.fire(response)
        if head:
            self._head_done = True
            raise _HeadDone()

    def on_body(self, data):
        response = self._resp
        if response is not None and not self._aborted:
            response._data(data)

    def on_message_complete(self):
        if self._informational:
            self._informational = False
            return
        if self._req is None or self._aborted:
            return
        self._completed = True
        self._message_complete()

    def _message_complete(self):
        req, response = self._req, self._resp
        self._req = self._resp = None
        req.conn = None
        keep = self._keep
        if self._sending:
            # The answer came before the whole request went out.
            self._stop_sending()
            keep = False
        if keep and not self._lost:
            self._resume()
            self._pool._release(self)
        else:
            self.transport.loseConnection()
        response._finish(_done())
        if self._fire_at_complete:
            self._fire_at_complete = False
            req.fire(response)

    # Flow control and failure.

    def _pause(self):
        if not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def _resume(self):
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def _stop_body(self, response):
        if self._resp is response and not self._aborted:
            self._aborted = True
            self._stop_sending()
            self.transport.abortConnection()

    def _abort(self, failure):
        """Drop the connection; fail whatever the current request's caller
        waits on with `failure` (None: the caller already knows)."""
        req, response = self._req, self._resp
        self._req = self._resp = None
        self._fire_at_complete = False
        self._aborted = True
        if self._idle:
            self._pool._forget(self)
        self._stop_sending()
        self.transport.abortConnection()
        if failure is None:
            return
        if response is not None and req.d is None:
            response._finish(Failure(ResponseFailed([failure])))
        elif req is not None:
            if not isinstance(failure.value, (ResponseFailed, RequestGenerationFailed)):
                failure = Failure(ResponseFailed([failure]))
            req.fail(failure)

    def connectionLost(self, reason):
        self._lost = True
        if self._idle:
            self._pool._forget(self)
        req, response = self._req, self._resp
        if req is not None:
            was_sending = self._sending
            self._req = self._resp = None
            self._fire_at_complete = False
            self._stop_sending()
            if response is not None and req.d is None:
                if self._close_delimited and not self._aborted:
                    response._finish(Failure(PotentialDataLoss()))
                else:
                    response._finish(Failure(ResponseFailed([reason])))
            elif not self._got_byte and self._reused:
                self._stale(req, reason)
            elif was_sending:
                req.fail(Failure(RequestTransmissionFailed([reason])))
            else:
                cls = ResponseFailed if self._got_byte else ResponseNeverReceived
                req.fail(Failure(cls([reason])))
        waiters, self._waiters = self._waiters, None
        for d in waiters or ():
            d.callback(None)

    def _stale(self, req, reason):
        """A reused connection died with no answer: most likely the server
        closed it while idle, as our request crossed its FIN."""
        producer = req.producer
        why = None
        if req.retried:
            why = "it was already a retry"
        elif producer is not None and not getattr(producer, "restartable", False):
            why = "its body cannot be sent again"
        elif req.method not in _IDEMPOTENT and not self._pool.retry_non_idempotent:
            why = f"{req.method.decode('ascii')} is not idempotent"
        if why is None:
            req.retried = True
            req.conn = None
            self._pool._connect(req)
            return
        req.fail(Failure(ResponseNeverReceived([reason, Failure(NotRetried(
            f"a reused connection closed before any response; not retried: {why}"))])))
