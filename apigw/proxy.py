"""The twisted.web side: the request class, the site and the resource tree.

Routing is by the first raw path segment. Everything after it, query
included, is forwarded byte for byte: twisted.web's postpath is decoded per
segment (so %2F would be lost), hence the raw `request.uri` is used.
"""

import json
import re
from urllib.parse import unquote_to_bytes

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from apigw.channel import ConnectionLimit, GatewayChannel
from apigw.errors import GatewayError, GetOnly, error_response, request_id_for
from apigw.logs import redact

log = Logger()

_CONTROL_BYTES = re.compile(rb"[\x00-\x20\x7f]")

REFUSED_METHODS = frozenset({b"CONNECT", b"TRACE"})

# Not counted in request metrics nor logged per request (SPEC section 5).
UNCOUNTED = frozenset({b"/metrics", b"/healthz", b"/readyz"})


class GatewayRequest(server.Request):
    """A request that measures itself: body size, bytes sent, timing.

    Accounting lives here so that every request (404s and admin calls too)
    is counted and logged once, whichever resource answered it.
    """

    body_length = 0
    body_too_large = False
    bytes_sent = 0
    attempts = 0
    upstream_latency_ms = None
    consumer = None
    service_label = "unknown"
    request_id = None
    upstream_failed = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra_response_headers = []

    def gotLength(self, length):
        if length is not None and length > self.channel.site.gateway.body_limit:
            # Hopeless already: answer 413 now instead of reading it all.
            self.body_too_large = True
            super().gotLength(0)
            self.channel.answer_early(self)
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self.body_too_large:
            return
        self.body_length += len(data)
        if self.body_length > self.channel.site.gateway.body_limit:
            # A chunked body that outgrew every limit: same as above.
            self.body_too_large = True
            self.content.seek(0)
            self.content.truncate()
            self.channel.answer_early(self)
            return
        super().handleContentChunk(data)

    @property
    def client_ip(self):
        host = getattr(self.getClientAddress(), "host", None)
        return host if host is not None else "unix"

    def process(self):
        gateway = self.channel.site.gateway
        self._counted = self.path not in UNCOUNTED
        if self._counted:
            self.request_id = request_id_for(self)
            self._started = gateway.clock.seconds()
            gateway.in_flight_started(self)
            self.notifyFinish().addBoth(self._account, gateway)
        if self.method in REFUSED_METHODS:
            # A gateway is not a forward proxy (CONNECT), and TRACE would
            # echo credentials back to scripts (cross-site tracing).
            error_response(self, 405, f"method {self.method.decode('ascii', 'replace')} is not allowed")
            return
        if not self.uri.startswith(b"/"):
            # Absolute-form targets ask for forward proxying; refuse rather
            # than guess which host was meant.
            error_response(self, 400, "the request target must be a path starting with /")
            return
        super().process()

    def write(self, data):
        if not self.startedWriting and self.channel.site.gateway.shutting_down:
            # Draining: this connection closes after this response, so the
            # client sends its next request to a process that will answer it.
            self.channel.persistent = False
            self.responseHeaders.setRawHeaders(b"connection", [b"close"])
        self.bytes_sent += len(data)
        super().write(data)

    def _account(self, result, gateway):
        gateway.in_flight_finished(self)
        latency_s = gateway.clock.seconds() - self._started
        status = self.code if result is None else 499  # 499: client closed first
        if self.upstream_failed:
            status = 502
        gateway.metrics.observe_request(self.service_label, self.method, status, latency_s)
        gateway.access_log.record({
            "request_id": self.request_id,
            "method": self.method.decode("ascii", "replace"),
            "path": self.uri.decode("utf-8", "replace"),
            "service": self.service_label,
            "status": status,
            "latency_ms": round(latency_s * 1000, 3),
            "upstream_latency_ms": self.upstream_latency_ms,
            "attempts": self.attempts,
            "client_ip": self.client_ip,
            "consumer": self.consumer.owner if self.consumer is not None else None,
            "bytes_sent": self.bytes_sent,
        })


