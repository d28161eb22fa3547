"""Forwarding one request upstream and streaming the answer back.

The forwarded request goes through our own HTTP/1.1 client
(apigw.upstream_client: a keep-alive pool framed by httptools, reached here
through its IAgent, FastAgent). twisted.web.client's Agent spent more CPU
per request than all the rest of the gateway, and hid Connection and
Content-Length from us; it stays only as the reference in differential
tests. Never treq's HTTPClient: it asks for and decodes gzip, shares one
cookie jar between all callers and re-encodes URLs, none of which a proxy
may do.
"""

import random

from twisted.internet import defer, error, task
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    FileBodyProducer,
    PotentialDataLoss,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import NO_BODY_CODES
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from apigw.balancer import Balancer, BreakerRegistry
from apigw.config import Settings
from apigw.errors import GatewayError
from apigw.logs import redact
from apigw.retry import RETRYABLE_STATUSES, backoff_delay_s, is_idempotent
from apigw.upstream_client import ConnectionPool, FastAgent

log = Logger()

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"proxy-connection", b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
})

# Never forwarded upstream: set by us (request id, Host, forwarding and
# consumer headers a client could otherwise forge), computed by the client
# library (Content-Length), or secret (the API key, and the master key that
# a careless admin script may send along to every path).
_NOT_FORWARDED = HOP_BY_HOP | {
    b"host", b"content-length", b"x-api-key", b"x-master-key", b"x-request-id", b"expect",
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-prefix",
    b"x-consumer-id", b"x-consumer-username",
}

_NOT_RETURNED = HOP_BY_HOP | {b"x-request-id"}

# Bodies up to this size are sent from memory in one write.
_SMALL_BODY = 64 * 1024


def connection_tokens(headers):
    """Header names listed in Connection: hop-by-hop for this message only."""
    tokens = set()
    for value in headers.getRawHeaders(b"connection", ()):
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


def upstream_headers(request, target, service_name, consumer=None):
    listed = connection_tokens(request.requestHeaders)
    headers = Headers()
    forwarded_for = []
    for name, values in request.requestHeaders.getAllRawHeaders():
        lower = name.lower()
        if lower == b"x-forwarded-for":
            forwarded_for.extend(values)
            continue
        if lower in _NOT_FORWARDED or lower in listed or lower.startswith(b"proxy-"):
            continue
        headers.setRawHeaders(name, values)
    client_ip = request.client_ip.encode("ascii", "replace")
    forwarded_for.append(client_ip)
    headers.setRawHeaders(b"X-Forwarded-For", [b", ".join(forwarded_for)])
    headers.setRawHeaders(b"X-Forwarded-Proto", [b"https" if request.isSecure() else b"http"])
    client_host = request.requestHeaders.getRawHeaders(b"host")
    if client_host:
        headers.setRawHeaders(b"X-Forwarded-Host", [client_host[0]])
    headers.setRawHeaders(b"X-Forwarded-Prefix", [b"/" + service_name.encode("ascii")])
    headers.setRawHeaders(b"X-Request-ID", [request.request_id.encode("ascii")])
    headers.setRawHeaders(b"Host", [target.host_header])
    if consumer is not None:
        headers.setRawHeaders(b"X-Consumer-ID", [consumer.id.encode("utf-8")])
        headers.setRawHeaders(b"X-Consumer-Username", [consumer.owner.encode("utf-8")])
    return headers


@implementer(IBodyProducer)
class BytesProducer:
    """A small body written in one go; no cooperator round trip."""

    # The upstream pool may send it again after a stale connection.
    restartable = True

    def __init__(self, data):
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self._data)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


def body_producer(request):
    """A fresh producer for the buffered request body (one per attempt)."""
    length = request.body_length
    if length == 0 and not request.requestHeaders.hasHeader(b"transfer-encoding") \
            and not request.requestHeaders.hasHeader(b"content-length"):
        return None
    request.content.seek(0)
    if length <= _SMALL_BODY:
        return BytesProducer(request.content.read())
    # FileBodyProducer closes its file when done or stopped; a retry must
    # still be able to read the body again.
    return FileBodyProducer(_KeepOpen(request.content))


class _KeepOpen:
    """A view of a file whose close() leaves the file open."""

    def __init__(self, f):
        self._f = f

    def read(self, *args):
        return self._f.read(*args)

    def seek(self, *args):
        return self._f.seek(*args)

    def tell(self):
        return self._f.tell()

    def close(self):
        pass


