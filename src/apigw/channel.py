"""The client-facing HTTP/1.1 channel, with the limits an edge server needs.

twisted.web's HTTPChannel already refuses smuggling shapes (Content-Length
with Transfer-Encoding, duplicate lengths, bad chunk sizes, NUL or bare CR
in headers). What it lacks for the front door: a deadline for the request
head (a client trickling one byte a second defeats an idle timeout), a
polite answer to over-long lines, and a cap on open connections.
"""

from twisted.logger import Logger
from twisted.web import http

log = Logger()


class GatewayChannel(http.HTTPChannel):
    MAX_LENGTH = 8 * 1024  # one request line or header line
    maxHeaders = 100
    totalHeadersSize = 32 * 1024

    _head_timer = None
    _in_request = False
    _answered_early = False

    _host = None

    def connectionMade(self):
        super().connectionMade()
        self.factory.connection_opened(self)
        self._start_head_deadline()

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
        if self._head_timer is None and not self._in_request:
            self._start_head_deadline()
        super().dataReceived(data)

    def allHeadersReceived(self):
        self._stop_head_deadline()
        self._in_request = True
        super().allHeadersReceived()

    def requestDone(self, request):
        self._in_request = False
        super().requestDone(request)

    def answer_early(self, request):
        """Process `request` before its body is in (it will only be refused
        as too large), then close: reading and discarding gigabytes would
        only serve the sender."""
        self._answered_early = True
        self.persistent = False
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        self.dataReceived = lambda data: None
        request.requestReceived(self._command, self._path, self._version)

    def allContentReceived(self):
        if not self._answered_early:  # else already handed to the request
            super().allContentReceived()

    def _send100Continue(self):
        if not self._answered_early:  # no invitation to upload what we refused
            super()._send100Continue()

    def lineLengthExceeded(self, line):
        # HTTPChannel would just close; tell the client what was too long.
        if self._receivedHeaderSize == 0 and not self._in_request:
            status = b"414 URI Too Long"
        else:
            status = b"431 Request Header Fields Too Large"
        self._reject(status)

    def connectionLost(self, reason):
        self._stop_head_deadline()
        self.factory.connection_closed(self)
        super().connectionLost(reason)

    def _start_head_deadline(self):
        self._head_timer = self.callLater(self.factory.header_timeout_s, self._head_too_slow)

    def _stop_head_deadline(self):
        if self._head_timer is not None:
            if self._head_timer.active():
                self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self):
        self._head_timer = None
        peer = self.transport.getPeer()
        log.info(
            "dropping {peer}: request head not complete within {timeout}s",
            peer=getattr(peer, "host", str(peer)),
            timeout=self.factory.header_timeout_s,
        )
        self._reject(b"408 Request Timeout")

    def _reject(self, status):
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        )
        self.transport.loseConnection()
        # Ignore whatever else the client sends while we close.
        self.dataReceived = lambda data: None


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
