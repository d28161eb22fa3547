"""The breaker and forward stages: attempts upstream, with retries.

Targets come round-robin past open breakers (apigw.balancer). A failed
attempt of a retryable request is repeated, preferably on another target,
after a jittered backoff on the clock. Only the final attempt's response is
returned, so no retry ever follows a byte sent to the client.

Requests go out through an upstream client with the contract
`request(target, method, path, header_pairs, body_producer)` ->
Deferred[IResponse] and `close_idle()`: our own pool (apigw.upstream_client)
by default, or twisted.web's Agent behind `AgentClient` (the reference the
differential tests compare with). Never treq's HTTPClient: it asks for and
decodes gzip, shares one cookie jar between all callers and re-encodes URLs,
none of which a proxy may do.
"""

import random

from twisted.internet import defer, error, task
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers

from apigw.balancer import Balancer, BreakerRegistry
from apigw.body import SMALL_BODY, body_producer
from apigw.config import Settings
from apigw.deadlines import Timeouts
from apigw.errors import GatewayError
from apigw.headers import upstream_header_pairs
from apigw.logs import redact
from apigw.retry import RETRYABLE_STATUSES, backoff_delay_s, is_idempotent
from apigw.upstream_client import ConnectionPool

log = Logger()

_CONNECTION_FAILURES = (
    error.ConnectError, error.ConnectionLost, ResponseFailed, error.DNSLookupError,
    ResponseNeverReceived, RequestTransmissionFailed,
)


class Forwarded:
    """The response to relay, and the breaker of the target that gave it.

    An answer the breaker counts as a failure (502, 503, 504) has its
    verdict already; any other waits for its body (`settle`): a 200 cut
    short mid-body is a failure of the target too.
    """

    __slots__ = ("response", "breaker", "_pending")

    def __init__(self, response, breaker, pending):
        self.response = response
        self.breaker = breaker
        self._pending = pending

    def settle(self, verdict):
        """Give the target its verdict (one of the breaker's record_*), once."""
        if self._pending:
            self._pending = False
            verdict()


class AgentClient:
    """The upstream client contract over any IAgent (twisted.web's Agent in
    the differential tests): builds the URI and Headers an IAgent takes."""

    def __init__(self, agent, pool=None):
        self._agent = agent
        self._pool = pool

    def request(self, target, method, path, header_pairs, body_producer=None):
        uri = target.scheme + b"://" + target.host_header + path
        headers = Headers()
        for name, value in header_pairs:
            headers.addRawHeader(name, value)
        return self._agent.request(method, uri, headers, body_producer)

    def close_idle(self):
        if self._pool is None:
            return defer.succeed(None)
        return self._pool.closeCachedConnections()


def default_client(reactor):
    """Our own keep-alive pool, as the gateway runs it."""
    return ConnectionPool(reactor, max_idle_per_target=64, idle_timeout_s=120)


