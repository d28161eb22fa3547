"""Forwarding one request upstream and streaming the answer back.

The forwarded request goes through twisted.web.client.Agent over our own
persistent pool, not treq's HTTPClient: that one asks for and decodes gzip,
shares one cookie jar between all callers and re-encodes URLs, none of which
a proxy may do.
"""

from twisted.internet import defer, error
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
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

from apigw.errors import GatewayError

log = Logger()

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"proxy-connection", b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
})

# Never forwarded upstream: set by us (request id, Host, forwarding and
# consumer headers a client could otherwise forge), computed by the client
# library (Content-Length), or secret (the API key).
_NOT_FORWARDED = HOP_BY_HOP | {
    b"host", b"content-length", b"x-api-key", b"x-request-id", b"expect",
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
    return FileBodyProducer(request.content)


class Forwarder:
    """Sends requests to upstream targets over one keep-alive pool."""

    def __init__(self, reactor, metrics, clock=None, agent=None, max_idle_per_host=64):
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._metrics = metrics
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        # Twisted keeps 2 idle connections per host by default: far too few
        # for a gateway, every extra one would be a new TCP handshake.
        self.pool.maxPersistentPerHost = max_idle_per_host
        self.pool.cachedConnectionTimeout = 120
        # The pool's own retry only resends body-less idempotent requests on a
        # reused connection that died before any byte came back: the stale
        # keep-alive case, safe to keep.
        self.pool.retryAutomatically = True
        self._agent = agent if agent is not None else Agent(reactor, pool=self.pool)

    def close(self):
        return self.pool.closeCachedConnections()

    async def forward(self, request, service, upstream_path, consumer=None):
        """Proxy `request` to `service`; returns once the response is relayed."""
        # HOOK: resilience -- one attempt on the first target for now.
        target = service.targets[0]
        request.attempts = 1
        response = await self.attempt(request, service, target, upstream_path, consumer)
        await relay(request, response)

    async def attempt(self, request, service, target, upstream_path, consumer=None):
        """One upstream attempt up to response headers; GatewayError on failure."""
        uri = target.scheme + b"://" + target.host_header + target.base_path + upstream_path
        headers = upstream_headers(request, target, service.name, consumer)
        started = self._clock.seconds()
        d = self._agent.request(request.method, uri, headers, body_producer(request))
        d.addTimeout(service.timeout_s, self._clock)
        try:
            response = await d
        except defer.TimeoutError:
            raise GatewayError(
                504, f"upstream {service.name} did not answer within {service.timeout_s:g}s"
            ) from None
        except (error.ConnectError, error.ConnectionLost, ResponseFailed,
                error.DNSLookupError, ResponseNeverReceived, RequestTransmissionFailed) as e:
            log.info("upstream {target} failed: {why}", target=target.url, why=_why(e))
            raise GatewayError(502, f"upstream {service.name} is unreachable or failed") from None
        finally:
            elapsed = self._clock.seconds() - started
            request.upstream_latency_ms = round(elapsed * 1000, 3)
        self._metrics.upstream_latency.labels(service.name).observe(elapsed)
        return response


def _why(failure_or_exc):
    reasons = getattr(failure_or_exc, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return str(failure_or_exc) or type(failure_or_exc).__name__


def copy_response_headers(response, request):
    listed = connection_tokens(response.headers)
    out = request.responseHeaders
    for name, values in response.headers.getAllRawHeaders():
        lower = name.lower()
        if lower in _NOT_RETURNED or lower in listed or lower.startswith(b"proxy-"):
            continue
        out.setRawHeaders(name, values)


def relay(request, response):
    """Stream `response` to the client; fires when the client has it all."""
    request.setResponseCode(response.code, response.phrase)
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
    response.deliverBody(_Relay(request, done))
    return done


def _finish(request):
    if not request.finished and not request._disconnected:
        request.finish()


class _Discard(Protocol):
    def __init__(self, done):
        self._done = done

    def connectionLost(self, reason):
        self._done.callback(None)


class _Relay(Protocol):
    """Writes upstream body bytes to the client as they come.

    The upstream transport is registered as the client's producer, so a slow
    client pauses the upstream socket instead of growing our buffers.
    """

    def __init__(self, request, done):
        self._request = request
        self._done = done

    def connectionMade(self):
        self._request.registerProducer(self.transport, True)
        self._request.notifyFinish().addErrback(self._client_gone)

    def _client_gone(self, _):
        # The client left mid-body: stop reading from the upstream.
        self.transport.stopProducing()

    def dataReceived(self, data):
        if not self._request._disconnected:
            self._request.write(data)

    def connectionLost(self, reason):
        request = self._request
        if not request._disconnected:
            request.unregisterProducer()
            if reason.check(ResponseDone, PotentialDataLoss):
                request.finish()
            else:
                # The upstream died mid-body; the client must not take a
                # truncated body for a whole one.
                log.info("upstream body cut short: {why}", why=reason.getErrorMessage())
                request.upstream_failed = True
                request.channel.transport.abortConnection()
        self._done.callback(None)
