"""The front door's fast lane: plain proxied requests without twisted.web.

Most of what reaches a gateway is a bodyless HTTP/1.1 request for a
configured service. For those, FrontChannel parses the head with httptools
(llhttp, in C) and hands a FrontRequest straight to the pipeline, skipping
twisted.web's line-by-line parser, its Request and its Headers, which cost
more than the rest of the journey put together.

Anything else is handed, from the first byte of that request on, to
twisted.web's channel (apigw.channel.GatewayChannel), which keeps the
connection from then on: the admin API, /metrics and the probes, a 404, a
request with a body, HTTP/1.0, a WebSocket handshake, Expect, and every
head the fast lane does not find plainly well-formed, so that refusing a
malformed or hostile request stays the job of one parser. The resource
tree still routes: a request takes the fast lane only when the tree sends
it to a ServiceRoute.
"""

import httptools
from twisted.internet.interfaces import IHalfCloseableProtocol, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from apigw.front_request import FrontHeaders, FrontRequest
from apigw.headers import connection_tokens
from apigw.sendnow import SendNow

log = Logger()

_END_OF_HEAD = b"\r\n\r\n"
# Headers that make a request anything but a plain bodyless exchange.
_NOT_PLAIN = frozenset({b"transfer-encoding", b"expect", b"upgrade"})


class _HeadParser:
    """httptools' callbacks for one complete request head."""

    __slots__ = ("url", "headers", "complete")

    def __init__(self):
        self.url = b""
        self.headers = FrontHeaders()
        self.complete = False

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        # llhttp drops the whitespace before a value, not after it;
        # twisted.web drops both (RFC 9112 5: it is not part of the value).
        self.headers.add(name, value.rstrip(b" \t"))

    def on_message_complete(self):
        self.complete = True


