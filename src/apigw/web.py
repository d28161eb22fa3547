"""The twisted.web side: a lean request, the site and the fixed resources.

twisted.web parses the request and its resource tree routes it; from
there the request is handed to the pipeline (apigw.pipeline), which owns
everything the gateway decides about it. The request itself only measures
what happens on its own connection (body size, bytes sent, whether the
client is still there) and names itself (its request id).
"""

import json
from urllib.parse import unquote_to_bytes

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import Resource

from apigw._twisted_compat import request_line, start_response
from apigw.channel import ConnectionLimit, GatewayChannel
from apigw.deadlines import Watchdog
from apigw.errors import GetOnly, error_response, request_id_for
from apigw.front import FrontChannel

log = Logger()

# Answers the gateway makes itself carry this instead of twisted.web's
# name and version: nothing tells a scanner which release runs here.
SERVER = b"apigw"


class HttpDate:
    """The Date header value, formatted once per second instead of once
    per request."""

    def __init__(self, clock):
        self._clock = clock
        self._second = None
        self._value = b""

    def now(self):
        second = int(self._clock.seconds())
        if second != self._second:
            self._second = second
            self._value = http.datetimeToString(second)
        return self._value


class GatewayRequest(server.Request):
    """A request that measures itself and hands itself to the pipeline.

    Unlike server.Request it neither formats a Date header nor names
    twisted.web on every request, and its process() does not render: the
    site's pipeline decides what happens once the tree has routed it.
    """

    body_length = 0
    body_too_large = False
    bytes_sent = 0
    client_gone = False
    request_id = None

    def gotLength(self, length):
        site = self.channel.site
        if length is not None and length > site.body_limit:
            # Hopeless already: answer 413 now instead of reading it all.
            self.body_too_large = True
            super().gotLength(0)
            self.channel.answer_early(self)
            return
        super().gotLength(length)
        if length != 0:
            # A body follows: the pipeline may decide before it is read.
            self._prepare(*request_line(self.channel))
            site.pipeline.head_received(self, length)

    def _prepare(self, method, uri, version):
        """What requestReceived() and process() set, as soon as the head is
        in: the request line, its id, and the paths the tree routes by."""
        self.method, self.uri, self.clientproto = method, uri, version
        self.path = uri.split(b"?", 1)[0]
        self.site = self.channel.site
        if self.request_id is None:
            self.request_id = request_id_for(self)
        self.prepath = []
        self.postpath = list(map(unquote_to_bytes, self.path[1:].split(b"/")))

    def handleContentChunk(self, data):
        if self.body_too_large:
            return
        self.body_length += len(data)
        if self.body_length > self.channel.site.body_limit:
            # A chunked body that outgrew every limit: same as above.
            self.body_too_large = True
            self.content.seek(0)
            self.content.truncate()
            self.channel.answer_early(self)
            return
        super().handleContentChunk(data)

    _client_ip = None

    @property
    def client_ip(self):
        if self._client_ip is None:
            host = getattr(self.client, "host", None)
            self._client_ip = host if host is not None else "unix"
        return self._client_ip

    def process(self):
        site = self.channel.site
        self.site = site
        if self.request_id is None:
            self.request_id = request_id_for(self)
        # What server.Request.process prepares for the resource tree.
        self.prepath = []
        self.postpath = list(map(unquote_to_bytes, self.path[1:].split(b"/")))
        site.pipeline.process(self)

    def when_gone(self, call):
        """Call `call()` if the client leaves before the answer is all
        written."""
        self.notifyFinish().addErrback(lambda _: call())

    def add_own_headers(self):
        """Server and Date, for answers the gateway makes itself (a proxied
        answer keeps the upstream's)."""
        headers = self.responseHeaders
        headers.setRawHeaders(b"server", [SERVER])
        headers.setRawHeaders(b"date", [self.channel.site.date.now()])

    def start_response(self, code, phrase, pairs, chunked, body=b""):
        """Send the status line and headers from byte pairs, for a proxied
        answer: no Headers object is filled and serialised again. Headers
        twisted.web already set for this request (Connection: close) join
        them; write() and finish() then go on as usual."""
        if self.channel.site.draining:
            self._close_after()
        if self.clientproto == b"HTTP/1.0" and self.channel.persistent:
            self.channel.http10_keep_alive(
                self, code, any(name.lower() == b"content-length" for name, _ in pairs))
        lines = [name + b": " + value + b"\r\n" for name, value in pairs]
        for name, values in self.responseHeaders.getAllRawHeaders():
            for value in values:
                lines.append(name + b": " + value + b"\r\n")
        start_response(self, code, phrase, lines, chunked)
        if body:
            self.write(body)

    def _close_after(self):
        # Draining: this connection closes after this response, so the
        # client sends its next request to a process that will answer it.
        self.channel.persistent = False
        self.responseHeaders.setRawHeaders(b"connection", [b"close"])

    def write(self, data):
        if not self.startedWriting and self.channel.site.draining:
            self._close_after()
        self.bytes_sent += len(data)
        super().write(data)

    def connectionLost(self, reason):
        self.client_gone = True
        super().connectionLost(reason)


