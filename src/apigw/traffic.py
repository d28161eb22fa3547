"""Each service's recent traffic and breakers, read from the metrics registry.

A timer snapshots the registry's request counters and latency histogram
every `interval_s`; a service's rates are the difference between now and
the oldest snapshot within `window_s`, its p99 is interpolated from the
histogram's bucket differences as Prometheus's histogram_quantile does.
Reading the registry instead of counting again means that with --workers,
where the registry holds the merged files of every worker, each worker
reports the totals of all of them, breakers included (the highest state
among live workers).
"""

import collections
import math

import attr
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from apigw.keys import isoformat
from apigw.metrics import BREAKER_STATES

log = Logger()

STATE_NAMES = {value: name for name, value in BREAKER_STATES.items()}


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Snapshot:
    at: float
    # service -> (requests, 5xx answers)
    requests: dict
    # service -> ((le, cumulative count), ...) in ascending le, +Inf last
    buckets: dict
    # (service, target url) -> state name
    breakers: dict


def snapshot(registry, now):
    requests = collections.defaultdict(lambda: [0.0, 0.0])
    buckets = collections.defaultdict(list)
    breakers = {}
    for family in registry.collect():
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "gateway_requests_total":
                counts = requests[labels["service"]]
                counts[0] += sample.value
                if labels["status"].startswith("5"):
                    counts[1] += sample.value
            elif sample.name == "gateway_request_latency_seconds_bucket":
                buckets[labels["service"]].append((float(labels["le"]), sample.value))
            elif sample.name == "gateway_circuit_breaker_state":
                breakers[(labels["service"], labels["target"])] = STATE_NAMES.get(
                    int(sample.value), "closed")
    return Snapshot(
        now,
        {s: tuple(c) for s, c in requests.items()},
        {s: tuple(sorted(b)) for s, b in buckets.items()},
        breakers,
    )


def quantile(q, older, newer):
    """The q-quantile of what the histogram saw between two bucket tuples,
    in seconds; None when it saw nothing."""
    old = dict(older)
    bounds = [(le, count - old.get(le, 0.0)) for le, count in newer]
    if not bounds or bounds[-1][1] <= 0:
        return None
    rank = q * bounds[-1][1]
    lower, below = 0.0, 0.0
    for le, count in bounds:
        if count >= rank:
            if math.isinf(le):
                return lower  # beyond the last finite bucket: its bound, as Prometheus does
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


class TrafficHistory:
    """Recent snapshots of one registry, and the admin page's view of them."""

    def __init__(self, registry, clock, interval_s=10.0, window_s=300.0):
        self._registry = registry
        self._clock = clock
        self.interval_s = interval_s
        self.window_s = window_s
        self._snapshots = collections.deque(maxlen=int(window_s // interval_s) + 1)
        self._loop = None

    def start(self):
        self._loop = LoopingCall(self.sample)
        self._loop.clock = self._clock
        self._loop.start(self.interval_s, now=True).addErrback(
            lambda f: log.failure("traffic sampling stopped", f))

    def stop(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def sample(self):
        # One bad collection must not end the loop.
        try:
            self._snapshots.append(snapshot(self._registry, self._clock.seconds()))
        except Exception:
            log.failure("sampling the metrics registry for the admin page")

    def status(self, config):
        """What GET /admin/status answers for a GatewayConfig."""
        now = snapshot(self._registry, self._clock.seconds())
        older = [s for s in self._snapshots if now.at - s.at <= self.window_s + 1e-6]
        base = older[0] if older else None
        series = older + [now]
        services = []
        for name, service in config.services.items():
            services.append({
                "name": name,
                "auth": service.auth,
                "rate_limit": service.rate_limit,
                "targets": [{"url": t.url, "breaker": now.breakers.get((name, t.url), "closed")}
                            for t in service.targets],
                "traffic": _traffic(name, base, now, series),
            })
        return {
            "generated_at": isoformat(now.at),
            "window_s": round(now.at - base.at, 1) if base is not None else 0.0,
            "rate_period_s": config.settings.rate_period_s,
            "services": services,
        }


def _traffic(name, base, now, series):
    if base is None or now.at <= base.at:
        return {"requests_per_s": None, "errors_per_s": None, "error_ratio": None,
                "p99_ms": None, "history": []}
    span_s = now.at - base.at
    requests, errors = _delta(base.requests.get(name), now.requests.get(name))
    p99_s = quantile(0.99, base.buckets.get(name, ()), now.buckets.get(name, ()))
    history = []
    for a, b in zip(series, series[1:]):
        if b.at > a.at:
            count, _ = _delta(a.requests.get(name), b.requests.get(name))
            history.append(round(count / (b.at - a.at), 3))
    return {
        "requests_per_s": round(requests / span_s, 3),
        "errors_per_s": round(errors / span_s, 3),
        "error_ratio": round(errors / requests, 4) if requests else None,
        "p99_ms": round(p99_s * 1000, 1) if p99_s is not None else None,
        "history": history,
    }


def _delta(older, newer):
    older = older or (0.0, 0.0)
    newer = newer or (0.0, 0.0)
    # A counter that went back (a worker's files were reset) counts from zero.
    return tuple(n - o if n >= o else n for o, n in zip(older, newer))
