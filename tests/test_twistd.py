"""`twistd -n apigw` as a user runs it: real process, real sockets."""

import json
import os
import signal

import pytest_twisted
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer
from twisted.internet.interfaces import IPullProducer

from tests.helpers import assert_no_secrets, free_port, http, run_twistd, wait_for_port
from tests.upstreams import TestUpstream

CHUNK = b"z" * 65536


@implementer(IPullProducer)
class _Stream:
    def __init__(self, request, total):
        self.request = request
        self.left = total

    def resumeProducing(self):
        if self.left <= 0:
            self.request.unregisterProducer()
            self.request.finish()
            return
        n = min(self.left, len(CHUNK))
        self.left -= n
        self.request.write(CHUNK[:n])

    def stopProducing(self):
        self.left = 0


class _Big(Resource):
    isLeaf = True

    def __init__(self, total):
        super().__init__()
        self.total = total

    def render_GET(self, request):
        request.setHeader(b"content-length", b"%d" % self.total)
        request.registerProducer(_Stream(request, self.total), False)
        return NOT_DONE_YET


def _peak_rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


class _Gateway:
    def __init__(self, tmp_path, yaml_text, extra_args=(), env=None):
        self.port = free_port()
        config = tmp_path / "gw.yaml"
        config.write_text(yaml_text)
        self.access_log = tmp_path / "access.log"
        self.proc = run_twistd(
            ["--config", str(config), "--port", f"tcp:{self.port}:interface=127.0.0.1",
             "--access-log", str(self.access_log), *extra_args],
            cwd=str(tmp_path), env=env,
        )
        self.base = f"http://127.0.0.1:{self.port}"

    def wait(self):
        wait_for_port(self.port, proc=self.proc)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        out, err = self.proc.communicate()
        return self.proc.returncode, out, err


@pytest_twisted.ensureDeferred
async def test_seed_like_config_serves_proxies_logs_and_stops_cleanly(tmp_path):
    """When twistd runs apigw, keyed services refuse without a key, public ones proxy, each request is one JSON line, and SIGTERM exits 0."""
    upstream = TestUpstream().start()
    gw = _Gateway(tmp_path, (
        "services:\n"
        f"  service1:\n    url: \"{upstream.url}\"\n    rate_limit: 100\n"
        f"  open:\n    url: \"{upstream.url}\"\n    auth: false\n"
        "settings:\n  rate_period: 60\n"
    ))
    try:
        await _in_thread(gw.wait)
        refused = await http("GET", gw.base + "/service1/test")
        assert refused.code == 401
        ok = await http("GET", gw.base + "/open/test?x=1", headers={b"X-Request-ID": b"req-1"})
        assert ok.code == 200
        assert upstream.requests[-1]["uri"] == "/test?x=1"
        assert (await http("GET", gw.base + "/healthz")).code == 200
        metrics = await http("GET", gw.base + "/metrics")
        assert b'gateway_requests_total{method="GET",service="open",status="200"} 1.0' in metrics.body
        assert b'gateway_requests_total{method="GET",service="service1",status="401"} 1.0' in metrics.body
        assert len(upstream.requests) == 1
    finally:
        code, out, err = await _in_thread(gw.stop)
        await upstream.stop()
    assert code == 0, err
    assert_no_secrets(out + err + gw.access_log.read_bytes(), "twistd output and access log")
    records = [json.loads(line) for line in gw.access_log.read_text().splitlines()]
    assert [r["status"] for r in records] == [401, 200]
    assert set(records[1]) == {
        "request_id", "method", "path", "service", "status", "latency_ms",
        "upstream_latency_ms", "attempts", "client_ip", "consumer", "bytes_sent", "bytes_received",
        "duration_ms", "error",
    }
    assert records[1]["error"] is None
    assert records[1]["request_id"] == "req-1"
    assert records[1]["path"] == "/open/test?x=1"
    assert records[1]["service"] == "open" and records[1]["attempts"] == 1
    assert records[1]["client_ip"] == "127.0.0.1"
    assert records[1]["bytes_sent"] == len(ok.body) > 0


