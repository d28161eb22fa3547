"""The client-facing HTTP/1.1 channel, with the limits an edge server needs.

twisted.web's HTTPChannel already refuses smuggling shapes (Content-Length
with Transfer-Encoding, duplicate lengths, bad chunk sizes, NUL or bare CR
in headers). What it lacks for the front door: a deadline for the request
head (a client trickling one byte a second defeats an idle timeout), a
polite answer to over-long lines, and a cap on open connections. Its
deadlines are checked by the site's watchdog (apigw.deadlines), not by a
reactor timer per request.
"""

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.web import http
from zope.interface import implementer

from apigw._twisted_compat import request_line, take_unread_bytes
from apigw.headers import connection_tokens

log = Logger()


@implementer(IHalfCloseableProtocol)
class GatewayChannel(http.HTTPChannel):
    MAX_LENGTH = 8 * 1024  # one request line or header line
    maxHeaders = 100
    totalHeadersSize = 32 * 1024

    # When the current request head began (or the connection opened), or
    # None once the head is in; when the connection last went idle.
    _head_started = None
    _idle_since = None
    _in_request = False
    _answered_early = False
    # While a request's body is being read: when its last bytes came.
    _body_since = None
    # The client shut down its sending side (it has said all it will).
    _read_closed = False

    _host = None
    _http10_keep_alive = False
    # The protocol this connection was handed to (switch_protocol).
    _switched_to = None

    def connectionMade(self):
        super().connectionMade()
        self._head_started = self.factory.clock.seconds()
        self.factory.connection_opened(self)

    _secure = None

    def isSecure(self):
        # Asked per request (X-Forwarded-Proto); adapting the transport to
        # ISSLTransport each time is a zope lookup, and it never changes.
        if self._secure is None:
            self._secure = super().isSecure()
        return self._secure

    def getHost(self):
        # Every request asks (twisted.web's Request.__init__); the local
        # address of a connection never changes, and asking costs a
        # getsockname(2) each time.
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def dataReceived(self, data):
        # First bytes of the next request on a kept-alive connection: the
        # head must now arrive within the deadline, however slowly it trickles.
        if self._head_started is None and not self._in_request:
            self._head_started = self.factory.clock.seconds()
            self._idle_since = None
        elif self._body_since is not None:
            self._body_since = self.factory.clock.seconds()
        super().dataReceived(data)

    def checkPersistence(self, request, version):
        # twisted.web closes every HTTP/1.0 connection, since it cannot know
        # yet whether the answer will have a length. A 1.0 client asking for
        # keep-alive keeps the connection if it does: see http10_keep_alive.
        self._http10_keep_alive = version == b"HTTP/1.0" and _asks_keep_alive(request)
        if self._http10_keep_alive:
            return True
        return super().checkPersistence(request, version)

    def http10_keep_alive(self, request, code, has_length):
        """Called as the head of `request`'s answer is written: for an HTTP/1.0
        keep-alive client, say keep-alive if the body's end is known, else
        close after it, as that is then the only end a 1.0 client knows."""
        if not (self._http10_keep_alive and self.persistent):
            return
        if has_length or request.method == b"HEAD" or code in http.NO_BODY_CODES:
            request.responseHeaders.setRawHeaders(b"connection", [b"keep-alive"])
        else:
            self.persistent = False

    def writeHeaders(self, version, code, reason, headers):
        # The head of an answer twisted.web's Request writes (the gateway's
        # own); relayed answers come through GatewayRequest.start_response.
        if self._http10_keep_alive and self.requests:
            self.http10_keep_alive(self.requests[0], int(code), headers.hasHeader(b"content-length"))
        super().writeHeaders(version, code, reason, headers)

    def allHeadersReceived(self):
        self._head_started = None
        self._in_request = True
        self._body_since = self.factory.clock.seconds()
        super().allHeadersReceived()

    def requestDone(self, request):
        self._in_request = False
        self._idle_since = self.factory.clock.seconds()
        super().requestDone(request)

    def body_resumed(self):
        """Reading resumes after the checks held the body back: the body
        deadline counts from now, not from while the gateway kept it."""
        if self._body_since is not None:
            self._body_since = self.factory.clock.seconds()

    def check_deadline(self, now):
        """The site's watchdog asks: drop a head that takes too long to
        arrive (however slowly it trickles) and a keep-alive connection
        idle for too long."""
        factory = self.factory
        if self._head_started is not None:
            if now - self._head_started >= factory.header_timeout_s:
                self._head_started = None
                self._head_too_slow()
        elif self._body_since is not None:
            if now - self._body_since >= factory.body_timeout_s:
                # A body trickled slower than this would hold the connection
                # (and a buffer) for as long as the client likes.
                self._body_since = None
                log.info("dropping {peer}: no request body bytes for {timeout}s",
                         peer=_peer(self), timeout=factory.body_timeout_s)
                self._reject(b"408 Request Timeout")
        elif self._idle_since is not None and now - self._idle_since >= factory.idle_timeout_s:
            self._idle_since = None
            self.transport.loseConnection()

    def answer_early(self, request):
        """Process `request` before its body is in (it will only be refused
        as too large), then close: reading and discarding gigabytes would
        only serve the sender."""
        self._answered_early = True
        self._body_since = None
        self.persistent = False
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        # HTTPChannel looks for Expect: 100-continue after gotLength(), where
        # a declared length is refused: no invitation to upload it.
        request.requestHeaders.removeHeader(b"expect")
        self.dataReceived = lambda data: None
        request.requestReceived(*request_line(self))

    def allContentReceived(self):
        self._body_since = None
        if not self._answered_early:  # else already handed to the request
            super().allContentReceived()

    def switch_protocol(self, protocol):
        """Hand the connection to `protocol` once the request being handled
        was answered 101 (a WebSocket tunnel): from here on it gets every
        byte the client sends, those already read included, and the
        connection's end; twisted.web sees nothing more of it. The site
        still counts the connection as open (its cap; closed on shutdown)."""
        self._head_started = self._idle_since = self._body_since = None
        self._switched_to = protocol
        unread = take_unread_bytes(self)
        # The channel is the transport's producer; the protocol will be.
        self.transport.unregisterProducer()
        self.dataReceived = protocol.dataReceived
        protocol.makeConnection(self.transport)
        if unread:
            protocol.dataReceived(unread)

    def readConnectionLost(self):
        """The client shut down its sending side (shutdown(SHUT_WR), `printf
        ... | socat`, some HTTP/1.0 tools): answer what it asked, then close,
        instead of dropping the request with the connection."""
        if self._switched_to is not None:
            self._switched_to.readConnectionLost()
            return
        self._read_closed = True
        self.persistent = False
        if not self._in_request:
            # Nothing asked, or a head it will never finish.
            self.transport.loseConnection()
        elif self._body_since is not None:
            self.transport.abortConnection()  # a body that will never come

    def writeConnectionLost(self):
        # We never shut down our sending side ourselves.
        self.transport.abortConnection()

    def lineLengthExceeded(self, line):
        # HTTPChannel would just close; tell the client what was too long.
        # It queues a Request once a request line is in, and drops it when
        # answered: an empty queue means the request line is what overflowed.
        if not self.requests:
            status = b"414 URI Too Long"
        else:
            status = b"431 Request Header Fields Too Large"
        self._reject(status)

    def connectionLost(self, reason):
        self._head_started = self._idle_since = None
        self.factory.connection_closed(self)
        if self._switched_to is not None:
            # Not twisted.web's: its request was handed over with the rest.
            self._switched_to.connectionLost(reason)
            return
        super().connectionLost(reason)

    def _head_too_slow(self):
        log.info(
            "dropping {peer}: request head not complete within {timeout}s",
            peer=_peer(self), timeout=self.factory.header_timeout_s,
        )
        self._reject(b"408 Request Timeout")

    def _reject(self, status):
        self.transport.write(
            b"HTTP/1.1 " + status
            + b"\r\nServer: apigw\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        )
        self.transport.loseConnection()
        # Ignore whatever else the client sends while we close.
        self.dataReceived = lambda data: None


def _peer(channel):
    peer = channel.transport.getPeer()
    return getattr(peer, "host", str(peer))


def _asks_keep_alive(request):
    return b"keep-alive" in connection_tokens(request.requestHeaders.getRawHeaders(b"connection"))


class ConnectionLimit:
    """Counts open client connections; refuses new ones past `limit`.

    Refusals are logged at most once per `log_every_s` so a flood of idle
    connections cannot also flood the log.
    """

    def __init__(self, limit, clock, log_every_s=10.0):
        self.limit = limit
        self.open = 0
        self._clock = clock
        self._log_every_s = log_every_s
        self._last_logged = None
        self._refused_since_log = 0

    def admit(self, addr):
        if self.open < self.limit:
            return True
        self._refused_since_log += 1
        now = self._clock.seconds()
        if self._last_logged is None or now - self._last_logged >= self._log_every_s:
            log.warn(
                "connection limit of {limit} reached: refused {n} connection(s), latest from {peer}",
                limit=self.limit, n=self._refused_since_log,
                peer=getattr(addr, "host", str(addr)),
            )
            self._last_logged = now
            self._refused_since_log = 0
        return False
