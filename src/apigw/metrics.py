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

The request path only tallies its observations in plain Python (the
request counter and the two latency histograms, in buckets of their own);
they reach prometheus_client's values at each scrape, and with `--workers`
also every FLUSH_INTERVAL_S, so that a scrape through another worker sees
them. prometheus_client takes a lock for each value it changes and, with
workers, also asks the OS for its pid and writes the value to its file:
the 5 values a request changed cost 2 µs in one process, and with the
in-flight gauge's 2 more, 7 µs in a worker. The tallies are plain dicts
and ints: observed, flushed and scraped on the reactor thread only, by
one service's Metrics.
"""

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET

import apigw
from apigw.errors import GetOnly, error_response

log = Logger()

# A gateway adds milliseconds; upstreams may take tens of seconds.
LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)

KNOWN_METHODS = frozenset(
    {b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE"}
)

BREAKER_STATES = {"closed": 0, "open": 1, "half_open": 2}

# Bucket bounds as prometheus_client keeps them: +Inf last.
_BOUNDS = (*LATENCY_BUCKETS_S, float("inf"))

# How far behind the values a scrape through another worker may be.
FLUSH_INTERVAL_S = 1.0

# Tallies kept at most (one per service, method and status seen): methods
# are any bytes a client sends, so past this the table is flushed and
# emptied rather than grown.
MAX_TALLIES = 10000


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
        # Observations not yet in prometheus_client's values.
        self._request_tallies = {}
        self._upstream_tallies = {}
        self._in_flight_count = None
        self._flushing = None
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
            merged, self.flush,
        ))

    def in_flight_from(self, count):
        """Have the in-flight gauge show `count()`: read at scrape time, and
        with workers (whose gauges live in files) written at each flush."""
        if self._multiprocess:
            self._in_flight_count = count
        else:
            self.in_flight.set_function(count)

    def start(self, clock):
        """With workers, flush every FLUSH_INTERVAL_S from now on."""
        if self._multiprocess and self._flushing is None:
            from twisted.internet.task import LoopingCall

            self._flushing = LoopingCall(self._timed_flush)
            self._flushing.clock = clock
            self._flushing.start(FLUSH_INTERVAL_S, now=False)

    def _timed_flush(self):
        try:
            self.flush()
        except Exception:
            # Kept going: the next flush carries what this one could not.
            log.failure("writing the metrics to the shared files")

    def stop(self):
        """Flush what is left; no more timed flushes."""
        flushing, self._flushing = self._flushing, None
        if flushing is not None and flushing.running:
            flushing.stop()
        self.flush()

    def observe_request(self, service, method, status, latency_s):
        """Count one finished request.

        The method label is bounded: any client can invent method names,
        and each would otherwise become a new time series.
        """
        key = (service, method, status)
        tally = self._request_tallies.get(key)
        if tally is None:
            label = method.decode("ascii") if method in KNOWN_METHODS else "OTHER"
            tally = self._tally(self._request_tallies, key,
                                self.request_latency.labels(service),
                                self.requests_total.labels(service, label, str(status)))
        tally.count += 1
        tally.sum += latency_s
        tally.buckets[bisect_left(_BOUNDS, latency_s)] += 1

    def observe_upstream(self, service, latency_s):
        """One upstream attempt's time to response headers."""
        tally = self._upstream_tallies.get(service)
        if tally is None:
            tally = self._tally(self._upstream_tallies, service,
                                self.upstream_latency.labels(service))
        tally.count += 1
        tally.sum += latency_s
        tally.buckets[bisect_left(_BOUNDS, latency_s)] += 1

    def _tally(self, tallies, key, histogram, counter=None):
        if len(tallies) >= MAX_TALLIES:
            self.flush()
            tallies.clear()
        tally = tallies[key] = _Tally(histogram, counter)
        return tally

    def flush(self):
        """Put the observations tallied so far into prometheus_client's values."""
        for tallies in (self._request_tallies, self._upstream_tallies):
            for tally in tallies.values():
                if tally.count:
                    tally.flush()
        if self._in_flight_count is not None:
            self.in_flight.set(self._in_flight_count())

    def render(self):
        return generate_latest(self.registry)


class _Tally:
    """One label set's observations since the last flush."""

    __slots__ = ("histogram", "counter", "count", "sum", "buckets")

    def __init__(self, histogram, counter):
        self.histogram = histogram
        self.counter = counter
        self.count = 0
        self.sum = 0.0
        self.buckets = [0] * len(_BOUNDS)

    def flush(self):
        # Taken before they are added: a write that fails half-way loses
        # its share rather than counting the rest twice next time.
        count, total, buckets = self.count, self.sum, self.buckets
        self.count = 0
        self.sum = 0.0
        self.buckets = [0] * len(_BOUNDS)
        if self.counter is not None:
            self.counter.inc(count)
        add_observations(self.histogram, buckets, total)


def add_observations(histogram, bucket_counts, total):
    """What observe() would have done to a Histogram child for observations
    that fell `bucket_counts[i]` into each of its buckets (upper bounds as
    its own, +Inf last) and added up to `total`.

    prometheus_client has no public call for many observations at once.
    Relies on a Histogram child keeping its bucket bounds in the private
    `_upper_bounds`, one value per bucket (not cumulative) in `_buckets`
    and the sum in `_sum`, each value with an inc(); tests/test_metrics.py
    pins that against observe().
    """
    if tuple(histogram._upper_bounds) != _BOUNDS:
        raise ValueError("the histogram's buckets are not LATENCY_BUCKETS_S")
    values = histogram._buckets
    for i, n in enumerate(bucket_counts):
        if n:
            values[i].inc(n)
    histogram._sum.inc(total)


class _Exposition:
    """What /metrics shows, the same families with or without workers.

    With workers, the merged files of all of them, plus the families none
    has written yet (a family appears in the files only once it has
    samples; dashboards and alerts want each one from the start). Either
    way without the `_created` series: the files do not keep them, and
    they are no part of the metric names apigw promises.
    """

    def __init__(self, metrics, merged=None, flush=lambda: None):
        self._metrics = metrics
        self._merged = merged
        self._flush = flush

    def collect(self):
        self._flush()
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
