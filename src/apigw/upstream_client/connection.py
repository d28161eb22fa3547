r"""One keep-alive HTTP/1.1 connection to an upstream, one request at a time.

llhttp (through httptools) frames the responses; this module decides what
they mean for the request, the body consumer and whoever reuses the
connection. Its lifecycle is the one `state` attribute:

    QUIESCENT -- send() --> TRANSMITTING (a body is being produced)
                        \-> WAITING      (the whole request is out)
    TRANSMITTING -- body sent --> WAITING
    TRANSMITTING -- a response byte --> TRANSMITTING_AFTER_RESPONSE
    WAITING -- a response byte --> RECEIVING
    TRANSMITTING_AFTER_RESPONSE -- body sent --> RECEIVING
    RECEIVING / TRANSMITTING_AFTER_RESPONSE -- response complete --> DONE
    DONE -- once llhttp has returned --> QUIESCENT (kept alive, handed back
            through on_quiescent) or CLOSING
    RECEIVING -- 101 to a request that asked to upgrade --> UPGRADED
    any -- abort(), close(), a framing error, stop_reading() --> CLOSING
    any -- connectionLost --> LOST

UPGRADED is for good: the connection never goes back to its owner, and
once someone calls take_over(protocol) (UpstreamResponse.take_over, for a
WebSocket tunnel) every byte and the connection's end go to that protocol.

A QUIESCENT connection that goes away reports through on_idle_lost, so its
owner can forget it. DONE lasts only until the bytes being parsed are
parsed: a reply's successor in the same read must not be taken for the
answer to a request sent (after the hand-back) while those bytes are parsed.
"""

import socket

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser
from twisted.internet import defer
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IConsumer
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
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from apigw.sendnow import SendNow
from apigw.upstream_client.response import UpstreamResponse

__all__ = [
    "CLOSING", "DONE", "LOST", "QUIESCENT", "RECEIVING", "STATES", "TRANSMITTING",
    "TRANSMITTING_AFTER_RESPONSE", "UPGRADED", "WAITING", "HeadTooLarge", "UpstreamConnection",
    "WrongBodyLength",
]

log = Logger()

QUIESCENT = "QUIESCENT"
TRANSMITTING = "TRANSMITTING"
WAITING = "WAITING"
TRANSMITTING_AFTER_RESPONSE = "TRANSMITTING_AFTER_RESPONSE"
RECEIVING = "RECEIVING"
DONE = "DONE"
UPGRADED = "UPGRADED"
CLOSING = "CLOSING"
LOST = "LOST"
STATES = (QUIESCENT, TRANSMITTING, WAITING, TRANSMITTING_AFTER_RESPONSE, RECEIVING, DONE,
          UPGRADED, CLOSING, LOST)

# Agent's rule: these announce an empty body explicitly.
_EMPTY_BODY_LENGTH = frozenset({b"POST", b"PUT"})
_VERSIONS = {"1.1": (b"HTTP", 1, 1), "1.0": (b"HTTP", 1, 0)}
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
_LINE_HOST = b" HTTP/1.1\r\nHost: "
_LINE = b" HTTP/1.1\r\n"


class WrongBodyLength(Exception):
    """The body producer wrote more or fewer bytes than its length said."""


class HeadTooLarge(Exception):
    """The response head passed the connection's byte or header-count limit."""


class _HeadDone(Exception):
    """Stops llhttp after a HEAD answer's headers: it cannot be told that the
    Content-Length there announces no body."""


class _OutOfStep(Exception):
    """Response bytes nobody asked for."""


# Every complete body ends with this one Failure: it carries no traceback,
# and building a Failure per response cost more than the rest of the
# end-of-body path. Body protocols only look at it: never raise it or
# errback a Deferred with it (it would keep that request's frames).
_DONE = Failure(ResponseDone("Response body fully received"))


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