@implementer(IHalfCloseableProtocol)
class FrontChannel(Protocol):
    """A client connection, served here while its requests are plain ones.

    One request at a time: bytes of the next (pipelined) request wait in
    the buffer until the current answer is finished, as in twisted.web.
    """

    _current = None
    # When the current head began, or None while a request is being
    # answered or the connection is idle; when it went idle.
    _head_started = None
    _idle_since = None
    _handed_to = None
    _serving = False
    _reading_paused = False
    persistent = True

    def __init__(self, site, addr):
        self.site = site
        self._addr = addr
        self._buffer = b""

    def connectionMade(self):
        site = self.site
        self._head_started = site.clock.seconds()
        peer = self.transport.getPeer()
        host = getattr(peer, "host", None)
        self.client_ip = host if host is not None else "unix"
        self.secure = ISSLTransport(self.transport, None) is not None
        self.out = SendNow(self.transport)
        # Answers go out whole in one send; a chunked body's last chunk may
        # follow alone, and must not wait for the client's delayed ACK.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        site.connection_opened(self)

    def dataReceived(self, data):
        if self._current is not None:
            # Pipelined: read once the current answer is out. A client that
            # piles up more than a head's worth is not read meanwhile.
            self._buffer += data
            if len(self._buffer) > self.site.max_head_bytes and not self._reading_paused:
                self._reading_paused = True
                self.transport.pauseProducing()
            return
        if self._head_started is None:
            self._head_started = self.site.clock.seconds()
            self._idle_since = None
        self._buffer = self._buffer + data if self._buffer else data
        self._next()

    def _next(self):
        """Serve the heads at the start of the buffer, one at a time, for as
        long as each is answered at once (a refusal, a local 429): a loop,
        not a call per answer, so a burst of pipelined requests cannot
        exhaust the stack."""
        if self._serving:
            return  # the loop below goes on once this answer is done
        self._serving = True
        try:
            while self._current is None and self._buffer and self._handed_to is None \
                    and self.persistent and not self.site.draining:
                if not self._serve_one():
                    break
        finally:
            self._serving = False

    def _serve_one(self):
        """Start the request whose head begins the buffer; False if it is
        not all there yet (or went to twisted.web)."""
        buffer = self._buffer
        site = self.site
        end = buffer.find(_END_OF_HEAD)
        if end < 0:
            if len(buffer) > site.max_line_bytes or buffer.find(b"\n\n") >= 0:
                # Maybe a line too long, maybe bare-LF line ends: twisted.web's
                # parser says which, and how to answer it.
                self._hand_over()
            return False
        end += 4
        head = buffer[:end]
        request = self._plain_request(head)
        if request is None:
            self._hand_over()
            return False
        self._buffer = buffer[end:]
        self._head_started = None
        self._current = request
        site.pipeline.process(request, request.route)
        return True

    def _plain_request(self, head):
        """A FrontRequest for `head` if the fast lane may serve it, else None."""
        site = self.site
        if len(head) > site.max_line_bytes:
            # A line may be over the limit; the head may be, or hold too many
            # headers: twisted.web answers those 414 or 431.
            if len(head) > site.max_head_bytes \
                    or max(map(len, head.split(b"\r\n"))) > site.max_line_bytes:
                return None
        lines = head.count(b"\n")
        # Only CRLF line ends, no folded (obs-fold) header lines.
        # find(), not `in`: CPython 3.11's bytes `in` bytes raises and clears
        # a TypeError inside (it tries an int first), several times a request.
        if head.count(b"\r") != lines or head.count(b"\r\n") != lines \
                or head.find(b"\n ") >= 0 or head.find(b"\n\t") >= 0 \
                or lines - 2 > site.max_headers:
            return None
        fields = _HeadParser()
        parser = httptools.HttpRequestParser(fields)
        try:
            parser.feed_data(head)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            # Refusing it (or switching protocols) is twisted.web's call.
            return None
        if not fields.complete or parser.get_http_version() != "1.1":
            return None
        headers = fields.headers
        if headers.has_any(_NOT_PLAIN):
            return None
        lengths = headers.getRawHeaders(b"content-length")
        if lengths is not None and lengths != [b"0"]:
            return None
        request = FrontRequest(self, parser.get_method(), fields.url, headers)
        try:
            route = site.getResourceFor(request)
        except Exception:
            # A resource that wants more of a request than this one has: it
            # is not a service's, so twisted.web's request serves it.
            return None
        if getattr(route, "service", None) is None:
            return None
        request.route = route
        if b"close" in connection_tokens(headers.getRawHeaders(b"connection")):
            self.persistent = False
        return request

    @property
    def handed_over(self):
        """Whether twisted.web's channel holds the connection now."""
        return self._handed_to is not None

    def _hand_over(self):
        """twisted.web's channel takes the connection over, from the first
        byte of the request at hand."""
        site = self.site
        channel = site.classic_channel(self._addr)
        self._handed_to = channel
        data, self._buffer = self._buffer, b""
        self.out.through_transport()
        channel.makeConnection(self.transport)
        site.connection_closed(self)  # the channel counts itself now
        # Looked up per call: the channel swaps its own dataReceived (a
        # WebSocket switch, a rejected request).
        self.dataReceived = lambda data: channel.dataReceived(data)
        if data:
            channel.dataReceived(data)

    def request_done(self, request):
        """`request`'s answer is all written: on to the next, if any."""
        self._current = None
        if not self.persistent or self.site.draining:
            self.transport.loseConnection()
            return
        self._idle_since = self.site.clock.seconds()
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()
        if self._buffer:
            self._head_started = self._idle_since
            self._idle_since = None
            self._next()

    def check_deadline(self, now):
        """The site's watchdog asks: a head that takes too long to arrive
        (however slowly it trickles), an idle keep-alive connection."""
        site = self.site
        if self._head_started is not None:
            if now - self._head_started >= site.header_timeout_s:
                self._head_started = None
                log.info("dropping {peer}: request head not complete within {timeout}s",
                         peer=self.client_ip, timeout=site.header_timeout_s)
                self.out.write(
                    b"HTTP/1.1 408 Request Timeout\r\nServer: apigw\r\nConnection: close\r\n"
                    b"Content-Length: 0\r\n\r\n")
                self.transport.loseConnection()
                self.dataReceived = lambda data: None
        elif self._idle_since is not None and now - self._idle_since >= site.idle_timeout_s:
            self._idle_since = None
            self.transport.loseConnection()

    def readConnectionLost(self):
        """The client shut down its sending side: answer what it asked,
        then close."""
        if self._handed_to is not None:
            self._handed_to.readConnectionLost()
            return
        self.persistent = False
        if self._current is None:
            self.transport.loseConnection()

    def writeConnectionLost(self):
        if self._handed_to is not None:
            self._handed_to.writeConnectionLost()
            return
        self.transport.abortConnection()

    def connectionLost(self, reason):
        if self._handed_to is not None:
            self._handed_to.connectionLost(reason)
            return
        self._head_started = self._idle_since = None
        self.site.connection_closed(self)
        request, self._current = self._current, None
        if request is not None:
            request.connection_lost(reason)