@pytest_twisted.ensureDeferred
async def test_200mb_download_streams_without_buffering(tmp_path):
    """When a 200 MB response passes, the gateway's peak RSS grows by less than 50 MB."""
    total = 200 * 1024 * 1024
    upstream_port = reactor.listenTCP(0, Site(_Big(total)), interface="127.0.0.1")
    url = f"http://127.0.0.1:{upstream_port.getHost().port}"
    gw = _Gateway(tmp_path, f"services:\n  big:\n    url: \"{url}\"\n    auth: false\n")
    try:
        await _in_thread(gw.wait)
        warm = await http("GET", gw.base + "/healthz")
        assert warm.code == 200
        before_kb = _peak_rss_kb(gw.proc.pid)
        received = await _download(gw.base + "/big/file")
        after_kb = _peak_rss_kb(gw.proc.pid)
    finally:
        await _in_thread(gw.stop)
        await upstream_port.stopListening()
    assert received == total
    assert after_kb - before_kb < 50 * 1024, (before_kb, after_kb)


async def _download(url):
    """Read a body, counting bytes without keeping them."""
    from twisted.internet.defer import Deferred
    from twisted.internet.protocol import Protocol
    from twisted.web.client import Agent, HTTPConnectionPool

    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    response = await agent.request(b"GET", url.encode())
    done = Deferred()

    class Count(Protocol):
        n = 0

        def dataReceived(self, data):
            self.n += len(data)

        def connectionLost(self, reason):
            done.callback(self.n)

    response.deliverBody(Count())
    return await done


def _in_thread(f):
    from twisted.internet.threads import deferToThread

    return deferToThread(f)


class _Slow(Resource):
    isLeaf = True

    def render_GET(self, request):
        def answer():
            # Not kept alive: the gateway's pool then has nothing to close
            # at shutdown, the case where nothing else gave the reactor a
            # turn to flush the client's response.
            request.setHeader(b"connection", b"close")
            request.setHeader(b"content-length", b"2")
            request.write(b"ok")
            request.finish()

        reactor.callLater(1.0, answer)
        return NOT_DONE_YET


def _slow_gateway(tmp_path):
    """A _Slow upstream, and a gateway (starting) with one service on it."""
    upstream_port = reactor.listenTCP(0, Site(_Slow()), interface="127.0.0.1")
    url = f"http://127.0.0.1:{upstream_port.getHost().port}"
    return upstream_port, _Gateway(
        tmp_path, f"services:\n  slow:\n    url: \"{url}\"\n    auth: false\n")


@pytest_twisted.ensureDeferred
async def test_sigterm_lets_in_flight_responses_reach_the_clients(tmp_path):
    """When SIGTERM arrives while requests wait on their upstream, each client still gets its response and twistd exits 0."""
    from twisted.internet.defer import ensureDeferred, gatherResults
    from twisted.internet.task import deferLater
    from twisted.web.client import HTTPConnectionPool

    upstream_port, gw = _slow_gateway(tmp_path)
    try:
        await _in_thread(gw.wait)
        # Keep-alive clients, as most are: nothing asks for a close.
        pool = HTTPConnectionPool(reactor, persistent=True)
        in_flight = [ensureDeferred(http("GET", gw.base + "/slow/x", pool=pool)) for _ in range(3)]
        await deferLater(reactor, 0.4, lambda: None)
        gw.proc.send_signal(signal.SIGTERM)
        replies = await gatherResults(in_flight)
        assert [(r.code, r.body) for r in replies] == [(200, b"ok")] * 3
        # It exits by itself once drained (a second SIGTERM after the
        # reactor restored default handlers would just kill it).
        code = await _in_thread(lambda: gw.proc.wait(timeout=15))
    finally:
        _, _, err = await _in_thread(gw.stop)
        await upstream_port.stopListening()
        await pool.closeCachedConnections()
    assert code == 0, err


@pytest_twisted.ensureDeferred
async def test_a_second_sigterm_while_draining_changes_nothing(tmp_path):
    """When SIGTERM comes twice while a request drains (a process-group kill and systemd's own), the request still gets its answer, nothing logs a traceback, and twistd exits 0."""
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import deferLater

    upstream_port, gw = _slow_gateway(tmp_path)
    try:
        await _in_thread(gw.wait)
        in_flight = ensureDeferred(http("GET", gw.base + "/slow/x"))
        await deferLater(reactor, 0.4, lambda: None)
        gw.proc.send_signal(signal.SIGTERM)
        await deferLater(reactor, 0.1, lambda: None)
        gw.proc.send_signal(signal.SIGTERM)
        reply = await in_flight
        assert (reply.code, reply.body) == (200, b"ok")
        code = await _in_thread(lambda: gw.proc.wait(timeout=15))
    finally:
        _, out, err = await _in_thread(gw.stop)
        await upstream_port.stopListening()
    assert code == 0, err
    output = (out + err).decode()
    assert "Traceback" not in output and "ReactorNotRunning" not in output