@implementer(IConsumer)
class UpstreamConnection(Protocol):
    """One keep-alive connection carrying one request at a time.

    Whoever owns it (the pool) gets it back through `on_quiescent(conn)`
    each time it is free for another request, and learns through
    `on_idle_lost(conn)` that a free one went away. It is also the consumer
    the request's body producer writes to.
    """

    def __init__(self, on_quiescent, on_idle_lost, max_head_bytes=64 * 1024, max_headers=100):
        self.state = QUIESCENT
        # An upstream sending endless header lines would otherwise grow us
        # without bound until its deadline.
        self._max_head_bytes = max_head_bytes
        self._max_headers = max_headers
        self._head_bytes = 0
        self._on_quiescent = on_quiescent
        self._on_idle_lost = on_idle_lost
        self._parser = HttpResponseParser(self)
        self._sock = None
        self._lost_waiters = None
        # Reading is paused (for a slow or absent body consumer).
        self._paused = False
        # The exchange in progress.
        self._request = None
        self._response = None
        self._producer = None  # the body producer registered with our transport
        self._body_left = None  # bytes the producer still owes; None: chunked
        self._keep = False  # the connection outlives this exchange: nobody said close
        self._upgrade = False  # the request asked to switch protocols (Upgrade)
        # After a 101: who took the connection over, or what waits for them.
        self._taken_by = None
        self._upgraded_bytes = []
        self._upgraded_lost = None
        self._until_close = False  # the response body ends with the connection
        # The response head being parsed.
        self._raw_headers = None
        self._phrase = b""
        self._length = None
        self._te = None

    def connectionMade(self):
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self._sock = _raw_socket(self.transport)
        # Every byte of a request goes through it, so their order holds.
        self._out = SendNow(self.transport)

    # What the owner calls.

    def alive(self, peek=True):
        """Whether this connection can take a request: quiescent, and (with
        `peek`) the peer's close (or stray bytes) not already waiting in the
        socket, the stale keep-alive case caught before anything is sent."""
        if self.state is not QUIESCENT:
            return False
        sock = self._sock
        if sock is None or not peek:
            return True
        try:
            sock.recv(1, _PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def send(self, request):
        """Write `request` on this quiescent connection and see it answered.

        `request` has `method`, `path` (the request target, already checked),
        `headers` (Headers, (name, value) pairs, or None), `producer` (an
        IBodyProducer or None), `target.host_header` and `reused` (whether
        the connection sat idle before). The outcome comes through one of
        `answer(response)`, `fail(failure)`, or `stale(reason)`: a reused
        connection closed before any response byte, so the request may be
        sent again elsewhere. `answer` comes again when the response is
        complete; only the first call counts.
        """
        try:
            head = self._head(request)
        except Exception:
            # Nothing was written: the connection is as good as before.
            request.fail(Failure())
            self._on_quiescent(self)
            return
        self._request = request
        self._response = None
        producer = request.producer
        if producer is None:
            self.state = WAITING
            self._out.write(head)
            return
        self.state = TRANSMITTING
        self._out.write(head)
        try:
            d = producer.startProducing(self)
        except Exception:
            d = defer.fail()
        if d.called and not isinstance(d.result, Failure):
            # Written synchronously (a small body): no callbacks needed.
            self._body_sent(None, request)
            return
        if not d.called and self._request is request and self.state is TRANSMITTING:
            self.transport.registerProducer(producer, True)
            self._producer = producer
        d.addCallbacks(self._body_sent, self._body_failed,
                       callbackArgs=(request,), errbackArgs=(request,))

    def abort(self):
        """Drop the connection now; a request it carries fails."""
        self._abort(Failure(ConnectionAborted()))

    def close(self):
        """Close the connection (aborting an exchange in progress); fires
        when it is gone."""
        d = defer.Deferred()
        if self.state is LOST:
            d.callback(None)
            return d
        if self._lost_waiters is None:
            self._lost_waiters = []
        self._lost_waiters.append(d)
        if self.state is QUIESCENT:
            self.state = CLOSING
            self.transport.loseConnection()
        elif self.state is not CLOSING:
            self.abort()
        return d

    def take_over(self, protocol):
        """After a 101 (state UPGRADED): `protocol` gets this connection's
        transport, the bytes that came after the 101's head, and from then
        on every byte and the end of the connection. The pool never sees
        the connection again."""
        if self.state is not UPGRADED and self._upgraded_lost is None:
            raise RuntimeError(f"take_over() in state {self.state}, not after a 101")
        self._taken_by = protocol
        protocol.makeConnection(self.transport)
        pending, self._upgraded_bytes = self._upgraded_bytes, []
        for data in pending:
            protocol.dataReceived(data)
        if self._upgraded_lost is not None:
            reason, self._upgraded_lost = self._upgraded_lost, None
            protocol.connectionLost(reason)

    # What the response calls.

    def pause_reading(self):
        if not self._paused and self.state is not LOST:
            self._paused = True
            self.transport.pauseProducing()

    def resume_reading(self):
        if self._paused and self.state is not LOST:
            self._paused = False
            self.transport.resumeProducing()

    def stop_reading(self):
        """The caller wants no more of this body. The rest would put the
        connection out of step, so it goes; connectionLost ends the body."""
        state = self.state
        if state is RECEIVING or state is TRANSMITTING_AFTER_RESPONSE:
            if state is TRANSMITTING_AFTER_RESPONSE:
                self._stop_sending(stop_producer=True)
            self.state = CLOSING
            self.transport.abortConnection()
        elif state is UPGRADED and self._taken_by is None:
            # A 101 nobody will take over (the client left meanwhile).
            self.state = CLOSING
            self.transport.abortConnection()

    # Sending.

    def _head(self, request):
        """The request head as bytes; remembers whether it asked to close."""
        method = request.method
        headers = request.headers
        parts = [method, b" ", request.path, _LINE_HOST, request.target.host_header, b"\r\n"]
        host_given = False
        keep = True
        upgrade = False
        pairs = 0
        if headers is None:
            pass
        elif isinstance(headers, (list, tuple)):
            for name, value in headers:
                size = len(name)
                if size == 4 or size == 7 or size == 10 or size == 14 or size == 17:
                    lower = name.lower()
                    if lower == b"content-length" or lower == b"transfer-encoding":
                        continue  # framing is ours to write
                    if lower == b"host":
                        host_given = True
                    elif lower == b"connection" and _has_close((value,)):
                        keep = False
                    elif lower == b"upgrade":
                        upgrade = True
                parts += (name, b": ", value, b"\r\n")
                pairs += 1
        else:
            for name, values in headers.getAllRawHeaders():
                # Headers gives names in canonical case.
                if name == b"Content-Length" or name == b"Transfer-Encoding":
                    continue
                if name == b"Host":
                    host_given = True
                elif name == b"Connection" and _has_close(values):
                    keep = False
                elif name == b"Upgrade":
                    upgrade = True
                for value in values:
                    parts += (name, b": ", value, b"\r\n")
        if host_given:
            parts[3] = _LINE
            del parts[4:6]
        producer = request.producer
        if producer is None:
            parts.append(b"Content-Length: 0\r\n\r\n" if method in _EMPTY_BODY_LENGTH
                         else b"\r\n")
        elif producer.length is UNKNOWN_LENGTH:
            self._body_left = None
            parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
        else:
            self._body_left = producer.length
            parts.append(b"Content-Length: %d\r\n\r\n" % producer.length)
        head = b"".join(parts)
        if pairs:
            # Pairs are written as given; a CR or LF in one would forge
            # header lines (Headers would have folded it away). Every line
            # break in the head must be one of ours.
            lines = 1 + pairs + (not host_given) + (parts[-1] != b"\r\n") + 1
            if head.count(b"\n") != lines or head.count(b"\r") != lines:
                raise ValueError("a request header name or value holds CR or LF")
        self._keep = keep
        self._upgrade = upgrade
        return head

    def write(self, data):
        state = self.state
        if state is not TRANSMITTING and state is not TRANSMITTING_AFTER_RESPONSE:
            return  # a late write from an abandoned attempt
        left = self._body_left
        if left is None:
            if data:
                self._out.write(b"%x\r\n%s\r\n" % (len(data), data))
            return
        left -= len(data)
        self._body_left = left
        if left < 0:
            self._abort(Failure(RequestGenerationFailed(
                [Failure(WrongBodyLength("body producer wrote more than its length"))])))
            return
        self._out.write(data)

    def registerProducer(self, producer, streaming):
        pass  # send() registers the body producer with the socket itself

    def unregisterProducer(self):
        pass

    def _body_sent(self, _, request):
        state = self.state
        if self._request is not request or (
                state is not TRANSMITTING and state is not TRANSMITTING_AFTER_RESPONSE):
            return
        self._stop_sending(stop_producer=False)
        self.state = WAITING if state is TRANSMITTING else RECEIVING
        if self._body_left is None:
            self._out.write(b"0\r\n\r\n")
        elif self._body_left:
            self._abort(Failure(RequestGenerationFailed(
                [Failure(WrongBodyLength("body producer wrote less than its length"))])))

    def _body_failed(self, failure, request):
        state = self.state
        if self._request is request and (
                state is TRANSMITTING or state is TRANSMITTING_AFTER_RESPONSE):
            self._abort(Failure(RequestGenerationFailed([failure])), stop_producer=False)
        # An abandoned attempt's producer failing is nobody's concern.

    def _stop_sending(self, stop_producer):
        """Called while transmitting, before the request is let go."""
        registered, self._producer = self._producer, None
        if registered is not None:
            self.transport.unregisterProducer()
        if stop_producer:
            try:
                self._request.producer.stopProducing()
            except Exception:
                pass  # finished or already stopped by the transport

    # Receiving: llhttp callbacks.

    def dataReceived(self, data):
        state = self.state
        if state is UPGRADED:
            taken_by = self._taken_by
            if taken_by is not None:
                taken_by.dataReceived(data)
            else:
                self._upgraded_bytes.append(data)
            return
        if state is WAITING:
            self.state = RECEIVING
        elif state is TRANSMITTING:
            self.state = TRANSMITTING_AFTER_RESPONSE
        elif state is not RECEIVING and state is not TRANSMITTING_AFTER_RESPONSE:
            if state is not LOST:
                self._abort(None)  # bytes with nothing asked: out of step
            return
        try:
            self._parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade) as e:
            self._parser_stopped(e, data)
            return
        if self.state is DONE:
            self._complete()
        elif self._response is not None:
            # What this read held is parsed and valid: the caller may now
            # commit to what it has (a head held back until then).
            self._response.read_done()

    def _parser_stopped(self, error, data):
        cause = error.__context__
        state = self.state
        if state is UPGRADED:
            # llhttp stops at the end of the 101's head: what follows in
            # this read is the new protocol's, for whoever takes it over.
            rest = data[error.args[0]:] if error.args else b""
            if rest:
                self._upgraded_bytes.append(rest)
            request, response = self._request, self._response
            self._request = self._response = None
            request.answer(response)
            return
        if state is DONE:
            # A complete answer, then llhttp stopped: after a HEAD answer's
            # headers on purpose, or at bytes past the answer.
            self._parser = HttpResponseParser(self)
            if isinstance(cause, _HeadDone) and data.endswith(b"\r\n\r\n"):
                self._complete()
                return
            self._keep = False
            self._complete()
            self.transport.abortConnection()
            return
        if state is CLOSING or state is LOST:
            return  # given up on inside a callback already
        if isinstance(cause, HeadTooLarge):
            self._abort(Failure(cause))
            return
        if cause is not None and not isinstance(cause, _OutOfStep):
            log.failure("upstream parser callback failed",
                        Failure(cause, type(cause), cause.__traceback__))
        self._abort(Failure(error))

    def on_message_begin(self):
        state = self.state
        if state is not RECEIVING and state is not TRANSMITTING_AFTER_RESPONSE:
            raise _OutOfStep()
        self._raw_headers = []
        self._phrase = b""
        self._length = None
        self._te = None
        self._head_bytes = 0

    def on_status(self, data):
        self._phrase += data
        self._count_head(len(data))

    def on_header(self, name, value):
        headers = self._raw_headers
        if headers is None:
            return  # a chunked body's trailers
        headers.append((name, value))
        # _count_head, inline: this runs for every header of every response.
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._max_head_bytes:
            raise HeadTooLarge(f"a response head over {self._max_head_bytes} bytes")
        if len(headers) > self._max_headers:
            raise HeadTooLarge(f"more than {self._max_headers} header lines")
        size = len(name)
        if size == 14 or size == 17 or size == 10:
            lower = name.lower()
            if lower == b"content-length":
                self._length = int(value)
            elif lower == b"transfer-encoding":
                self._te = value
            elif lower == b"connection" and _has_close((value,)):
                self._keep = False

    def _count_head(self, size):
        # llhttp hands long lines over in pieces as they arrive: counting
        # per callback stops a head that never ends.
        self._head_bytes += size
        if self._head_bytes > self._max_head_bytes:
            raise HeadTooLarge(f"a response head over {self._max_head_bytes} bytes")

    def on_headers_complete(self):
        raw_headers, self._raw_headers = self._raw_headers, None
        parser = self._parser
        code = parser.get_status_code()
        request = self._request
        if code == 101 and self._upgrade and self.state is RECEIVING:
            # The switch asked for: answered once llhttp stops (_parser_stopped).
            self._response = UpstreamResponse(
                self, code, self._phrase, _VERSIONS.get(parser.get_http_version(),
                                                       (b"HTTP", 1, 1)),
                raw_headers, 0)
            self.state = UPGRADED
            return
        if code < 200:
            return  # 1xx: skipped, the answer follows
        version = parser.get_http_version()
        head = request.method == b"HEAD"
        until_close = False
        if head or code == 204 or code == 304:
            length = 0
        elif self._te is not None:
            length = UNKNOWN_LENGTH
            until_close = self._te.rpartition(b",")[2].strip().lower() != b"chunked"
        elif self._length is not None:
            length = self._length
        else:
            length = UNKNOWN_LENGTH
            until_close = True
        self._until_close = until_close
        self._keep = self._keep and version == "1.1" and not until_close
        if version in _VERSIONS:
            version_tuple = _VERSIONS[version]
        else:
            major, _, minor = version.partition(".")
            version_tuple = (b"HTTP", int(major), int(minor))
        response = UpstreamResponse(self, code, self._phrase, version_tuple, raw_headers, length)
        self._response = response
        if length != 0:
            request.answer(response)
        # else like Agent: the connection is back in the pool before the
        # caller sees a body-less response.
        if head:
            self._message_done()
            raise _HeadDone()

    def on_body(self, data):
        response = self._response
        if response is not None and self.state is not CLOSING:
            response.body_received(data)

    def on_message_complete(self):
        state = self.state
        if self._response is None or (
                state is not RECEIVING and state is not TRANSMITTING_AFTER_RESPONSE):
            return  # a 1xx answer, or one we stopped reading
        self._message_done()

    def _message_done(self):
        if self.state is TRANSMITTING_AFTER_RESPONSE:
            # The answer came before the whole request went out.
            self._stop_sending(stop_producer=True)
            self._keep = False
        self.state = DONE

    def _complete(self):
        request, response = self._request, self._response
        self._request = self._response = None
        if self._keep:
            self.state = QUIESCENT
            self.resume_reading()
            self._on_quiescent(self)
        else:
            self.state = CLOSING
            self.transport.loseConnection()
        response.body_finished(_DONE)
        request.answer(response)

    # Failure.

    def _abort(self, failure, stop_producer=True):
        """Drop the connection; fail whatever the current request's caller
        waits on with `failure` (None: the caller already knows)."""
        state = self.state
        if state is LOST:
            return
        if state is CLOSING:
            self.transport.abortConnection()
            return
        if state is TRANSMITTING or state is TRANSMITTING_AFTER_RESPONSE:
            self._stop_sending(stop_producer)
        request, response = self._request, self._response
        self._request = self._response = None
        self.state = CLOSING
        self.transport.abortConnection()
        if state is QUIESCENT:
            self._on_idle_lost(self)
            return
        if failure is None or request is None:
            return
        if response is not None:
            response.body_finished(Failure(ResponseFailed([failure])))
            return
        if not isinstance(failure.value, (ResponseFailed, RequestGenerationFailed)):
            failure = Failure(ResponseFailed([failure]))
        request.fail(failure)

    def connectionLost(self, reason):
        state = self.state
        if self._taken_by is not None:
            self.state = LOST
            self._taken_by.connectionLost(reason)
            return
        if state is UPGRADED:
            self.state = LOST
            self._upgraded_lost = reason
            return
        if state is TRANSMITTING or state is TRANSMITTING_AFTER_RESPONSE:
            self._stop_sending(stop_producer=True)
        request, response = self._request, self._response
        self._request = self._response = None
        self.state = LOST
        if state is QUIESCENT:
            self._on_idle_lost(self)
        elif response is not None:
            if self._until_close and state is not CLOSING and reason.check(ConnectionDone):
                # Only a clean close ends such a body; a reset cuts it.
                response.body_finished(Failure(PotentialDataLoss()))
            else:
                response.body_finished(Failure(ResponseFailed([reason])))
        elif request is not None:
            if (state is TRANSMITTING or state is WAITING) and request.reused:
                # Most likely the server closed it while idle, as our
                # request crossed its FIN.
                request.stale(reason)
            elif state is TRANSMITTING or state is TRANSMITTING_AFTER_RESPONSE:
                request.fail(Failure(RequestTransmissionFailed([reason])))
            elif state is WAITING:
                request.fail(Failure(ResponseNeverReceived([reason])))
            else:
                request.fail(Failure(ResponseFailed([reason])))
        waiters, self._lost_waiters = self._lost_waiters, None
        for d in waiters or ():
            d.callback(None)
