"""The admin page's traffic figures, from a real metrics registry on a Clock."""

import math

from twisted.internet.task import Clock

from apigw.config import Environment, parse_config
from apigw.metrics import Metrics
from apigw.traffic import TrafficHistory, quantile

CONFIG = parse_config(
    "services:\n  a:\n    urls: [\"http://u1\", \"http://u2\"]\n  b:\n    url: http://u3\n",
    "t.yaml", Environment())


def test_quantile_interpolates_like_histogram_quantile():
    """When 100 observations fall evenly in (0.1, 0.2], the p99 is 0.199 and the p50 0.15."""
    newer = ((0.1, 0.0), (0.2, 100.0), (math.inf, 100.0))
    assert abs(quantile(0.99, (), newer) - 0.199) < 1e-9
    assert abs(quantile(0.5, (), newer) - 0.15) < 1e-9
    # Only what happened between the snapshots counts.
    assert quantile(0.99, newer, newer) is None
    # Beyond the last finite bucket: that bucket's bound, as Prometheus answers.
    assert quantile(0.99, (), ((1.0, 0.0), (math.inf, 5.0))) == 1.0


def test_rates_errors_p99_and_breakers_over_the_window():
    """When requests are counted between samples, status() gives their rate, 5xx share, p99 and breaker states."""
    clock = Clock()
    metrics = Metrics()
    history = TrafficHistory(metrics.registry, clock, interval_s=10, window_s=60)
    history.start()
    assert history.status(CONFIG)["services"][0]["traffic"]["requests_per_s"] is None
    for _ in range(18):
        metrics.observe_request("a", b"GET", 200, 0.004)
    metrics.observe_request("a", b"GET", 503, 0.5)
    metrics.observe_request("a", b"POST", 502, 0.02)
    metrics.breaker_state.labels("a", "http://u2").set(1)
    clock.advance(10)
    status = history.status(CONFIG)
    assert status["window_s"] == 10 and status["rate_period_s"] == 60
    a, b = status["services"]
    assert a["traffic"]["requests_per_s"] == 2.0
    assert a["traffic"]["errors_per_s"] == 0.2 and a["traffic"]["error_ratio"] == 0.1
    assert 25 < a["traffic"]["p99_ms"] <= 500
    assert a["traffic"]["history"] == [2.0]
    assert [t["breaker"] for t in a["targets"]] == ["closed", "open"]
    assert b["traffic"]["requests_per_s"] == 0 and b["traffic"]["error_ratio"] is None
    # Samples older than the window no longer count.
    for _ in range(7):
        clock.advance(10)
    assert history.status(CONFIG)["services"][0]["traffic"]["requests_per_s"] == 0
    history.stop()