class GatewaySite(server.Site):
    requestFactory = GatewayRequest
    protocol = GatewayChannel
    noisy = False
    header_timeout_s = 10.0
    # Idle keep-alive connections are closed after this long (twisted.web's
    # default is 12 hours).
    idle_timeout_s = 60.0
    max_connections = 10000

    def __init__(self, resource, gateway, **kwargs):
        kwargs.setdefault("timeout", self.idle_timeout_s)
        super().__init__(resource, **kwargs)
        self.gateway = gateway
        self.connections = ConnectionLimit(self.max_connections, gateway.clock)
        self._channels = set()
        self._all_closed = []

    def buildProtocol(self, addr):
        if not self.connections.admit(addr):
            return None  # closes the connection at once
        return super().buildProtocol(addr)

    def connection_opened(self, channel):
        self.connections.open += 1
        self._channels.add(channel)

    def connection_closed(self, channel):
        self.connections.open -= 1
        self._channels.discard(channel)
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
        # The access log is ours (apigw.logs), one JSON record per request.
        pass


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

    def __init__(self, gateway):
        super().__init__()
        self._gateway = gateway

    def render_GET(self, request):
        d = Deferred.fromCoroutine(self._gateway.readiness())
        d.addErrback(self._check_failed)
        d.addCallback(self._answer, request)
        return server.NOT_DONE_YET

    def _check_failed(self, failure):
        # A check that blew up is a part that is not ready, not a hung probe.
        log.failure("readiness check", failure)
        return ["readiness check failed"]

    def _answer(self, down, request):
        if request._disconnected:
            return
        if down:
            body = json_response(request, 503, {"status": "unavailable", "down": down})
        else:
            body = json_response(request, 200, {"status": "ready"})
        request.write(body)
        request.finish()


class NotFound(Resource):
    isLeaf = True

    def render(self, request):
        error_response(request, 404, "no service is configured at this path")
        return server.NOT_DONE_YET


class GatewayRoot(Resource):
    """Fixed children (healthz, metrics, admin...) first, then services."""

    def __init__(self, gateway):
        super().__init__()
        self._gateway = gateway
        self._not_found = NotFound()

    def getChild(self, name, request):
        resource = self._gateway.service_resources.get(name)
        return resource if resource is not None else self._not_found

    def render(self, request):
        return self._not_found.render(request)


class ServiceResource(Resource):
    """One configured service: checks in SPEC order, then forwards."""

    isLeaf = True

    def __init__(self, gateway, service):
        super().__init__()
        self._gateway = gateway
        self.service = service
        self._label = service.name

    def render(self, request):
        request.service_label = self._label
        d = Deferred.fromCoroutine(self._handle(request, self.service))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addErrback(self._fail, request)
        return server.NOT_DONE_YET

    async def _handle(self, request, service):
        gateway = self._gateway
        upstream_path = forwarded_path(request.uri, service)
        if request.body_too_large or request.body_length > service.max_body_bytes:
            raise GatewayError(
                413, f"request body is larger than {service.max_body_bytes} bytes"
            )
        request.consumer = await gateway.authenticate(request, service)
        await gateway.check_rate_limit(request, service, request.consumer)
        await gateway.forwarder.forward(request, service, upstream_path, request.consumer)

    def _fail(self, failure, request):
        if failure.check(CancelledError) and request._disconnected:
            return None
        if failure.check(GatewayError):
            e = failure.value
            headers = list(request.extra_response_headers) + list(e.headers)
            error_response(request, e.status, e.message, headers=headers)
            return None
        log.failure("proxying {uri}", failure, uri=redact(request.uri.decode("latin-1")))
        error_response(request, 500, "internal gateway error")
        return None


def forwarded_path(uri, service):
    """The upstream path and query for a raw request URI, or GatewayError 400.

    Dot-segments (plain or %2e-encoded, and with %2f or backslash as
    separators, since upstreams may decode those) that would climb above the
    service's root are refused: the request could otherwise reach another
    route of the upstream or of the gateway.
    """
    if _CONTROL_BYTES.search(uri):
        # twisted.web lets DEL (0x7f) through; no upstream request line may
        # carry it, and neither may our log lines.
        raise GatewayError(400, "the request target contains control characters")
    path, sep, query = uri.partition(b"?")
    # path is b"/<raw service segment>[/rest]"
    slash = path.find(b"/", 1)
    rest = b"" if slash == -1 else path[slash:]
    if not _stays_inside(rest):
        raise GatewayError(400, "the path climbs out of the service with dot-segments")
    if service.strip_prefix:
        upstream = rest or b"/"
    else:
        upstream = b"/" + service.name.encode("ascii") + rest
    return upstream + sep + query


def _stays_inside(rest):
    if b"." not in rest and b"%" not in rest:
        return True
    # Decoded until stable: an upstream that decodes once more must not
    # find a dot-segment we missed (%252e%252e).
    decoded = rest
    for _ in range(3):
        again = unquote_to_bytes(decoded)
        if again == decoded:
            break
        decoded = again
    decoded = decoded.replace(b"\\", b"/")
    depth = 0
    for segment in decoded.split(b"/"):
        if segment == b"..":
            depth -= 1
            if depth < 0:
                return False
        elif segment not in (b"", b"."):
            depth += 1
    return True
