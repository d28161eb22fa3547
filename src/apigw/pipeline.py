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
from twisted.python.failure import Failure

from apigw.coroutine import Run
from apigw.deadlines import Watchdog
from apigw.errors import GatewayError, error_response
from apigw.keys import AuthFailure, KeyStoreUnavailable
from apigw.logs import redact
from apigw.paths import forwarded_path
from apigw.relay import CLIENT_GONE, COMPLETE, FAILED, relay
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
        # Requests whose checks ran at head time, until their body is in.
        self._early = {}
        self.tunnels = Tunnels(accounting, metrics, self.watchdog, clock)

    def head_received(self, request, length):
        """A request's head is in and a body follows (`length`, or None
        for chunked): for a service, run the checks now, before its body is
        read. The body waits (reading paused, no 100 Continue) until they
        pass; a refusal is answered at once and the connection closed, so
        no client uploads megabytes to be told 401, 413 or 429."""
        if request.path in UNCOUNTED or _refusal(request) is not None:
            return
        route = request.site.getResourceFor(request)
        if getattr(route, "service", None) is None:
            return  # the admin API, a 404: twisted.web reads the body as usual
        early = _Early(self._accounting.opened(request), request, route)
        early.outcome.service = route.service.name
        self._early[request] = early
        checks = Deferred.fromCoroutine(self._checks(request, route, early.outcome, length))
        if not checks.called:
            # Waiting on the key store or Redis: hold the body back meanwhile.
            early.paused = True
            request.transport.pauseProducing()
        early.checks = checks
        request.notifyFinish().addErrback(self._gone_early, request, early)
        checks.addBoth(self._checked, request, early)

    def _gone_early(self, _, request, early):
        if early.checks is not None:
            early.checks.cancel()  # _checked accounts for it
        elif self._early.get(request) is early and early.journey is None:
            # Gone after its checks, before its body was in: nothing else
            # will account for it.
            del self._early[request]
            self._close(request, early.outcome)

    def _checked(self, result, request, early):
        early.checks = None
        early.result = result
        if isinstance(result, Failure) and early.journey is None:
            if self._early.get(request) is not early:
                return  # accounted for already
            if request.client_gone:
                del self._early[request]
                self._journey_ended(result, request, early.outcome)
            else:
                # Refused: answered now, without reading the body; process()
                # runs the journey, which meets the refusal at once.
                request.channel.answer_early(request)
            return
        if not isinstance(result, Failure) and early.journey is None:
            if early.expect_continue and not request.client_gone:
                request.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if early.paused:
                request.channel.body_resumed()
                request.transport.resumeProducing()
        waiting, early.waiting = early.waiting, None
        if waiting is not None:
            _fire(waiting, result)

    def process(self, request, route=None):
        """Entry point for a parsed request (GatewayRequest.process, or
        apigw.front with the `route` the tree already gave it)."""
        early = self._early.pop(request, None)
        if early is not None:
            # The route it was checked on, whatever a reload did meanwhile.
            self._start_journey(request, early.route, early.outcome, early)
            return
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
        resource = route if route is not None else request.site.getResourceFor(request)
        service = getattr(resource, "service", None)
        if service is None:
            outcome.service = getattr(resource, "account_label", "unknown")
            request.notifyFinish().addBoth(self._rendered, request, outcome)
            self._render(request, resource)
            return
        outcome.service = service.name
        self._start_journey(request, resource, outcome)

    def _start_journey(self, request, route, outcome, early=None):
        run = Run(self._journey(request, route, outcome, early),
                  lambda result: self._journey_ended(result, request, outcome))
        if early is not None:
            early.journey = run
        run.start()
        request.when_gone(run.cancel)

    async def _journey(self, request, route, outcome, early=None):
        if early is None:
            checked = await self._checks(request, route, outcome, request.body_length)
        elif early.result is not None:
            checked = _result(early.result)
        else:
            checked = await early.outcome_of_checks()
        upstream_path, websocket, consumer, limit_headers = checked
        service = route.service
        if request.body_too_large or request.body_length > service.max_body_bytes:
            # A chunked body, whose size was known only now.
            raise GatewayError(413, f"request body is larger than {service.max_body_bytes} bytes")
        # breaker, forward
        forwarded = await self._forwarder.forward(
            request, service, upstream_path, consumer, outcome, websocket=websocket)
        breaker = forwarded.breaker
        try:
            if websocket and forwarded.response.code == 101:
                forwarded.settle(breaker.record_success)
                # Joined to the upstream until either side closes (apigw.websocket).
                return await self.tunnels.run(request, forwarded.response, limit_headers,
                                              outcome, route.settings.websocket_idle_timeout_s)
            # relay
            ended = await relay(request, forwarded.response, limit_headers,
                                request.site.date.now(), service.timeout_s, self._clock,
                                self.watchdog, self.send_timeout_s)
        except BaseException:
            forwarded.settle(breaker.record_cancelled)
            raise
        # The target's verdict waits for the body: an answer cut short is a
        # connection failure, too late to retry but not to count.
        if ended == COMPLETE:
            forwarded.settle(breaker.record_success)
        elif ended == CLIENT_GONE:
            forwarded.settle(breaker.record_cancelled)
        else:
            forwarded.settle(breaker.record_failure)
            if ended == FAILED:
                raise GatewayError(502, f"upstream {service.name} sent a malformed response")
            outcome.error = "upstream body cut short"
        return ended

    async def _checks(self, request, route, outcome, length):
        """route, size, auth, limit: (upstream path, whether a WebSocket
        handshake, consumer, rate-limit headers), or the GatewayError the
        client is answered with. `length`: the body's size as declared or
        read (None: chunked, still unknown)."""
        service = route.service
        # route: the tree found the service; the rest must stay inside it.
        upstream_path = forwarded_path(request.uri, service)
        # size
        if request.body_too_large or (length is not None and length > service.max_body_bytes):
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
            service, consumer, request.client_ip, route.settings)
        outcome.extra_headers = limit_headers  # answers from here on carry them
        return upstream_path, websocket, consumer, limit_headers

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
            elif not request.finished:
                request.loseConnection()  # half an answer: nothing else would end it

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


