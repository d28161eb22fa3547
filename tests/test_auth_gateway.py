"""API keys through a whole GatewayService on loopback: the admin API issues
keys, the request path checks them (SPEC sections 3, 4, 7)."""

import json

import pytest_twisted
from twisted.internet.task import deferLater
from twisted.internet import reactor

from apigw.config import Environment
from tests.helpers import http, start_gateway
from tests.upstreams import TestUpstream

MASTER = "supersecret"


def yaml_for(url, extra=""):
    return (
        "services:\n"
        f"  service1:\n    url: \"{url}\"\n    rate_limit: 100\n"
        f"  service2:\n    url: \"{url}\"\n    rate_limit: 50\n"
        f"  open:\n    url: \"{url}\"\n    auth: false\n"
        f"settings:\n  rate_period: 60\n{extra}"
    )


def env_for(tmp_path, master_key=MASTER, database_url=None):
    return Environment(
        database_url=database_url or f"sqlite:///{tmp_path}/gw.db", master_key=master_key
    )


async def generate_key(base, body=None, master_key=MASTER):
    reply = await http(
        "POST", base + "/admin/generate_key",
        headers={b"X-Master-Key": master_key.encode(), b"Content-Type": b"application/json"},
        body=json.dumps(body or {"owner": "test-client"}).encode(),
    )
    assert reply.code == 201, reply.body
    return reply.json()


def sample(gateway, name, **labels):
    return gateway.metrics.registry.get_sample_value(name, labels) or 0


def failures(gateway, reason):
    return sample(gateway, "gateway_auth_failures_total", reason=reason)


class Gateway:
    """start_gateway plus a loopback upstream, stopped together."""

    def __init__(self, tmp_path, **kwargs):
        self.tmp_path = tmp_path
        self.kwargs = kwargs

    async def __aenter__(self):
        self.upstream = TestUpstream().start()
        env = self.kwargs.pop("env", None) or env_for(self.tmp_path)
        self.service, self.base = await start_gateway(
            yaml_for(self.upstream.url), env=env, **self.kwargs)
        return self

    async def __aexit__(self, *exc):
        await self.service.stopService()
        await self.upstream.stop()


@pytest_twisted.ensureDeferred
async def test_valid_key_reaches_upstream_as_the_consumer(tmp_path):
    """When a generated key is sent, the upstream sees X-Consumer-* and never the key, and the access log names the owner."""
    access_log = tmp_path / "access.log"
    async with Gateway(tmp_path, access_log=str(access_log)) as gw:
        created = await generate_key(gw.base)
        reply = await http("GET", gw.base + "/service1/hello",
                           headers={b"X-API-Key": created["api_key"].encode()})
        assert reply.code == 200
        seen = gw.upstream.requests[-1]["headers"]
        assert seen["x-consumer-id"] == [created["id"]]
        assert seen["x-consumer-username"] == ["test-client"]
        assert "x-api-key" not in seen
    records = [json.loads(line) for line in access_log.read_text().splitlines()]
    proxied = [r for r in records if r["service"] == "service1"]
    assert proxied[-1]["consumer"] == "test-client"
    assert created["api_key"] not in access_log.read_text()


@pytest_twisted.ensureDeferred
async def test_forged_consumer_headers_are_replaced(tmp_path):
    """When a client sends its own X-Consumer-ID, the upstream sees the key's id instead."""
    async with Gateway(tmp_path) as gw:
        created = await generate_key(gw.base)
        await http("GET", gw.base + "/service1/", headers={
            b"X-API-Key": created["api_key"].encode(), b"X-Consumer-ID": b"admin",
            b"X-Consumer-Username": b"root"})
        seen = gw.upstream.requests[-1]["headers"]
        assert seen["x-consumer-id"] == [created["id"]]
        assert seen["x-consumer-username"] == ["test-client"]


@pytest_twisted.ensureDeferred
async def test_refusals_are_401_json_and_counted_by_reason(tmp_path):
    """When the key is missing, unknown, revoked or expired, the answer is 401 JSON, the upstream is not called, and each reason is counted."""
    async with Gateway(tmp_path) as gw:
        revoked = await generate_key(gw.base, {"owner": "gone"})
        delete = await http("DELETE", gw.base + f"/admin/keys/{revoked['id']}",
                            headers={b"X-Master-Key": MASTER.encode()})
        assert delete.code == 200
        expiring = await generate_key(gw.base, {"owner": "brief", "expires_in": 0.2})
        await deferLater(reactor, 0.3, lambda: None)
        cases = [
            (None, "missing"),
            (b"agw_" + b"x" * 43, "invalid"),
            (b"supersecret", "invalid"),
            (revoked["api_key"].encode(), "revoked"),
            (expiring["api_key"].encode(), "expired"),
        ]
        for key, reason in cases:
            headers = {b"X-API-Key": key} if key is not None else {}
            reply = await http("GET", gw.base + "/service1/x", headers=headers)
            assert reply.code == 401, reason
            assert reply.header(b"content-type") == "application/json"
            assert set(reply.json()) == {"error", "request_id"}
            assert reply.header(b"www-authenticate")
        assert gw.upstream.requests == []
        for reason, count in [("missing", 1), ("invalid", 2), ("revoked", 1), ("expired", 1)]:
            assert failures(gw.service, reason) == count, reason