class Forwarder:
    """Sends requests to upstream targets over one keep-alive pool."""

    def __init__(self, reactor, metrics, clock=None, agent=None, max_idle_per_host=64,
                 breakers=None, jitter=random.random, debug=False):
        self._reactor = reactor
        # DEBUG=true: one debug line per upstream attempt (twistd logs every
        # level); off, the hot path does not even build the event.
        self._debug = debug
        self._clock = clock if clock is not None else reactor
        self._metrics = metrics
        self._jitter = jitter
        defaults = Settings()
        self._backoff_base_s = defaults.backoff_base_s
        self._backoff_max_s = defaults.backoff_max_s
        # Owned here, not per config: breakers must outlive reloads.
        self.breakers = breakers if breakers is not None else BreakerRegistry(
            self._clock, defaults.breaker_failure_threshold,
            defaults.breaker_recovery_time_s, metrics=metrics,
        )
        self._balancers = {}
        self._configured = False
        # The pool resends an idempotent request once on a fresh connection
        # when a reused one turns out stale before any response byte.
        self.pool = ConnectionPool(reactor, max_idle_per_target=max_idle_per_host,
                                   idle_timeout_s=120)
        self._agent = agent if agent is not None else FastAgent(reactor, self.pool)

    def configure(self, config):
        """Apply a loaded or reloaded GatewayConfig: backoff and breaker
        settings, and balancers that keep the breakers of unchanged targets."""
        settings = config.settings
        self._backoff_base_s = settings.backoff_base_s
        self._backoff_max_s = settings.backoff_max_s
        self._balancers = self.breakers.balancers(config)
        self._configured = True

    def close(self):
        self.breakers.stop()
        return self.pool.close_idle()

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

    async def forward(self, request, service, upstream_path, consumer=None):
        """Proxy `request` to `service`; returns once the response is relayed.

        Targets come round-robin past open breakers. A failed attempt of a
        retryable request is repeated, preferably on another target, after a
        jittered backoff on the clock. Only the final attempt's response is
        relayed, so no retry ever follows a byte sent to the client.
        """
        balancer = self.balancer_for(service)
        retryable = is_idempotent(request.method, service.retry_non_idempotent)
        extra = service.retries if retryable else 0
        request.attempts = 0
        tried = []
        outcome = breaker = None
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
                discard(outcome, self._clock, service.timeout_s)
                outcome = None
                target, breaker = picked
                tried.append(target)
                request.attempts += 1
                outcome = await self._attempt(
                    request, service, target, breaker, upstream_path, consumer)
                if not _worth_retrying(outcome):
                    break
        except BaseException:
            discard(outcome, self._clock, service.timeout_s)
            raise
        if outcome is None:
            raise GatewayError(
                503, f"upstream {service.name} is unavailable (circuit open)",
                headers=[(b"retry-after", b"%d" % balancer.retry_after_s())],
            )
        if isinstance(outcome, GatewayError):
            raise outcome
        await relay(request, outcome, self._clock, service.timeout_s)
        if request.upstream_failed:
            # Cut off mid-body: a connection failure of this target, too late
            # to retry but not too late to count.
            breaker.record_failure()

    async def _attempt(self, request, service, target, breaker, upstream_path, consumer):
        """One attempt reported to the target's breaker: a Response, or the
        GatewayError it failed with."""
        try:
            response = await self.attempt(request, service, target, upstream_path, consumer)
        except GatewayError as e:
            if request._disconnected:
                # The client left; cancelling the Agent's Deferred surfaces as
                # a failed request. Not the target's fault, and nobody waits
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
        else:
            breaker.record_success()
        return response

    async def attempt(self, request, service, target, upstream_path, consumer=None):
        """One upstream attempt up to response headers; GatewayError on failure."""
        uri = target.scheme + b"://" + target.host_header + target.base_path + upstream_path
        headers = upstream_headers(request, target, service.name, consumer)
        if self._debug:
            log.debug(
                "request {request_id}: {method} {uri} (attempt {attempt})",
                request_id=request.request_id, method=request.method.decode("ascii", "replace"),
                uri=redact(uri.decode("latin-1")), attempt=request.attempts,
            )
        started = self._clock.seconds()
        d = self._agent.request(request.method, uri, headers, body_producer(request))
        # Cancelling the Agent's Deferred fails it with ResponseNeverReceived,
        # not CancelledError: say "timed out" explicitly when the timer fired.
        d.addTimeout(service.timeout_s, self._clock, onTimeoutCancel=_timed_out)
        try:
            response = await d
        except defer.TimeoutError:
            raise GatewayError(
                504, f"upstream {service.name} did not answer within {service.timeout_s:g}s"
            ) from None
        except (error.ConnectError, error.ConnectionLost, ResponseFailed,
                error.DNSLookupError, ResponseNeverReceived, RequestTransmissionFailed) as e:
            if not request._disconnected:  # else the client left, not the upstream
                log.info("upstream {target} failed: {why}", target=target.url, why=_why(e))
            raise GatewayError(502, f"upstream {service.name} is unreachable or failed") from None
        finally:
            elapsed = self._clock.seconds() - started
            request.upstream_latency_ms = round(elapsed * 1000, 3)
        self._metrics.upstream_latency.labels(service.name).observe(elapsed)
        return response