class Forwarder:
    """Sends a request to its service's targets; owns breakers across reloads."""

    def __init__(self, client, metrics, clock, breakers=None, jitter=random.random,
                 debug=False):
        self.client = client
        self._clock = clock
        self._metrics = metrics
        self._jitter = jitter
        # DEBUG=true: one debug line per upstream attempt (twistd logs every
        # level); off, the hot path does not even build the event.
        self._debug = debug
        defaults = Settings()
        self._backoff_base_s = defaults.backoff_base_s
        self._backoff_max_s = defaults.backoff_max_s
        # Owned here, not per config: breakers must outlive reloads.
        self.breakers = breakers if breakers is not None else BreakerRegistry(
            clock, defaults.breaker_failure_threshold,
            defaults.breaker_recovery_time_s, metrics=metrics,
            min_requests=defaults.breaker_min_requests,
            failure_ratio=defaults.breaker_failure_ratio, window_s=defaults.breaker_window_s,
        )
        self._balancers = {}
        self._timeouts = Timeouts(clock)
        self._configured = False

    def configure(self, config):
        """Apply a loaded or reloaded GatewayConfig: backoff and breaker
        settings, and balancers that keep the breakers of unchanged targets."""
        settings = config.settings
        self._backoff_base_s = settings.backoff_base_s
        self._backoff_max_s = settings.backoff_max_s
        self._balancers = self.breakers.balancers(config)
        self._configured = True
        configure_client = getattr(self.client, "configure", None)
        if configure_client is not None:  # our pool; an Agent has no such knobs
            configure_client(
                max_idle_per_target=settings.upstream_max_idle_per_target,
                idle_timeout_s=settings.upstream_idle_timeout_s,
                max_head_bytes=settings.upstream_max_head_bytes,
                max_headers=settings.upstream_max_headers,
            )

    def close(self):
        self.breakers.stop()
        self._timeouts.stop()
        return self.client.close_idle()

    def balancer_for(self, service):
        balancer = self._balancers.get(service.name)
        if balancer is not None and balancer.targets == service.targets:
            return balancer
        if not self._configured:
            balancer = self.breakers.balancer(service)
            self._balancers[service.name] = balancer
            return balancer
        # A request routed before a reload that changed this service's
        # targets: use the live breakers it shares with the new config, and
        # throwaway ones for removed targets rather than resurrecting them.
        return Balancer(
            service.name, service.targets,
            lambda t: self.breakers.breaker(service.name, t.url, register=False),
        )

    async def forward(self, request, service, upstream_path, consumer, outcome,
                      websocket=False):
        """The final attempt's response as Forwarded, or GatewayError 502,
        503 (every breaker open), 504. Counts attempts and upstream latency
        into `outcome`. `websocket`: a handshake, sent with its Upgrade."""
        balancer = self.balancer_for(service)
        retryable = is_idempotent(request.method, service.retry_non_idempotent)
        extra = service.retries if retryable else 0
        header_pairs = upstream_header_pairs(
            request.requestHeaders, request.client_ip, request.isSecure(),
            request.request_id, service.name, consumer, websocket=websocket,
        )
        tried = []
        result = breaker = None
        try:
            for n in range(extra + 1):
                if n:
                    await task.deferLater(self._clock, backoff_delay_s(
                        n - 1, self._backoff_base_s, self._backoff_max_s, self._jitter))
                picked = balancer.pick(exclude=tried)
                if picked is None:
                    break
                if n:
                    self._metrics.upstream_retries.labels(service.name).inc()
                discard(result, self._clock, service.timeout_s)
                result = None
                target, breaker = picked
                tried.append(target)
                outcome.attempts += 1
                result = await self._attempt(
                    request, service, target, breaker, upstream_path, header_pairs, outcome)
                if not _worth_retrying(result):
                    break
        except BaseException:
            discard(result, self._clock, service.timeout_s)
            raise
        if result is None:
            raise GatewayError(
                503, f"upstream {service.name} is unavailable (circuit open)",
                headers=[(b"retry-after", b"%d" % balancer.retry_after_s())],
            )
        if isinstance(result, GatewayError):
            raise result
        return Forwarded(result, breaker, pending=result.code not in RETRYABLE_STATUSES)

    async def _attempt(self, request, service, target, breaker, upstream_path, header_pairs,
                       outcome):
        """One attempt reported to the target's breaker: a response, or the
        GatewayError it failed with."""
        try:
            response = await self._send(
                request, service, target, upstream_path, header_pairs, outcome)
        except GatewayError as e:
            if request.client_gone:
                # The client left; cancelling the request surfaces as a
                # failed request. Not the target's fault, and nobody waits
                # for a retry.
                breaker.record_cancelled()
                raise defer.CancelledError() from None
            breaker.record_failure()
            return e
        except BaseException:
            # Cancelled (client gone) or a bug: no verdict on the target, but
            # a half-open breaker must not wait forever for its probe.
            breaker.record_cancelled()
            raise
        if response.code in RETRYABLE_STATUSES:
            breaker.record_failure()
        # Else the verdict waits for the body (Forwarded.settle).
        return response

    async def _send(self, request, service, target, upstream_path, header_pairs, outcome):
        """One attempt up to response headers; GatewayError on failure."""
        path = target.base_path + upstream_path
        if self._debug:
            log.debug(
                "request {request_id}: {method} {uri} (attempt {attempt})",
                request_id=request.request_id, method=request.method.decode("ascii", "replace"),
                uri=redact((target.url + upstream_path.decode("latin-1"))),
                attempt=outcome.attempts,
            )
        started = self._clock.seconds()
        d = self.client.request(
            # Host: the client adds the target's own.
            target, request.method, path, header_pairs,
            body_producer(request),
        )
        # Cancelling the client's Deferred fails it with ResponseNeverReceived,
        # not CancelledError: say "timed out" explicitly when the timer fired.
        self._timeouts.add(d, service.timeout_s, _timed_out)
        try:
            response = await d
        except defer.TimeoutError:
            raise GatewayError(
                504, f"upstream {service.name} did not answer within {service.timeout_s:g}s"
            ) from None
        except _CONNECTION_FAILURES as e:
            if not request.client_gone:  # else the client left, not the upstream
                log.info("upstream {target} failed: {why}", target=target.url, why=_why(e))
            raise GatewayError(502, f"upstream {service.name} is unreachable or failed") from None
        finally:
            elapsed = self._clock.seconds() - started
            outcome.upstream_latency_ms = round(elapsed * 1000, 3)
        self._metrics.observe_upstream(service.name, elapsed)
        return response


def _worth_retrying(result):
    if isinstance(result, GatewayError):
        return True
    return result.code in RETRYABLE_STATUSES


def discard(response, clock, timeout_s):
    """Drop a response that will not be relayed, without waiting for it."""
    if response is None or isinstance(response, GatewayError):
        return
    response.deliverBody(_Drain(clock, timeout_s))


class _Drain(Protocol):
    """Reads a short error body so the connection can go back to the pool;
    a long or stalled one is cut instead of holding a connection."""

    def __init__(self, clock, timeout_s, limit=SMALL_BODY):
        self._clock = clock
        self._timeout_s = timeout_s
        self._left = limit
        self._timer = None
        self._cut_off = False

    def connectionMade(self):
        self._timer = self._clock.callLater(self._timeout_s, self._cut)

    def dataReceived(self, data):
        self._left -= len(data)
        if self._left < 0:
            self._cut()

    def _cut(self):
        self._cancel_timer()
        if not self._cut_off:
            self._cut_off = True
            self.transport.stopProducing()

    def _cancel_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason):
        self._cancel_timer()


def _timed_out(result, timeout_s):
    return Failure(defer.TimeoutError(f"no response headers within {timeout_s}s"))


def _why(failure_or_exc):
    reasons = getattr(failure_or_exc, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return str(failure_or_exc) or type(failure_or_exc).__name__
