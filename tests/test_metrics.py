"""/metrics as scraped from `twistd apigw`, one process and `--workers 2` alike."""

import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from twisted.internet import task
from twisted.internet.threads import deferToThread

import apigw
from apigw.metrics import FLUSH_INTERVAL_S, LATENCY_BUCKETS_S, Metrics, add_observations
from tests.helpers import TWISTD, free_port, wait_for_port
from tests.upstreams import TestUpstream

pytestmark = pytest.mark.slow

TIMEOUT_S = 30
_PUB_OK = 'gateway_requests_total{method="GET",service="pub",status="200"}'
SERVING = re.compile(r"worker \d+ serving")


def test_build_info_is_one_with_the_version():
    """When metrics are rendered, gateway_build_info carries the apigw version with value 1."""
    text = Metrics().render().decode()
    assert f'gateway_build_info{{version="{apigw.__version__}"}} 1.0' in text.splitlines()


class _Gateway:
    def __init__(self, directory, yaml_text, workers):
        directory.mkdir()
        self.workers = workers
        self.logfile = directory / "twistd.log"
        config = directory / "gw.yaml"
        config.write_text(yaml_text)
        self.port = free_port()
        env = {k: v for k, v in os.environ.items()
               if k not in ("DATABASE_URL", "REDIS_URL", "MASTER_KEY")}
        env["DATABASE_URL"] = f"sqlite:///{directory}/apigw.db"
        self.proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "--logfile", str(self.logfile), "apigw",
             "--config", str(config), "--port", f"tcp:{self.port}:interface=127.0.0.1",
             "--workers", str(workers)],
            cwd=str(directory), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    def log(self):
        return self.logfile.read_text() if self.logfile.exists() else ""

    def _wait_for_log(self, pattern, count):
        deadline = time.monotonic() + TIMEOUT_S
        while len(re.findall(pattern, self.log())) < count:
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)

    def get(self, path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def traffic_reload_scrape(self):
        """Blocking: the same requests, one SIGHUP, then /metrics."""
        wait_for_port(self.port, proc=self.proc)
        if self.workers > 1:
            self._wait_for_log(SERVING, self.workers)
        assert self.get("/pub/x")[0] == 200
        assert self.get("/nope/x")[0] == 404
        assert self.get("/keyed/x")[0] == 401
        self.proc.send_signal(signal.SIGHUP)
        # Every process that serves re-reads the file, and says so.
        self._wait_for_log(r"config reloaded", self.workers)
        # A worker's counts reach the others' scrapes within FLUSH_INTERVAL_S.
        deadline = time.monotonic() + FLUSH_INTERVAL_S + 5
        while True:
            text = self.get("/metrics")[1]
            if _value(text, _PUB_OK) == 1.0 or time.monotonic() > deadline:
                return text
            time.sleep(0.1)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()
        return self.proc.returncode


def _families(text):
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def _value(text, sample):
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return None


def _histogram():
    registry = CollectorRegistry()
    return registry, Histogram("h", "h", ["s"], buckets=LATENCY_BUCKETS_S,
                               registry=registry).labels("x")


latencies = st.lists(st.one_of(
    st.floats(min_value=-1.0, max_value=100.0, allow_nan=False),
    st.sampled_from(LATENCY_BUCKETS_S),  # on a bound: that bucket, not the next
    st.just(float("inf")),
), max_size=50)


@given(latencies)
def test_tallied_observations_expose_as_observe_would(values):
    """Latencies tallied by apigw and added in one go expose exactly the
    samples prometheus_client's own observe() gives for them."""
    observed_registry, observed = _histogram()
    added_registry, added = _histogram()
    for value in values:
        observed.observe(value)
    metrics = Metrics()
    for value in values:
        metrics.observe_upstream("x", value)
    tally = metrics._upstream_tallies.get("x")
    if tally is not None:
        add_observations(added, tally.buckets, tally.sum)
    assert _without_created(added_registry) == _without_created(observed_registry)


def _without_created(registry):
    return [line for line in generate_latest(registry).decode().splitlines()
            if "_created" not in line]


def _sample(metric, name, labels):
    for family in metric.collect():
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def test_a_scrape_sees_every_request_counted_before_it():
    """Requests counted since the last scrape are in the next one."""
    metrics = Metrics()
    for _ in range(3):
        metrics.observe_request("svc", b"GET", 200, 0.003)
    metrics.observe_request("svc", b"BREW", 418, 0.2)
    text = metrics.render().decode()
    assert 'gateway_requests_total{method="GET",service="svc",status="200"} 3.0' in text
    assert 'gateway_requests_total{method="OTHER",service="svc",status="418"} 1.0' in text
    assert 'gateway_request_latency_seconds_bucket{le="0.005",service="svc"} 3.0' in text
    assert 'gateway_request_latency_seconds_count{service="svc"} 4.0' in text
    metrics.observe_request("svc", b"GET", 200, 0.003)
    assert 'gateway_requests_total{method="GET",service="svc",status="200"} 4.0' \
        in metrics.render().decode()


def test_with_workers_counts_reach_the_shared_values_every_interval(tmp_path):
    """In a worker, requests and the in-flight count reach prometheus_client's
    values (there, the files other workers' scrapes read) within
    FLUSH_INTERVAL_S, and all of them when it stops."""
    clock = task.Clock()
    metrics = Metrics(multiprocess_dir=str(tmp_path))
    in_flight = [2]
    metrics.in_flight_from(lambda: in_flight[0])
    metrics.start(clock)
    labels = {"service": "svc", "method": "GET", "status": "200"}
    metrics.observe_request("svc", b"GET", 200, 0.01)
    assert not _sample(metrics.requests_total, "gateway_requests_total", labels)
    clock.advance(FLUSH_INTERVAL_S)
    assert _sample(metrics.requests_total, "gateway_requests_total", labels) == 1.0
    assert _sample(metrics.in_flight, "gateway_in_flight_requests", {}) == 2.0
    metrics.observe_request("svc", b"GET", 200, 0.01)
    in_flight[0] = 0
    metrics.stop()
    assert _sample(metrics.requests_total, "gateway_requests_total", labels) == 2.0
    assert _sample(metrics.in_flight, "gateway_in_flight_requests", {}) == 0.0
    assert not clock.getDelayedCalls()


def test_a_timed_flush_that_fails_neither_stops_the_timer_nor_counts_twice(
        monkeypatch, tmp_path):
    """When writing the tallies fails once, the error is logged, the next
    interval flushes again, what was written is not written twice, and
    stop() (even twice) leaves no timer."""
    from twisted.logger import globalLogPublisher

    import apigw.metrics as metrics_module

    clock = task.Clock()
    metrics = Metrics(multiprocess_dir=str(tmp_path))
    metrics.start(clock)
    labels = {"service": "svc", "method": "GET", "status": "200"}
    real = metrics_module.add_observations
    fail = [True]

    def flaky(*args):
        if fail.pop() if fail else False:
            raise OSError("disk full")
        real(*args)
    monkeypatch.setattr(metrics_module, "add_observations", flaky)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        metrics.observe_request("svc", b"GET", 200, 0.01)
        clock.advance(FLUSH_INTERVAL_S)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert any("disk full" in str(e.get("log_failure", "")) for e in events)
    metrics.observe_request("svc", b"GET", 200, 0.01)
    clock.advance(FLUSH_INTERVAL_S)
    assert _sample(metrics.requests_total, "gateway_requests_total", labels) == 2.0
    metrics.stop()
    metrics.stop()
    assert not clock.getDelayedCalls()


def test_past_the_tally_cap_every_request_is_still_counted(monkeypatch):
    """When clients invent more methods than tallies are kept for, the
    table is flushed and emptied, and every request is counted."""
    import apigw.metrics as metrics_module

    monkeypatch.setattr(metrics_module, "MAX_TALLIES", 3)
    metrics = Metrics()
    for n in range(10):
        metrics.observe_request("svc", b"M%d" % n, 200, 0.01)
    assert len(metrics._request_tallies) <= 3
    text = metrics.render().decode()
    assert 'gateway_requests_total{method="OTHER",service="svc",status="200"} 10.0' in text


@pytest_twisted.ensureDeferred
async def test_workers_show_the_same_families_and_count_a_reload_once(tmp_path):
    """When one process and --workers 2 get the same traffic and one SIGHUP, their /metrics have the same families, the reload counted 1 and build info 1."""
    upstream = TestUpstream().start()
    yaml_text = (f"services:\n  pub:\n    url: {upstream.url}\n    auth: false\n"
                 f"  keyed:\n    url: {upstream.url}\n")
    scraped = {}
    try:
        for workers in (1, 2):
            gateway = _Gateway(tmp_path / f"workers{workers}", yaml_text, workers)
            try:
                scraped[workers] = await deferToThread(gateway.traffic_reload_scrape)
            finally:
                assert await deferToThread(gateway.stop) == 0, gateway.log()
    finally:
        await upstream.stop()
    one, two = scraped[1], scraped[2]
    assert _families(one) == _families(two), (_families(one) ^ _families(two))
    for name in ("gateway_requests_total", "gateway_request_latency_seconds",
                 "gateway_upstream_latency_seconds", "gateway_upstream_retries_total",
                 "gateway_rate_limited_total", "gateway_auth_failures_total",
                 "gateway_circuit_breaker_state", "gateway_in_flight_requests",
                 "gateway_config_reloads_total", "gateway_build_info"):
        assert name in _families(two), name
    for text in (one, two):
        assert _value(text, 'gateway_config_reloads_total{result="ok"}') == 1.0
        assert _value(text, f'gateway_build_info{{version="{apigw.__version__}"}}') == 1.0
        assert _value(text, _PUB_OK) == 1.0