def _worth_retrying(outcome):
    if isinstance(outcome, GatewayError):
        return True
    return outcome.code in RETRYABLE_STATUSES


def discard(response, clock, timeout_s):
    """Drop a response that will not be relayed, without waiting for it."""
    if response is None or isinstance(response, GatewayError):
        return
    response.deliverBody(_Drain(clock, timeout_s))


class _Drain(Protocol):
    """Reads a short error body so the connection can go back to the pool;
    a long or stalled one is cut instead of holding a connection."""

    def __init__(self, clock, timeout_s, limit=_SMALL_BODY):
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


def copy_response_headers(response, request):
    listed = connection_tokens(response.headers)
    if response.code == 204:
        # RFC 9110 8.6: never a Content-Length on a 204, whatever upstream says.
        listed.add(b"content-length")
    out = request.responseHeaders
    for name, values in response.headers.getAllRawHeaders():
        lower = name.lower()
        if lower in _NOT_RETURNED or lower in listed or lower.startswith(b"proxy-"):
            continue
        out.setRawHeaders(name, values)
    if not out.hasHeader(b"content-length") and isinstance(response.length, int) \
            and response.code not in NO_BODY_CODES and request.method != b"HEAD":
        # Agent (kept as the reference client) files Content-Length away
        # from response.headers; its length attribute still knows it.
        out.setRawHeaders(b"content-length", [b"%d" % response.length])


def relay(request, response, clock, idle_timeout_s):
    """Stream `response` to the client; fires when the client has it all.

    An upstream that goes quiet mid-body for idle_timeout_s is cut off, like
    nginx's proxy_read_timeout: nothing else would ever end that request.
    """
    request.setResponseCode(response.code, response.phrase)
    # No invented Content-Type when the upstream sent none.
    request.defaultContentType = None
    copy_response_headers(response, request)
    for name, value in request.extra_response_headers:
        request.responseHeaders.setRawHeaders(name, [value])
    request.responseHeaders.setRawHeaders(b"x-request-id", [request.request_id.encode("ascii")])
    done = defer.Deferred()
    if request.method == b"HEAD" or response.code in NO_BODY_CODES:
        # No body follows; let the pool have the connection back.
        response.deliverBody(_Discard(done))
        done.addCallback(lambda _: _finish(request))
        return done
    response.deliverBody(_Relay(request, done, clock, idle_timeout_s))
    return done


def _finish(request):
    if not request.finished and not request._disconnected:
        request.finish()


class _Discard(Protocol):
    def __init__(self, done):
        self._done = done

    def connectionLost(self, reason):
        self._done.callback(None)


@implementer(IPushProducer)
class _Relay(Protocol):
    """Writes upstream body bytes to the client as they come.

    It is the client's producer, passing pause and resume on to the upstream
    transport: a slow client pauses the upstream socket instead of growing
    our buffers, and the idle timer only runs while we are willing to read.
    """

    def __init__(self, request, done, clock, idle_timeout_s):
        self._request = request
        self._done = done
        self._clock = clock
        self._idle_timeout_s = idle_timeout_s
        self._timer = None

    def connectionMade(self):
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(self._client_gone)
        self._arm()

    def _client_gone(self, _):
        # The client left mid-body: stop reading from the upstream.
        self.stopProducing()

    def pauseProducing(self):
        self._disarm()
        self.transport.pauseProducing()

    def resumeProducing(self):
        self.transport.resumeProducing()
        self._arm()

    def stopProducing(self):
        self._disarm()
        self.transport.stopProducing()

    def _arm(self):
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle_timeout_s)
        else:
            self._timer = self._clock.callLater(self._idle_timeout_s, self._stalled)

    def _disarm(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _stalled(self):
        self._timer = None
        log.info("upstream body stalled for {timeout}s; cutting it off",
                 timeout=self._idle_timeout_s)
        self.transport.stopProducing()

    def dataReceived(self, data):
        if not self._request._disconnected:
            self._arm()
            self._request.write(data)

    def connectionLost(self, reason):
        self._disarm()
        request = self._request
        if not request._disconnected:
            request.unregisterProducer()
            if reason.check(ResponseDone, PotentialDataLoss):
                request.finish()
            else:
                # The upstream died mid-body. Closing without finishing (no
                # last chunk, or short of Content-Length) tells the client
                # the body is truncated; what was sent still gets flushed.
                log.info("upstream body cut short: {why}", why=reason.getErrorMessage())
                request.upstream_failed = True
                request.channel.transport.loseConnection()
        self._done.callback(None)
