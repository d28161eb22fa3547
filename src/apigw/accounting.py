"""The account stage: what every finished request leaves behind.

One call per request, with its Outcome: the request metrics, one access
record, and the in-flight count that drain waits on.
"""

import attr
from twisted.internet import defer
from twisted.logger import Logger

log = Logger()


@attr.s(slots=True, auto_attribs=True)
class Outcome:
    """One request's record, filled in by the pipeline as it goes and read
    by the access log and the metrics when it is over."""

    request_id: str
    method: bytes
    path: bytes
    client_ip: str
    started_s: float
    service: str = "unknown"
    status: int = 0
    consumer: object = None
    attempts: int = 0
    upstream_latency_ms: object = None
    bytes_sent: int = 0
    bytes_received: int = 0
    # Pairs the gateway adds to this request's answer (rate-limit headers).
    extra_headers: tuple = ()
    error: object = None
    # A WebSocket tunnel's (apigw.websocket): when its 101 went out and
    # when it closed; None for every other request.
    tunnel_opened_s: object = None
    tunnel_closed_s: object = None


class Accounting:
    """Counts requests in flight, and records each one when it ends."""

    def __init__(self, metrics, access_log, clock):
        self._metrics = metrics
        self._access_log = access_log
        self._clock = clock
        self._in_flight = 0
        self._drained = []
        # Counted here, read by the gauge (apigw.metrics).
        metrics.in_flight_from(lambda: self._in_flight)

    @property
    def in_flight(self):
        return self._in_flight

    def opened(self, request):
        """A counted request began: its Outcome, to be passed to closed()."""
        self._in_flight += 1
        return Outcome(request.request_id, request.method, request.uri, request.client_ip,
                       self._clock.seconds())

    def upgraded(self, outcome):
        """A WebSocket handshake was answered 101: counted now, with the
        handshake's latency, while the tunnel stays in flight until closed()."""
        outcome.status = 101
        outcome.tunnel_opened_s = self._clock.seconds()
        self._metrics.observe_request(outcome.service, outcome.method, 101,
                                      outcome.tunnel_opened_s - outcome.started_s)

    def closed(self, outcome):
        duration_ms = None
        if outcome.tunnel_opened_s is None:
            latency_s = self._clock.seconds() - outcome.started_s
            self._metrics.observe_request(
                outcome.service, outcome.method, outcome.status, latency_s)
        else:  # counted by upgraded()
            latency_s = outcome.tunnel_opened_s - outcome.started_s
            closed_s = outcome.tunnel_closed_s
            if closed_s is None:
                closed_s = self._clock.seconds()
            duration_ms = round((closed_s - outcome.tunnel_opened_s) * 1000, 3)
        consumer = outcome.consumer
        self._access_log.record({
            "request_id": outcome.request_id,
            "method": outcome.method.decode("ascii", "replace"),
            "path": outcome.path.decode("utf-8", "replace"),
            "service": outcome.service,
            "status": outcome.status,
            "latency_ms": round(latency_s * 1000, 3),
            "upstream_latency_ms": outcome.upstream_latency_ms,
            "attempts": outcome.attempts,
            "client_ip": outcome.client_ip,
            "consumer": consumer.owner if consumer is not None else None,
            "bytes_sent": outcome.bytes_sent,
            "bytes_received": outcome.bytes_received,
            "duration_ms": duration_ms,
            # What went wrong that the status does not say (a body cut short).
            "error": outcome.error,
        })
        self._in_flight -= 1
        if self._in_flight == 0 and self._drained:
            waiters, self._drained = self._drained, []
            for d in waiters:
                d.callback(None)

    def drain(self, grace_s):
        """Fires when no request is in flight, or after grace_s at the latest."""
        if self._in_flight == 0:
            return defer.succeed(None)
        d = defer.Deferred()
        self._drained.append(d)
        log.info("draining {n} in-flight requests (up to {grace}s)",
                 n=self._in_flight, grace=grace_s)
        d.addTimeout(grace_s, self._clock, onTimeoutCancel=self._drain_expired)
        return d

    def _drain_expired(self, result, grace_s):
        log.warn("shutdown grace of {grace}s over with {n} requests in flight",
                 grace=grace_s, n=self._in_flight)
