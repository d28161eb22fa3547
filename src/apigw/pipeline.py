"""The request's journey, one stage after another:

    route -> size -> auth -> limit -> breaker -> forward -> relay -> account

twisted.web parses the request and its resource tree routes it; every
counted request then comes through `Pipeline.process`. A request for a
service runs `_journey`, whose stages take values and return values or
raise a GatewayError (the refusal the client is answered with); any other
resource (the admin API, a 404) renders as twisted.web would. Either way
the request ends in one Outcome that `Accounting` records.
"""

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from apigw.deadlines import Watchdog
from apigw.errors import GatewayError, error_response
from apigw.keys import AuthFailure, KeyStoreUnavailable
from apigw.logs import redact
from apigw.paths import forwarded_path
from apigw.relay import CUT_SHORT, FAILED, relay
from apigw.websocket import Tunnels, is_handshake

log = Logger()

# Not counted in request metrics nor logged per request: probes and scrapes.
UNCOUNTED = frozenset({b"/metrics", b"/healthz", b"/readyz"})

# A gateway is not a forward proxy (CONNECT), and TRACE would echo
# credentials back to scripts (cross-site tracing).
REFUSED_METHODS = frozenset({b"CONNECT", b"TRACE"})

# RFC 9110 wants a challenge on every 401.
CHALLENGE = b'APIKey realm="apigw", header="X-API-Key"'

# The status of a request whose client left before its answer was out.
CLIENT_CLOSED = 499