class _Early:
    """A request whose checks ran when its head came in: the pipeline's
    record of it until its body is in too."""

    __slots__ = ("outcome", "route", "expect_continue", "checks", "result", "waiting",
                 "journey", "paused")

    def __init__(self, outcome, request, route):
        self.outcome = outcome
        self.route = route
        self.paused = False
        # Ours to send once the checks pass: twisted.web would send it at once.
        expect = request.requestHeaders.getRawHeaders(b"expect")
        self.expect_continue = bool(expect) and expect[0].lower() == b"100-continue" \
            and request.clientproto == b"HTTP/1.1"
        request.requestHeaders.removeHeader(b"expect")
        self.checks = None
        self.result = None  # (consumer, headers), or the Failure
        self.waiting = None
        self.journey = None

    def outcome_of_checks(self):
        self.waiting = Deferred()
        return self.waiting


def _result(result):
    if isinstance(result, Failure):
        result.raiseException()
    return result


def _fire(d, result):
    if isinstance(result, Failure):
        d.errback(result)
    else:
        d.callback(result)


def _refusal(request):
    """(status, sentence) for a request no resource may see, else None."""
    if request.method in REFUSED_METHODS:
        return 405, f"method {request.method.decode('ascii', 'replace')} is not allowed"
    if not request.uri.startswith(b"/"):
        # Absolute-form targets ask for forward proxying; refuse rather
        # than guess which host was meant.
        return 400, "the request target must be a path starting with /"
    if request.uri.find(b"#") >= 0:
        # A fragment never goes on the wire; one that does is a parser
        # differential waiting to happen between us and the upstream.
        return 400, "the request target must not contain '#'"
    hosts = request.requestHeaders.getRawHeaders(b"host")
    if hosts is None:
        if request.clientproto == b"HTTP/1.1":
            return 400, "an HTTP/1.1 request needs a Host header"  # RFC 9112 3.2
    elif len(hosts) > 1 or hosts[0].find(b",") >= 0:
        return 400, "the request has more than one Host"
    return None
