"""contrib/grafana/apigw-dashboard.json against a real Prometheus.

A gateway runs in this process under traffic that touches every metric
family (errors, retries, 429s, auth failures, open breakers, a reload); a
Prometheus server (Debian's binary, started here on a private loopback
port with its own config and data directory, stopped by PID) scrapes it
every second. Every query of every panel is then evaluated through
Prometheus's HTTP API: it must parse and return data.
"""

import json
import os
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from apigw.config import Environment, parse_config
from apigw.service import GatewayService
from tests.helpers import REPO, free_port, http, raw_exchange
from tests.upstreams import RawUpstream, TestUpstream

pytestmark = pytest.mark.slow

DASHBOARD = Path(REPO) / "contrib" / "grafana" / "apigw-dashboard.json"
# What Grafana substitutes at query time, with values for a 1 s scrape.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__interval": "5s", "$__range": "5m",
                     "$service": ".*"}
# Contract metrics the gateway does not export yet: their panels must
# parse, and return data once the gateway exports them (then drop them here).
NOT_EXPORTED_YET = set()


def _prometheus_binary():
    found = shutil.which("prometheus")
    if found is None and os.access(Path(REPO) / ".venv" / "bin" / "prometheus", os.X_OK):
        found = str(Path(REPO) / ".venv" / "bin" / "prometheus")
    return found


def sleep(seconds):
    return deferLater(reactor, seconds, lambda: None)


def panel_queries():
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            # Longest names first: $__range is not a prefix of $__rate_interval, but be safe.
            for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
                expr = expr.replace(name, GRAFANA_VARIABLES[name])
            yield f"{panel['title']} / {target['refId']}", expr


def test_dashboard_is_importable_json():
    """When the dashboard is read, every panel queries the Prometheus input chosen at import."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    queries = list(panel_queries())
    assert len(queries) >= 14
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    text = DASHBOARD.read_text()
    for name in ["gateway_requests_total", "gateway_request_latency_seconds_bucket",
                 "gateway_upstream_latency_seconds_bucket", "gateway_upstream_retries_total",
                 "gateway_rate_limited_total", "gateway_auth_failures_total",
                 "gateway_circuit_breaker_state", "gateway_in_flight_requests",
                 "gateway_config_reloads_total", "gateway_websocket_connections"]:
        assert name in text, name


def _config_text(upstream, dead, ws=None):
    return (
        "services:\n"
        + (f"  live:\n    url: \"{ws}\"\n    auth: false\n    retries: 0\n" if ws else "")
        + 
        f"  shop:\n    url: \"{upstream}\"\n    auth: false\n    retries: 0\n"
        f"  flaky:\n    urls: [\"{upstream}\", \"{dead}\"]\n    auth: false\n    retries: 2\n"
        f"  down:\n    url: \"{dead}\"\n    auth: false\n    retries: 0\n"
        f"  limited:\n    url: \"{upstream}\"\n    auth: false\n    rate_limit: 2\n"
        f"  keyed:\n    url: \"{upstream}\"\n"
        "settings:\n  breaker_failure_threshold: 1\n  breaker_min_requests: 1\n"
        "  backoff_base: 0.01\n  backoff_max: 0.02\n"
    )


async def _traffic(base):
    # A WebSocket handshake the upstream accepts and then ends: a tunnel
    # opens and closes, so the tunnels gauge has its series.
    await raw_exchange(int(base.rsplit(":", 1)[1]), (
        b"GET /live/ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"),
        timeout_s=3)
    for path in ["/shop/a", "/shop/b", "/flaky/a", "/flaky/b", "/down/x", "/limited/x",
                 "/limited/y", "/limited/z", "/keyed/x"]:
        await http("GET", base + path)
    await http("GET", base + "/keyed/x", headers={"X-API-Key": "agw_" + "x" * 43})


async def _query(prometheus, expr):
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    reply = await http("GET", url)
    return reply.code, json.loads(reply.body)


async def _empty_panels(prometheus):
    empty = []
    for title, expr in panel_queries():
        code, body = await _query(prometheus, expr)
        if code != 200 or not body["data"]["result"]:
            if not any(name in expr for name in NOT_EXPORTED_YET):
                empty.append((title, expr))
    return empty


@pytest.mark.skipif(_prometheus_binary() is None,
                    reason="prometheus is not installed (make test unpacks it into .venv/bin)")
@pytest_twisted.ensureDeferred
async def test_every_panel_query_parses_and_returns_data(tmp_path):
    """When Prometheus has scraped a gateway under traffic, every panel's query parses and returns data."""
    upstream = TestUpstream().start()
    ws = RawUpstream("ws101").start()
    dead = f"http://127.0.0.1:{free_port()}"
    config_path = tmp_path / "gateway_config.yaml"
    config_path.write_text(_config_text(upstream.url, dead, ws.url))
    config = parse_config(config_path.read_text(), str(config_path),
                          Environment(database_url=f"sqlite:///{tmp_path}/keys.db"))
    service = GatewayService(config, port="tcp:0:interface=127.0.0.1")
    service.startService()
    gateway_port = (await service.when_listening()).getHost().port
    base = f"http://127.0.0.1:{gateway_port}"

    prometheus_port = free_port()
    prometheus = f"http://127.0.0.1:{prometheus_port}"
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: apigw\n    static_configs:\n"
        f"      - targets: [\"127.0.0.1:{gateway_port}\"]\n")
    log = open(tmp_path / "prometheus.log", "wb")
    process = subprocess.Popen(
        [_prometheus_binary(), f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prometheus_port}", "--log.level=warn"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        service.reload()  # the config file is unchanged: one "ok" reload
        for _ in range(300):
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                if (await http("GET", prometheus + "/-/ready")).code == 200:
                    break
            except Exception:
                pass
            await sleep(0.1)
        # Traffic across scrapes until every rate() has two points to work
        # with (or 60 s have passed and the assertion below says which not).
        for _ in range(120):
            await _traffic(base)
            await sleep(0.5)
            if not await _empty_panels(prometheus):
                break

        exported = (await http("GET", base + "/metrics")).body.decode()
        for name in NOT_EXPORTED_YET:
            assert f"# TYPE {name} " not in exported, \
                f"{name} is exported now: remove it from NOT_EXPORTED_YET"
        for title, expr in panel_queries():
            code, body = await _query(prometheus, expr)
            assert code == 200 and body["status"] == "success", (title, expr, body)
        assert await _empty_panels(prometheus) == []
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        await service.stopService()
        await upstream.stop()
        await ws.stop()