class Pipeline:
    """Runs each request through its stages with the collaborators given."""

    # How often stalled response bodies are looked for.
    stall_check_interval_s = 0.1
    # A client that takes no response bytes for this long is cut off.
    send_timeout_s = 60.0

    def __init__(self, authenticator, rate_limiting, forwarder, accounting, metrics, clock):
        self._authenticator = authenticator
        self._rate_limiting = rate_limiting
        self._forwarder = forwarder
        self._accounting = accounting
        self._metrics = metrics
        self._clock = clock
        self.watchdog = Watchdog(clock, self.stall_check_interval_s)
        self.tunnels = Tunnels(accounting, metrics, self.watchdog, clock)

    def process(self, request):
        """Entry point for a parsed request (GatewayRequest.process)."""
        if request.path in UNCOUNTED:
            self._render(request, request.site.getResourceFor(request))
            return
        outcome = self._accounting.opened(request)
        refusal = _refusal(request)
        if refusal is not None:
            request.notifyFinish().addBoth(self._rendered, request, outcome)
            request.add_own_headers()
            error_response(request, *refusal)
            return
        # route: the tree decides; a ServiceRoute carries the service.
        resource = request.site.getResourceFor(request)
        service = getattr(resource, "service", None)
        if service is None:
            outcome.service = getattr(resource, "account_label", "unknown")
            request.notifyFinish().addBoth(self._rendered, request, outcome)
            self._render(request, resource)
            return
        outcome.service = service.name
        d = Deferred.fromCoroutine(self._journey(request, resource, outcome))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addBoth(self._journey_ended, request, outcome)

    async def _journey(self, request, route, outcome):
        service = route.service
        settings = route.settings
        upstream_path = forwarded_path(request.uri, service)
        # size
        if request.body_too_large or request.body_length > service.max_body_bytes:
            raise GatewayError(413, f"request body is larger than {service.max_body_bytes} bytes")
        websocket = is_handshake(request)
        if websocket and not service.websocket:
            raise GatewayError(400, f"service {service.name} does not accept WebSocket upgrades")
        # auth
        consumer = None
        if service.auth:
            consumer = await self._authenticate(request, service)
            outcome.consumer = consumer
        # limit
        limit_headers = await self._rate_limiting.check(
            service, consumer, request.client_ip, settings)
        outcome.extra_headers = limit_headers  # answers from here on carry them
        # breaker, forward
        forwarded = await self._forwarder.forward(
            request, service, upstream_path, consumer, outcome, websocket=websocket)
        if websocket and forwarded.response.code == 101:
            # Joined to the upstream until either side closes (apigw.websocket).
            return await self.tunnels.run(request, forwarded.response, limit_headers,
                                          outcome, settings.websocket_idle_timeout_s)
        # relay
        ended = await relay(request, forwarded.response, limit_headers,
                            request.site.date.now(), service.timeout_s, self._clock,
                            self.watchdog, self.send_timeout_s)
        if ended == FAILED or ended == CUT_SHORT:
            # A connection failure of this target, too late to retry but not
            # too late to count.
            forwarded.breaker.record_failure()
            if ended == FAILED:
                raise GatewayError(502, f"upstream {service.name} sent a malformed response")
            outcome.error = "upstream body cut short"
        return ended

    async def _authenticate(self, request, service):
        given = request.requestHeaders.getRawHeaders(b"x-api-key")
        try:
            return await self._authenticator.check(given[0] if given else None, service.name)
        except AuthFailure as e:
            self._metrics.auth_failures.labels(e.reason).inc()
            if e.reason == "forbidden":
                raise GatewayError(
                    403, f"the API key is not allowed to use {service.name}") from None
            raise GatewayError(
                401, e.message, headers=[(b"www-authenticate", CHALLENGE)]) from None
        except KeyStoreUnavailable:
            # An outage is never the client's fault: 503, not 401.
            self._metrics.auth_failures.labels("unavailable").inc()
            raise GatewayError(
                503, "the key store is unavailable; try again shortly") from None

    def _journey_ended(self, result, request, outcome):
        if isinstance(result, str):
            pass  # relayed: the client saw the upstream's status
        elif result.check(CancelledError) and request.client_gone:
            pass
        elif result.check(GatewayError):
            e = result.value
            request.add_own_headers()
            error_response(request, e.status, e.message,
                           headers=list(outcome.extra_headers) + list(e.headers))
        else:
            log.failure("proxying {uri}", result, uri=redact(request.uri.decode("latin-1")))
            request.add_own_headers()
            error_response(request, 500, "internal gateway error")
        self._close(request, outcome)

    def _render(self, request, resource):
        request.add_own_headers()
        try:
            request.render(resource)
        except Exception:
            log.failure("rendering {uri}", uri=redact(request.uri.decode("latin-1")))
            if not request.startedWriting:
                error_response(request, 500, "internal gateway error")

    def _rendered(self, result, request, outcome):
        self._close(request, outcome)

    def _close(self, request, outcome):
        if outcome.tunnel_opened_s is None:  # a tunnel's numbers are its own
            # What the client saw; a body cut short says so in outcome.error.
            outcome.status = request.code if request.finished or outcome.error \
                else CLIENT_CLOSED
            outcome.bytes_sent = request.bytes_sent
            outcome.bytes_received = request.body_length
        self._accounting.closed(outcome)


def _refusal(request):
    """(status, sentence) for a request no resource may see, else None."""
    if request.method in REFUSED_METHODS:
        return 405, f"method {request.method.decode('ascii', 'replace')} is not allowed"
    if not request.uri.startswith(b"/"):
        # Absolute-form targets ask for forward proxying; refuse rather
        # than guess which host was meant.
        return 400, "the request target must be a path starting with /"
    if b"#" in request.uri:
        # A fragment never goes on the wire; one that does is a parser
        # differential waiting to happen between us and the upstream.
        return 400, "the request target must not contain '#'"
    hosts = request.requestHeaders.getRawHeaders(b"host")
    if hosts is None:
        if request.clientproto == b"HTTP/1.1":
            return 400, "an HTTP/1.1 request needs a Host header"  # RFC 9112 3.2
    elif len(hosts) > 1 or b"," in hosts[0]:
        return 400, "the request has more than one Host"
    return None
