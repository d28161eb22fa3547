"""One upstream HTTP/1.1 connection and the response it delivers.

llhttp (through httptools) frames the responses; this module decides what
they mean for the request, the body consumer and the pool. See
apigw.h1client for the agent and the pool.
"""

import socket

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    PotentialDataLoss,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

log = Logger()

_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# Agent's rule: these announce an empty body explicitly.
_EMPTY_BODY_LENGTH = frozenset({b"POST", b"PUT"})
# Framing is ours to write; a caller's copy would contradict it.
_FRAMING = frozenset({b"Content-Length", b"Transfer-Encoding"})
_VERSIONS = {"1.1": (b"HTTP", 1, 1), "1.0": (b"HTTP", 1, 0)}
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
# Body bytes held for a caller that has not called deliverBody yet, before
# the socket is paused.
_BUFFER_LIMIT = 64 * 1024


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