class GatewaySite(server.Site):
    requestFactory = GatewayRequest
    protocol = GatewayChannel
    noisy = False
    header_timeout_s = 10.0
    # A request body with no new bytes for this long is cut off.
    body_timeout_s = 60.0
    # Idle keep-alive connections are closed after this long (twisted.web's
    # default is 12 hours).
    idle_timeout_s = 60.0
    max_connections = 10000
    listener_name = "public"  # or "admin", for the logs

    # How often the watchdog checks every connection's deadlines.
    deadline_check_interval_s = 0.25

    def __init__(self, resource, pipeline, clock, body_limit, **kwargs):
        # No TimeoutMixin timers in the channels: the watchdog below does
        # the idle timeout along with the head deadline.
        kwargs.setdefault("timeout", None)
        # A gateway never needs a form body decoded: twisted.web would parse
        # one in the reactor thread before routing and auth.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, **kwargs)
        self.pipeline = pipeline
        self.body_limit = body_limit
        self.draining = False
        self.clock = clock
        self.date = HttpDate(clock)
        self.connections = ConnectionLimit(self.max_connections, clock)
        self.watchdog = Watchdog(clock, self.deadline_check_interval_s)
        self._channels = set()
        self._all_closed = []

    def logPrefix(self):
        # Twisted's "<prefix> starting on <port>" line: not a class name.
        return f"apigw {self.listener_name} listener"

    # Per-connection limits of the request head (GatewayChannel's own
    # defaults until configure() says otherwise).
    max_line_bytes = GatewayChannel.MAX_LENGTH
    max_headers = GatewayChannel.maxHeaders
    max_head_bytes = GatewayChannel.totalHeadersSize

    def configure(self, settings, connection_cap):
        """The edge limits of a loaded or reloaded config; open connections
        keep their head limits, their deadlines follow at once."""
        self.header_timeout_s = settings.client_header_timeout_s
        self.body_timeout_s = settings.client_body_timeout_s
        self.idle_timeout_s = settings.keepalive_timeout_s
        self.max_line_bytes = settings.client_max_line_bytes
        self.max_headers = settings.client_max_headers
        self.max_head_bytes = settings.client_max_head_bytes
        self.connections.limit = connection_cap

    # The public listener serves plain proxied requests in apigw.front's
    # fast lane; the admin listener leaves everything to twisted.web.
    fast_lane = False

    def buildProtocol(self, addr):
        if not self.connections.admit(addr):
            return _Refusal()
        if self.fast_lane:
            return FrontChannel(self, addr)
        return self.classic_channel(addr)

    def classic_channel(self, addr):
        """twisted.web's channel, with the head limits of this site."""
        channel = super().buildProtocol(addr)
        channel.MAX_LENGTH = self.max_line_bytes
        channel.maxHeaders = self.max_headers
        channel.totalHeadersSize = self.max_head_bytes
        return channel

    def connection_opened(self, channel):
        self.connections.open += 1
        self._channels.add(channel)
        self.watchdog.watch(channel)

    def connection_closed(self, channel):
        self.connections.open -= 1
        self._channels.discard(channel)
        self.watchdog.forget(channel)
        if not self._channels and self._all_closed:
            waiters, self._all_closed = self._all_closed, []
            for d in waiters:
                d.callback(None)

    def close_connections(self):
        """Close every client connection once its pending bytes are sent;
        fires when all are gone.

        After a drain the last response may still sit in a transport's
        buffer: stopping the reactor now would drop it, loseConnection
        writes it out first.
        """
        if not self._channels:
            return defer.succeed(None)
        d = defer.Deferred()
        self._all_closed.append(d)
        for channel in list(self._channels):
            channel.transport.loseConnection()
        return d

    def log(self, request):
        # The access log is ours (apigw.accounting), one record per request.
        pass


