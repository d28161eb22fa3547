"""What the fast lane (apigw.front) hands the pipeline: a plain request,
with only what the pipeline, the relay and the gateway's own answers use of
twisted.web's Request and Headers."""

from io import BytesIO
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers

from apigw.errors import request_id_for


class FrontHeaders:
    """A request's headers as the pipeline reads them (the getRawHeaders
    and getAllRawHeaders of twisted.web's Headers), filled by the parser.
    Names keep the client's spelling; lookups ignore case."""

    __slots__ = ("_entries",)

    def __init__(self):
        # lower-cased name -> (name as first sent, [values])
        self._entries = {}

    def add(self, name, value):
        lower = name.lower()
        entry = self._entries.get(lower)
        if entry is None:
            self._entries[lower] = (name, [value])
        else:
            entry[1].append(value)

    def getRawHeaders(self, name, default=None):
        entry = self._entries.get(name.lower())
        return default if entry is None else entry[1]

    def hasHeader(self, name):
        return name.lower() in self._entries

    def has_any(self, lower_names):
        return not lower_names.isdisjoint(self._entries)

    def getAllRawHeaders(self):
        return self._entries.values()


class FrontRequest:
    """One plain request from FrontChannel, with what the pipeline, the
    relay and the error answers use of twisted.web's Request.

    Slotted: no other module can hang state of its own on it. `site` and
    `sitepath` are set by the resource tree's routing (Site.getResourceFor).
    """

    __slots__ = (
        "channel", "site", "sitepath", "transport", "client_ip", "method", "uri", "path",
        "requestHeaders", "request_id", "prepath", "postpath", "route", "bytes_sent",
        "client_gone", "finished", "startedWriting", "chunked", "code", "code_message",
        "_waiters", "_gone_calls", "_responseHeaders",
    )

    clientproto = b"HTTP/1.1"
    # A plain request has no body: what the pipeline asks of one that has.
    body_length = 0
    body_too_large = False

    @property
    def content(self):
        # Read only for one that says Content-Length: 0, which is forwarded
        # as an empty body of that length.
        return BytesIO()

    def __init__(self, channel, method, uri, headers):
        self.channel = channel
        self.site = channel.site
        self.transport = channel.transport
        self.client_ip = channel.client_ip
        self.method = method
        self.uri = uri
        self.path = path = uri.split(b"?", 1)[0]
        self.requestHeaders = headers
        # What the resource tree routes by, as twisted.web prepares them.
        self.prepath = []
        self.postpath = list(map(unquote_to_bytes, path[1:].split(b"/")))
        self.route = None
        self.bytes_sent = 0
        self.client_gone = self.finished = self.startedWriting = self.chunked = False
        self.code = 200
        self.code_message = b"OK"
        self._waiters = self._gone_calls = self._responseHeaders = None
        self.request_id = request_id_for(self)

    def isSecure(self):
        return self.channel.secure

    @property
    def responseHeaders(self):
        # Only the gateway's own answers fill one.
        if self._responseHeaders is None:
            self._responseHeaders = Headers()
        return self._responseHeaders

    def notifyFinish(self):
        """Fires when the answer is all written; fails if the client goes
        first."""
        d = Deferred()
        if self.finished:
            d.callback(None)
        elif self.client_gone:
            d.errback(Failure(ConnectionError("the client closed the connection")))
        else:
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(d)
        return d

    def when_gone(self, call):
        """Call `call()` if the client leaves before the answer is all
        written (notifyFinish's errback, without a Deferred per caller)."""
        if self.client_gone:
            call()
        elif not self.finished:
            if self._gone_calls is None:
                self._gone_calls = []
            self._gone_calls.append(call)

    def add_own_headers(self):
        headers = self.responseHeaders
        headers.setRawHeaders(b"server", [b"apigw"])
        headers.setRawHeaders(b"date", [self.site.date.now()])

    def setResponseCode(self, code, message=None):
        self.code = code
        self.code_message = message if message is not None else RESPONSES.get(code, b"Unknown")

    def start_response(self, code, phrase, pairs, chunked, body=b""):
        """The status line and headers of a proxied answer, pre-encoded,
        with the first `body` bytes if they are at hand: one send."""
        self.code = code
        self.code_message = phrase
        self.startedWriting = True
        self.chunked = chunked
        lines = [b"HTTP/1.1 %d %s\r\n" % (code, phrase)]
        # Pieces joined once below: a third faster than a line made per pair.
        for name, value in pairs:
            lines += (name, b": ", value, b"\r\n")
        if not self.channel.persistent or self.site.draining:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        if body and self.method != b"HEAD":
            self.bytes_sent += len(body)
            lines.append(b"%x\r\n%s\r\n" % (len(body), body) if chunked else body)
        self.channel.out.write(b"".join(lines))

    def _own_head(self):
        # An answer of the gateway's own (error_response): from responseHeaders.
        headers = self.responseHeaders
        if not self.channel.persistent or self.site.draining:
            headers.setRawHeaders(b"connection", [b"close"])
        if not headers.hasHeader(b"content-length"):
            self.chunked = True
            headers.setRawHeaders(b"transfer-encoding", [b"chunked"])
        lines = [b"HTTP/1.1 %d %s\r\n" % (self.code, self.code_message)]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                lines.append(name + b": " + value + b"\r\n")
        lines.append(b"\r\n")
        self.startedWriting = True
        return b"".join(lines)

    def write(self, data):
        if self.finished or self.client_gone:
            return
        head = b"" if self.startedWriting else self._own_head()
        if data and self.method != b"HEAD":
            self.bytes_sent += len(data)
            if self.chunked:
                data = b"%x\r\n%s\r\n" % (len(data), data)
        else:
            data = b""
        if head or data:
            self.channel.out.write(head + data if head else data)

    def registerProducer(self, producer, streaming):
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self):
        self.transport.unregisterProducer()

    def finish(self):
        if self.finished or self.client_gone:
            return
        head = b"" if self.startedWriting else self._own_head()
        if self.chunked and self.method != b"HEAD":
            head += b"0\r\n\r\n"
        if head:
            self.channel.out.write(head)
        self.finished = True
        self._gone_calls = None
        waiters, self._waiters = self._waiters, None
        if waiters:
            for d in waiters:
                d.callback(None)
        # After the waiters: an answer of the gateway's own is accounted for
        # before the next pipelined request begins (a relayed one is
        # accounted for once the relay's caller hears of it, as in
        # twisted.web's lane).
        self.channel.request_done(self)

    def loseConnection(self):
        """End the connection without finishing the answer (a body cut
        short): the client sees it truncated."""
        self.channel.persistent = False
        self.transport.loseConnection()

    def connection_lost(self, reason):
        self.client_gone = True
        calls, self._gone_calls = self._gone_calls, None
        if calls:
            for call in calls:
                call()
        waiters, self._waiters = self._waiters, None
        if waiters:
            for d in waiters:
                d.errback(reason)
