"""The metrics users scrape, on a registry passed around, not global.

One process (the default) keeps its metrics in a plain CollectorRegistry.
With `--workers N` every worker writes its samples to files in a directory
the supervisor made (prometheus_client's multiprocess mode) and /metrics
merges all of them, so any worker reports the totals of all: counters and
histograms are summed, files of dead workers included (totals never go
back); `gateway_in_flight_requests` is summed over live workers;
`gateway_websocket_connections` is summed over live workers;
`gateway_build_info` is 1 however many workers say so; and
`gateway_circuit_breaker_state` shows, per target, the highest state among
live workers (each worker has its own breakers; open or half_open shows as
soon as one of them has tripped).
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector
from twisted.web.server import NOT_DONE_YET

import apigw
from apigw.errors import GetOnly, error_response

# A gateway adds milliseconds; upstreams may take tens of seconds.
LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)

KNOWN_METHODS = frozenset(
    {b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE"}
)

BREAKER_STATES = {"closed": 0, "open": 1, "half_open": 2}


class Metrics:
    def __init__(self, registry=None, multiprocess_dir=None):
        """multiprocess_dir: PROMETHEUS_MULTIPROC_DIR of a worker; it must be
        in the environment before prometheus_client is first imported."""
        self._multiprocess = multiprocess_dir is not None
        self.registry = registry if registry is not None else CollectorRegistry()
        # Not registered themselves: _Exposition shows them, and with workers
        # the values live in the files (registering them would report this
        # worker's share twice).
        r = None
        self._request_children = {}
        self.requests_total = Counter(
            "gateway_requests_total", "Total requests through gateway",
            ["service", "method", "status"], registry=r,
        )
        self.request_latency = Histogram(
            "gateway_request_latency_seconds", "Request latency through gateway",
            ["service"], buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.upstream_latency = Histogram(
            "gateway_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers",
            ["service"], buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.upstream_retries = Counter(
            "gateway_upstream_retries_total", "Upstream attempts beyond the first",
            ["service"], registry=r,
        )
        self.rate_limited = Counter(
            "gateway_rate_limited_total", "Requests refused by the rate limiter",
            ["service"], registry=r,
        )
        self.auth_failures = Counter(
            "gateway_auth_failures_total", "Requests refused by API key authentication",
            ["reason"], registry=r,
        )
        self.breaker_state = Gauge(
            "gateway_circuit_breaker_state",
            "Circuit breaker state per upstream target (0 closed, 1 open, 2 half_open)",
            ["service", "target"], registry=r, multiprocess_mode="livemax",
        )
        self.in_flight = Gauge(
            "gateway_in_flight_requests", "Requests being handled now", registry=r,
            multiprocess_mode="livesum",
        )
        self.config_reloads = Counter(
            "gateway_config_reloads_total", "Configuration reloads by result",
            ["result"], registry=r,
        )
        self.websocket_connections = Gauge(
            "gateway_websocket_connections", "Open WebSocket tunnels", ["service"],
            registry=r, multiprocess_mode="livesum",
        )
        self.build_info = Gauge(
            "gateway_build_info", "The apigw version this process runs (always 1)",
            ["version"], registry=r, multiprocess_mode="max",
        )
        self.build_info.labels(apigw.__version__).set(1)
        merged = None
        if multiprocess_dir is not None:
            merged = MultiProcessCollector(None, path=multiprocess_dir)
        self.registry.register(_Exposition(
            [self.requests_total, self.request_latency, self.upstream_latency,
             self.upstream_retries, self.rate_limited, self.auth_failures,
             self.breaker_state, self.in_flight, self.config_reloads,
             self.websocket_connections, self.build_info],
            merged,
        ))

    def in_flight_from(self, count):
        """Have the in-flight gauge read `count()` at scrape time; False
        where it cannot (worker processes share it through files), and the
        caller must inc() and dec() it instead."""
        if self._multiprocess:
            return False
        self.in_flight.set_function(count)
        return True

    def observe_request(self, service, method, status, latency_s):
        """Count one finished request; label children are looked up once.

        The method label is bounded: any client can invent method names,
        and each would otherwise become a new time series.
        """
        key = (service, method, status)
        children = self._request_children.get(key)
        if children is None:
            label = method.decode("ascii") if method in KNOWN_METHODS else "OTHER"
            children = (
                self.requests_total.labels(service, label, str(status)),
                self.request_latency.labels(service),
            )
            if len(self._request_children) < 10000:
                self._request_children[key] = children
        children[0].inc()
        children[1].observe(latency_s)

    def render(self):
        return generate_latest(self.registry)


class _Exposition:
    """What /metrics shows, the same families with or without workers.

    With workers, the merged files of all of them, plus the families none
    has written yet (a family appears in the files only once it has
    samples; dashboards and alerts want each one from the start). Either
    way without the `_created` series: the files do not keep them, and
    they are no part of the metric names apigw promises.
    """

    def __init__(self, metrics, merged=None):
        self._metrics = metrics
        self._merged = merged

    def collect(self):
        if self._merged is None:
            families = [family for metric in self._metrics for family in metric.collect()]
        else:
            merged = {family.name: family for family in self._merged.collect()}
            families = [merged.pop(empty.name, empty)
                        for metric in self._metrics for empty in metric.describe()]
            families.extend(merged.values())
        for family in families:
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class MetricsResource(GetOnly):
    """/metrics; `trusted(address)` says who may scrape it (403 for others)."""

    def __init__(self, metrics, trusted=lambda address: True):
        super().__init__()
        self._metrics = metrics
        self._trusted = trusted

    def render_GET(self, request):
        if not self._trusted(request.getClientAddress()):
            error_response(request, 403, "this address may not read the metrics")
            return NOT_DONE_YET
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self._metrics.render()