class _Refusal(Protocol):
    """Past the connection cap: a 503 the client can read, then close."""

    BODY = b'{"error": "the gateway is at its connection limit; try again shortly"}'

    def connectionMade(self):
        self.transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nServer: apigw\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nRetry-After: 1\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(self.BODY), self.BODY))
        self.transport.loseConnection()


def json_response(request, status, payload):
    body = json.dumps(payload).encode("utf-8")
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


class Healthz(GetOnly):

    def render_GET(self, request):
        return json_response(request, 200, {"status": "ok"})


class Readyz(GetOnly):
    """200 while every part answers; 503 naming the parts that do not.

    `readiness` is an async callable returning the names of the parts
    that are down (empty when ready); `trusted(address)` says who may see
    those names (the others get the status alone); `degraded`, if given, a
    callable returning sentences about parts that work in a lesser way
    (listed under "degraded", without failing readiness); `details`, if
    given, a callable returning more fields for trusted callers (which Redis
    master is in use).
    """

    def __init__(self, readiness, trusted=lambda address: True, degraded=None, details=None):
        super().__init__()
        self._readiness = readiness
        self._trusted = trusted
        self._degraded = degraded
        self._details = details

    def render_GET(self, request):
        d = Deferred.fromCoroutine(self._readiness())
        d.addErrback(self._check_failed)
        d.addCallback(self._answer, request)
        return server.NOT_DONE_YET

    def _check_failed(self, failure):
        # A check that blew up is a part that is not ready, not a hung probe.
        log.failure("readiness check", failure)
        return ["readiness check failed"]

    def _answer(self, down, request):
        if request.client_gone:
            return
        trusted = self._trusted(request.getClientAddress())
        if down:
            payload = {"status": "unavailable"}
            if trusted:
                payload["down"] = down
        else:
            payload = {"status": "ready"}
        if trusted:
            notes = self._degraded() if self._degraded is not None else None
            if notes:
                payload["degraded"] = notes
            if self._details is not None:
                payload.update(self._details())
        body = json_response(request, 503 if down else 200, payload)
        request.write(body)
        request.finish()


class NotFound(Resource):
    isLeaf = True

    def render(self, request):
        error_response(request, 404, "no service is configured at this path")
        return server.NOT_DONE_YET


class ServiceRoute(Resource):
    """Where the tree sends a request for a configured service.

    It renders nothing itself: the pipeline recognises it by its `service`
    and runs the request's journey with it. `settings` are those of the
    same config, so a request routed before a reload finishes on the
    config it started with.
    """

    isLeaf = True

    def __init__(self, service, settings):
        super().__init__()
        self.service = service
        self.settings = settings


class GatewayRoot(Resource):
    """Fixed children (healthz, metrics, admin...) first, then services."""

    def __init__(self):
        super().__init__()
        self.routes = {}
        self._not_found = NotFound()

    def getChild(self, name, request):
        route = self.routes.get(name)
        return route if route is not None else self._not_found

    def render(self, request):
        return self._not_found.render(request)