@pytest_twisted.ensureDeferred
async def test_key_for_another_service_is_403(tmp_path):
    """When a key limited to service1 is used on service2, the answer is 403 and counted as forbidden."""
    async with Gateway(tmp_path) as gw:
        created = await generate_key(gw.base, {"owner": "narrow", "services": ["service1"]})
        key = {b"X-API-Key": created["api_key"].encode()}
        assert (await http("GET", gw.base + "/service1/x", headers=key)).code == 200
        reply = await http("GET", gw.base + "/service2/x", headers=key)
        assert reply.code == 403 and "service2" in reply.json()["error"]
        assert failures(gw.service, "forbidden") == 1


@pytest_twisted.ensureDeferred
async def test_public_service_needs_no_key(tmp_path):
    """When a service has auth: false, requests pass without a key and without consumer headers."""
    async with Gateway(tmp_path) as gw:
        assert (await http("GET", gw.base + "/open/x")).code == 200
        assert "x-consumer-id" not in gw.upstream.requests[-1]["headers"]


@pytest_twisted.ensureDeferred
async def test_database_down_is_503_not_401(tmp_path):
    """When the key database cannot be opened, keyed requests get 503 (counted unavailable) and /readyz names the database."""
    env = env_for(tmp_path, database_url=f"sqlite:///{tmp_path}/no/such/dir/gw.db")
    async with Gateway(tmp_path, env=env) as gw:
        reply = await http("GET", gw.base + "/service1/x",
                           headers={b"X-API-Key": b"agw_" + b"k" * 43})
        assert reply.code == 503 and "key store" in reply.json()["error"]
        assert failures(gw.service, "unavailable") == 1
        assert (await http("GET", gw.base + "/service1/x")).code == 401  # no key: no lookup
        ready = await http("GET", gw.base + "/readyz")
        assert ready.code == 503 and "database" in ready.json()["down"]
        assert (await http("GET", gw.base + "/open/x")).code == 200


@pytest_twisted.ensureDeferred
async def test_admin_calls_are_counted_as_service_admin(tmp_path):
    """When the admin API is called, gateway_requests_total counts it under service "admin"."""
    async with Gateway(tmp_path) as gw:
        await generate_key(gw.base)
        refused = await http("GET", gw.base + "/admin/keys", headers={b"X-Master-Key": b"no"})
        assert refused.code == 403
        assert sample(gw.service, "gateway_requests_total",
                      service="admin", method="POST", status="201") == 1
        assert sample(gw.service, "gateway_requests_total",
                      service="admin", method="GET", status="403") == 1


@pytest_twisted.ensureDeferred
async def test_admin_port_moves_the_admin_api(tmp_path):
    """When an admin port is given, /admin answers only there (paths keep /admin); the public port says 404."""
    async with Gateway(tmp_path, admin_port="tcp:0:interface=127.0.0.1") as gw:
        admin_port = await gw.service.when_admin_listening()
        admin_base = f"http://127.0.0.1:{admin_port.getHost().port}"
        public = await http("POST", gw.base + "/admin/generate_key",
                            headers={b"X-Master-Key": MASTER.encode()},
                            body=b'{"owner": "x"}')
        assert public.code == 404
        created = await generate_key(admin_base)
        key = {b"X-API-Key": created["api_key"].encode()}
        assert (await http("GET", gw.base + "/service1/x", headers=key)).code == 200


@pytest_twisted.ensureDeferred
async def test_admin_without_master_key_refuses(tmp_path):
    """When MASTER_KEY is unset, the gateway's admin API answers 403 even to the would-be key."""
    async with Gateway(tmp_path, env=env_for(tmp_path, master_key=None)) as gw:
        reply = await http("POST", gw.base + "/admin/generate_key",
                           headers={b"X-Master-Key": MASTER.encode()}, body=b'{"owner":"x"}')
        assert reply.code == 403 and "MASTER_KEY" in reply.json()["error"]


@pytest_twisted.ensureDeferred
async def test_admin_reload_rereads_the_config(tmp_path):
    """When /admin/reload is posted after the file gained a service, the answer lists it and it routes."""
    upstream = TestUpstream().start()
    path = tmp_path / "gw.yaml"
    path.write_text(yaml_for(upstream.url))
    from apigw.config import parse_config
    from apigw.service import GatewayService

    config = parse_config(path.read_text(), str(path), env_for(tmp_path))
    service = GatewayService(config, port="tcp:0:interface=127.0.0.1")
    service.startService()
    base = f"http://127.0.0.1:{(await service.when_listening()).getHost().port}"
    try:
        path.write_text(yaml_for(upstream.url) + "\n".join([
            "", "services_extra: 1"]))  # invalid: unknown top-level field
        bad = await http("POST", base + "/admin/reload", headers={b"X-Master-Key": MASTER.encode()})
        assert bad.code == 400 and "services_extra" in bad.json()["error"]
        path.write_text(yaml_for(upstream.url).replace(
            "settings:", f"  extra:\n    url: \"{upstream.url}\"\n    auth: false\nsettings:"))
        good = await http("POST", base + "/admin/reload", headers={b"X-Master-Key": MASTER.encode()})
        assert good.code == 200 and "extra" in good.json()["services"]
        assert (await http("GET", base + "/extra/x")).code == 200
    finally:
        await service.stopService()
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_keys_survive_a_gateway_restart(tmp_path):
    """When the gateway is stopped and started on the same database, issued keys still work."""
    async with Gateway(tmp_path) as gw:
        created = await generate_key(gw.base)
    async with Gateway(tmp_path) as gw:
        reply = await http("GET", gw.base + "/service1/x",
                           headers={b"X-API-Key": created["api_key"].encode()})
        assert reply.code == 200
