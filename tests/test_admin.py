"""The admin API through its Klein resource, in memory (StubTreq), over a
real SQLite key store."""

import ipaddress
import json

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource

from apigw.addresses import allowed
from apigw.admin import AdminAPI
from apigw.config import ConfigError
from apigw.keys import Authenticator, KeyStore, KeyStoreUnavailable
from keys_support import T0, real_sleep

MASTER = "supersecret"
LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
SERVICES = ("service1", "service2")


class Client:
    """StubTreq plus the pumping a real (threaded) store needs."""

    def __init__(self, resource):
        self.stub = StubTreq(resource)

    async def call(self, method, path, body=None, key=MASTER, headers=None, raw=None):
        h = {"Content-Type": "application/json"}
        if key is not None:
            h["X-Master-Key"] = key
        h.update(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        d = self.stub.request(method, "http://localhost:8000" + path, headers=h, data=data)
        response = await self._settle(d)
        content = await self._settle(self.stub.content(response))
        return response, json.loads(content)

    async def _settle(self, d):
        # d.called is true while d still waits on an inner Deferred.
        done = []

        def note(result):
            done.append(True)
            return result

        d.addBoth(note)
        for _ in range(1000):  # the store answers from its thread pool
            self.stub.flush()
            if done:
                break
            await real_sleep(0.002)
        assert done, "no answer within about 2 seconds"
        return await d


@pytest.fixture
def clock():
    c = Clock()
    c.advance(T0)
    return c


@pytest_twisted.async_yield_fixture
async def store(tmp_path, clock):
    s = KeyStore(f"sqlite:///{tmp_path}/admin.db", reactor, clock=clock)
    await s.start()
    yield s
    await s.stop()


def make_api(store, clock, master_key=MASTER, admin_allow=LOOPBACK, reload=None):
    auth = Authenticator(store, clock, cache_ttl_s=10)
    api = AdminAPI(store, auth, master_key, admin_allow, lambda: SERVICES,
                   reload=reload, clock=clock)
    return api, auth


def mounted(api):
    """As on the public listener: the Klein app is the child `admin` of the root."""
    root = Resource()
    root.putChild(b"admin", api.resource())
    return root


@pytest.fixture
def api(store, clock):
    return make_api(store, clock)[0]


@pytest.fixture
def client(api):
    return Client(mounted(api))


# --- the seed flow and the happy paths ----------------------------------------

@pytest_twisted.ensureDeferred
async def test_seed_generate_key(client, store):
    """When the seed's curl body is posted, a 201 shows a working key once."""
    response, body = await client.call("POST", "/admin/generate_key", {"owner": "test-client"})
    assert response.code == 201
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert response.headers.getRawHeaders("cache-control") == ["no-store"]
    assert body["owner"] == "test-client" and body["services"] is None
    assert body["expires_at"] is None and body["rate_limit"] is None
    assert body["created_at"] == "2023-11-14T22:13:20Z"
    assert body["api_key"].startswith(body["prefix"])
    assert set(body) >= {"id", "api_key", "owner", "services", "expires_at", "rate_limit",
                         "created_at"}
    record = await store.get_key(body["id"])
    assert record.owner == "test-client"


@pytest_twisted.ensureDeferred
async def test_keys_endpoint_with_every_field(client):
    """When POST /admin/keys names services, expiry and rate limit, they are kept."""
    response, body = await client.call("POST", "/admin/keys", {
        "owner": "acme", "services": ["service1", "service1"], "expires_in": 3600,
        "rate_limit": 10,
    })
    assert response.code == 201
    assert body["services"] == ["service1"]
    assert body["expires_at"] == "2023-11-14T23:13:20Z" and body["rate_limit"] == 10


@pytest_twisted.ensureDeferred
async def test_list_and_get_never_show_the_secret(client):
    """When keys are listed or fetched, no key or hash appears, only the prefix."""
    _, created = await client.call("POST", "/admin/keys", {"owner": "a"})
    response, listing = await client.call("GET", "/admin/keys")
    assert response.code == 200
    assert [k["id"] for k in listing["keys"]] == [created["id"]]
    response, one = await client.call("GET", f"/admin/keys/{created['id']}")
    assert response.code == 200
    for view in (listing["keys"][0], one):
        assert set(view) == {"id", "owner", "prefix", "services", "rate_limit", "created_at",
                             "expires_at", "revoked_at", "active"}
        assert view["active"] is True
        assert created["api_key"] not in json.dumps(view)


@pytest_twisted.ensureDeferred
async def test_delete_then_get_shows_inactive_and_key_stops_working(store, clock):
    """When a key is deleted, GET shows active false and this process refuses it at once."""
    api, auth = make_api(store, clock)
    client = Client(mounted(api))
    _, created = await client.call("POST", "/admin/keys", {"owner": "a"})
    await auth.authenticate(created["api_key"])  # now cached
    response, body = await client.call("DELETE", f"/admin/keys/{created['id']}")
    assert response.code == 200 and body["active"] is False and body["revoked_at"]
    _, again = await client.call("GET", f"/admin/keys/{created['id']}")
    assert again["active"] is False
    with pytest.raises(Exception) as e:
        await auth.authenticate(created["api_key"])
    assert e.value.reason == "revoked"


@pytest_twisted.ensureDeferred
async def test_unknown_id_is_404(client):
    """When a key id is unknown, GET and DELETE answer a JSON 404."""
    for method in ("GET", "DELETE"):
        response, body = await client.call(method, "/admin/keys/0123456789abcdef")
        assert response.code == 404, method
        assert body["error"] and body["request_id"]


@pytest_twisted.ensureDeferred
async def test_unknown_path_and_method(client):
    """When the path or method is not an endpoint, the answer is JSON 404 or 405."""
    response, body = await client.call("GET", "/admin/nothing-here")
    assert response.code == 404 and body["error"]
    response, body = await client.call("PUT", "/admin/keys")
    assert response.code == 405 and "GET" in response.headers.getRawHeaders("allow")[0]


@pytest_twisted.ensureDeferred
async def test_admin_port_root_keeps_the_admin_prefix(api):
    """When served as the root of --admin-port, paths keep /admin and others are JSON 404."""
    client = Client(api.root_resource())
    response, body = await client.call("POST", "/admin/generate_key", {"owner": "p"})
    assert response.code == 201 and body["owner"] == "p"
    for path in ("/", "/service1/x", "/keys"):
        response, body = await client.call("GET", path)
        assert response.code == 404 and body["error"], path


@pytest_twisted.ensureDeferred
async def test_request_id_is_echoed_when_safe(client):
    """When X-Request-ID is plain it is echoed in the error; otherwise a fresh one is made."""
    response, body = await client.call("GET", "/admin/keys/nope", headers={"X-Request-ID": "abc.1"})
    assert body["request_id"] == "abc.1"
    assert response.headers.getRawHeaders("x-request-id") == ["abc.1"]
    _, body = await client.call("GET", "/admin/keys/nope", headers={"X-Request-ID": "a b<"})
    assert len(body["request_id"]) == 32 and body["request_id"] != "a b<"


# --- 400s ------------------------------------------------------------------------

BAD_BODIES = [
    (b"not json", "not valid JSON"),
    (b"", "must be a JSON object"),
    (b'["owner"]', "must be a JSON object"),
    (b'{"owner": NaN}', "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"{}", "owner must be a string"),
    (b'{"owner": 5}', "owner must be a string"),
    (b'{"owner": ""}', "owner must not be empty"),
    (b'{"owner": "   "}', "owner must not be empty"),
    (json.dumps({"owner": "x" * 121}).encode(), "at most 120"),
    (b'{"owner": "a\\nX-Evil: 1"}', "control characters"),
    (b'{"owner": "a", "services": "service1"}', "list of service names"),
    (b'{"owner": "a", "services": [1]}', "list of service names"),
    (b'{"owner": "a", "services": []}', "must not be empty"),
    (b'{"owner": "a", "services": ["nope"]}', "'nope'"),
    (b'{"owner": "a", "expires_in": -5}', "expires_in"),
    (b'{"owner": "a", "expires_in": 0}', "expires_in"),
    (b'{"owner": "a", "expires_in": "1h"}', "expires_in must be a number"),
    (b'{"owner": "a", "expires_in": true}', "expires_in must be a number"),
    (b'{"owner": "a", "rate_limit": 0}', "rate_limit"),
    (b'{"owner": "a", "rate_limit": -1}', "rate_limit"),
    (b'{"owner": "a", "rate_limit": 1.5}', "rate_limit must be an integer"),
    (b'{"owner": "a", "colour": "red"}', "unknown field 'colour'"),
    (json.dumps({"owner": "a", "pad": "x" * 70000}).encode(), "64 KiB"),
]


@pytest.mark.parametrize("raw, phrase", BAD_BODIES, ids=[p for _, p in BAD_BODIES])
@pytest_twisted.ensureDeferred
async def test_bad_bodies_are_400_with_a_sentence(client, store, raw, phrase):
    """When the body is malformed, the answer is 400 naming the problem and no key is made."""
    response, body = await client.call("POST", "/admin/keys", raw=raw)
    assert response.code == 400
    assert phrase in body["error"]
    assert set(body) == {"error", "request_id"}
    assert await store.list_keys() == []


# --- 403s ------------------------------------------------------------------------

@pytest.mark.parametrize("key", [None, "wrong", "supersecre", "supersecret2", ""])
@pytest_twisted.ensureDeferred
async def test_wrong_or_missing_master_key_is_403(client, store, key):
    """When X-Master-Key is missing or wrong, every endpoint answers 403 and does nothing."""
    for method, path, body in [("POST", "/admin/generate_key", {"owner": "x"}),
                               ("GET", "/admin/keys", None),
                               ("GET", "/admin/keys/abc", None),
                               ("DELETE", "/admin/keys/abc", None),
                               ("POST", "/admin/reload", None),
                               ("GET", "/admin/secret-route", None)]:
        response, answer = await client.call(method, path, body, key=key)
        assert response.code == 403, (method, path)
        assert answer["error"] and "api_key" not in answer
    assert await store.list_keys() == []


@pytest_twisted.ensureDeferred
async def test_unset_master_key_refuses_everything_without_a_line_per_call(store, clock):
    """When MASTER_KEY is unset, every call is 403 whatever key is sent, and refusals log nothing (the startup summary says why, once: test_startup)."""
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        api, _ = make_api(store, clock, master_key=None)
        client = Client(mounted(api))
        for key in (None, "", MASTER):
            response, body = await client.call("POST", "/admin/generate_key", {"owner": "x"},
                                               key=key)
            assert response.code == 403 and "MASTER_KEY" in body["error"]
    finally:
        globalLogPublisher.removeObserver(events.append)
    said = [e for e in events if "MASTER_KEY" in e.get("log_format", "")]
    assert said == []


@pytest_twisted.ensureDeferred
async def test_caller_outside_admin_allow_is_403_even_with_the_key(store, clock):
    """When the client address (127.0.0.1 under StubTreq) is outside admin_allow, the answer is 403."""
    api, _ = make_api(store, clock, admin_allow=(ipaddress.ip_network("10.0.0.0/8"),))
    response, body = await Client(mounted(api)).call("POST", "/admin/generate_key",
                                                     {"owner": "x"})
    assert response.code == 403 and "address" in body["error"]
    assert await store.list_keys() == []


def test_admin_allow_matching():
    """When addresses are checked, v4, v6 and v4-mapped v6 match the right networks, and a UNIX socket is local."""
    nets = LOOPBACK + (ipaddress.ip_network("192.168.0.0/16"),)

    def tcp(host):
        return IPv6Address("TCP", host, 1) if ":" in host else IPv4Address("TCP", host, 1)

    assert allowed(tcp("127.0.0.1"), nets)
    assert allowed(tcp("::1"), nets)
    assert allowed(tcp("::ffff:192.168.1.2"), nets)
    assert not allowed(tcp("10.1.2.3"), nets)
    assert not allowed(tcp("::ffff:10.1.2.3"), nets)
    assert not allowed(None, nets)
    assert not allowed(tcp("not-an-ip"), nets)
    assert allowed(UNIXAddress(b"/run/apigw.sock"), nets)


# --- reload and outages -------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_reload_answers_with_services_or_the_error(store, clock):
    """When /admin/reload succeeds it lists the services; when it fails it is 400 with the error."""
    outcomes = [["b", "a"], ConfigError("gw.yaml", "services.x.url", "not http(s)")]

    def reload():
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    api, _ = make_api(store, clock, reload=reload)
    client = Client(mounted(api))
    response, body = await client.call("POST", "/admin/reload")
    assert response.code == 200 and body["services"] == ["a", "b"]
    response, body = await client.call("POST", "/admin/reload")
    assert response.code == 400 and "services.x.url: not http(s)" in body["error"]


@pytest_twisted.ensureDeferred
async def test_reload_without_a_reloader_is_503(client):
    """When no reload callable was given, /admin/reload answers 503."""
    response, _ = await client.call("POST", "/admin/reload")
    assert response.code == 503


@pytest_twisted.ensureDeferred
async def test_store_down_is_503(clock):
    """When the key store cannot answer, admin calls get 503, not 500."""
    class DownStore:
        async def list_keys(self):
            raise KeyStoreUnavailable("connection refused")

    api = AdminAPI(DownStore(), None, MASTER, LOOPBACK, lambda: SERVICES, clock=clock)
    response, body = await Client(mounted(api)).call("GET", "/admin/keys")
    assert response.code == 503 and "unavailable" in body["error"]
