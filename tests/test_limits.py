"""Edge limits as settings: the connection cap and the open-files limit,
who may read /metrics and /readyz details, and limits that follow a reload."""

import resource

import pytest_twisted

from apigw.fdlimit import RESERVE, connection_cap, raise_open_files_limit
from tests.helpers import http, raw_exchange, start_gateway
from tests.upstreams import TestUpstream


def test_connection_cap_stays_under_the_open_files_limit():
    """When no cap is set it is what the open-files limit allows; a larger one is lowered to that."""
    allowed = (1024 - RESERVE) // 2
    assert connection_cap(None, 1024) == allowed
    assert connection_cap(100, 1024) == 100
    assert connection_cap(10_000, 1024) == allowed


def test_open_files_soft_limit_is_raised_to_the_hard_one():
    """When the soft limit is below the hard one, startup raises it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, 512) if hard == resource.RLIM_INFINITY else min(soft, hard, 512)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        raised = raise_open_files_limit()
        assert raised > lowered or hard == lowered
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == raised
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest_twisted.ensureDeferred
async def test_metrics_and_readyz_details_only_for_trusted_addresses(tmp_path):
    """When the client is outside metrics_allow, /metrics is 403 and /readyz gives its status without naming parts; inside, both say all."""
    service, base = await start_gateway(
        "services:\n  s:\n    url: http://127.0.0.1:9\n"
        "settings:\n  metrics_allow: [\"10.0.0.0/8\"]\n  shutdown_grace: 0\n")
    try:
        assert (await http("GET", base + "/metrics")).code == 403
        service.shutting_down = True  # makes /readyz 503 with a reason
        reply = await http("GET", base + "/readyz")
        assert reply.code == 503 and reply.json() == {"status": "unavailable"}
    finally:
        await service.stopService()
    service, base = await start_gateway("services:\n  s:\n    url: http://127.0.0.1:9\n")
    try:
        assert b"gateway_requests_total" in (await http("GET", base + "/metrics")).body
        service.shutting_down = True
        assert "shutting down" in (await http("GET", base + "/readyz")).json()["down"]
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_metrics_are_served_on_the_admin_listener_too():
    """When --admin-port is used, Prometheus can scrape /metrics there."""
    service, base = await start_gateway("services:\n  s:\n    url: http://127.0.0.1:9\n",
                                        admin_port="tcp:0:interface=127.0.0.1")
    try:
        admin_port = (await service.when_admin_listening()).getHost().port
        reply = await http("GET", f"http://127.0.0.1:{admin_port}/metrics")
        assert reply.code == 200 and b"gateway_build_info" in reply.body
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_request_head_limits_come_from_the_settings():
    """When client_max_line_bytes is lowered, a longer request line gets 414."""
    upstream = TestUpstream().start()
    service, base = await start_gateway(
        f"services:\n  pub:\n    url: {upstream.url}\n    auth: false\n"
        "settings:\n  client_max_line_bytes: 300\n")
    try:
        port = int(base.rsplit(":", 1)[1])
        data = await raw_exchange(port, b"GET /pub/" + b"a" * 400 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 414")
        assert (await http("GET", base + "/pub/" + "a" * 200)).code == 200
    finally:
        await service.stopService()
        await upstream.stop()


def test_reload_applies_edge_limits(tmp_path):
    """When the config is reloaded with new edge limits, the site, the pipeline and the upstream pool take them."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import MemoryReactorClock

    from apigw.config import load_config
    from apigw.service import GatewayService

    path = tmp_path / "gw.yaml"
    path.write_text("services:\n  s:\n    url: http://127.0.0.1:9\n")
    config = load_config(str(path), environ={"DATABASE_URL": f"sqlite:///{tmp_path}/k.db"})
    service = GatewayService(config, port="tcp:0", reactor=MemoryReactorClock(), clock=Clock())
    path.write_text("services:\n  s:\n    url: http://127.0.0.1:9\nsettings:\n"
                    "  client_header_timeout: 3\n  keepalive_timeout: 7\n"
                    "  client_send_timeout: 9\n  max_connections: 50\n"
                    "  upstream_max_head_bytes: 4096\n  upstream_max_idle_per_target: 3\n")
    service.reload()
    assert (service.site.header_timeout_s, service.site.idle_timeout_s) == (3, 7)
    assert service.site.connections.limit == 50
    assert service.pipeline.send_timeout_s == 9
    pool = service.forwarder.client
    assert (pool.max_head_bytes, pool.max_idle_per_target) == (4096, 3)
