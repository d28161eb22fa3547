"""Property tests for POST /admin/keys (issue 8, point 2): whatever the body,
the answer is a 201 with a well-formed key or a JSON 400 with one sentence,
never a 500 or a traceback, and a refused body leaves the store as it was."""

import json
import re

import pytest
import pytest_twisted
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.internet.threads import blockingCallFromThread, deferToThread

from apigw.admin import KEY_FIELDS, MAX_BODY_BYTES
from apigw.keys import KEY_SHAPE, PREFIX_LEN, KeyStore
from keys_support import T0
from tests.test_admin import MASTER, SERVICES, Client, make_api, mounted

# The profile loaded by conftest.py; no deadline, the reactor and a thread
# pool serve every example.
PROPERTIES = settings(deadline=None)


# Hypothesis runs examples synchronously, and a test under pytest-twisted
# runs inside the reactor: so the examples run in a worker thread, each
# handing its requests to the (free) reactor and waiting for the answer.
def in_worker(property_test):
    return deferToThread(property_test)


def on_reactor(f, *args):
    return blockingCallFromThread(reactor, lambda: ensureDeferred(f(*args)))
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\Z")


@pytest.fixture(scope="module")
def admin(tmp_path_factory):
    """One store and admin API for all examples: keys pile up, as in production."""
    clock = Clock()
    clock.advance(T0)
    path = tmp_path_factory.mktemp("admin-properties") / "keys.db"
    store = KeyStore(f"sqlite:///{path}", reactor, clock=clock)
    pytest_twisted.blockon(store.start())
    api, auth = make_api(store, clock)
    yield store, auth, Client(mounted(api))
    pytest_twisted.blockon(store.stop())


def post(client, raw):
    """(status, headers, body bytes) for one POST /admin/keys."""
    async def call():
        d = client.stub.request(
            "POST", "http://localhost:8000/admin/keys", data=raw,
            headers={"Content-Type": "application/json", "X-Master-Key": MASTER})
        response = await client._settle(d)
        return response, await client._settle(client.stub.content(response))

    response, content = on_reactor(call)
    return response.code, response.headers, content


def key_count(store):
    return len(on_reactor(store.list_keys))


def check_answer(admin, raw, sent=None):
    """The shared property; `sent` is the decoded body when it was a JSON object."""
    store, auth, client = admin
    before = key_count(store)
    code, headers, content = post(client, raw)
    assert code in (201, 400), (code, content)
    assert headers.getRawHeaders("content-type") == ["application/json"]
    assert b"Traceback" not in content and b'File "' not in content
    body = json.loads(content)
    if code == 400:
        assert set(body) == {"error", "request_id"}
        error = body["error"]
        assert isinstance(error, str) and error.strip() and len(error.splitlines()) == 1, error
        assert body["request_id"] == headers.getRawHeaders("x-request-id")[0]
        assert key_count(store) == before, "a refused body still changed the store"
        return None
    check_record(body, sent)
    assert key_count(store) == before + 1
    if (sent.get("expires_in") or 1) >= 1:  # shorter ones may have expired already
        record = on_reactor(auth.authenticate, body["api_key"])
        assert record.id == body["id"] and record.owner == body["owner"]
    return body


def check_record(body, sent):
    assert set(body) == {"id", "api_key", "owner", "prefix", "services", "expires_at",
                         "rate_limit", "created_at"}
    assert re.fullmatch(r"[0-9a-f]{32}", body["id"])
    assert KEY_SHAPE.match(body["api_key"])
    assert len(body["prefix"]) == PREFIX_LEN and body["api_key"].startswith(body["prefix"])
    assert body["created_at"] == "2023-11-14T22:13:20Z"
    assert isinstance(sent, dict), "a body that is not a JSON object was accepted"
    assert set(sent) <= set(KEY_FIELDS)
    assert body["owner"] == sent["owner"] and 1 <= len(sent["owner"]) <= 120
    if sent.get("services") is None:
        assert body["services"] is None
    else:
        assert body["services"] == list(dict.fromkeys(sent["services"]))
        assert set(body["services"]) <= set(SERVICES)
    assert body["rate_limit"] == sent.get("rate_limit")
    if sent.get("expires_in") is None:
        assert body["expires_at"] is None
    else:
        # Shown to the second: under a second's expiry it may equal created_at.
        assert ISO.match(body["expires_at"]) and body["expires_at"] >= body["created_at"]


# --- bodies -------------------------------------------------------------------------

text = st.one_of(
    st.text(max_size=20),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=8),  # surrogates too
    st.sampled_from(["", " ", "a", "test-client", "x" * 120, "x" * 121, "a\nb", "a\x7fb",
                     "a\x85b", "a\u2028b", "é", "\ud800", "service1", "\x00"]),
)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False,
                         allow_infinity=False), text)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(text, inner, max_size=4)),
    max_leaves=10,
)
numbers = st.one_of(st.integers(-3, 10), st.integers(2**31 - 2, 2**31 + 1),
                    st.integers(3_155_759_990, 3_155_760_010), st.integers(),
                    st.floats(allow_nan=False, allow_infinity=False), st.floats(0, 1))
near_valid = st.builds(
    lambda fields, extra: {**fields, **extra},
    st.fixed_dictionaries({}, optional={
        "owner": st.one_of(text, json_values),
        "services": st.one_of(
            st.lists(st.one_of(st.sampled_from(SERVICES + ("admin", "nope", "")), text),
                     max_size=4),
            json_values),
        "expires_in": st.one_of(numbers, json_values),
        "rate_limit": st.one_of(numbers, json_values),
    }),
    st.dictionaries(st.sampled_from(["colour", "id", "api_key", "Owner"]), json_values,
                    max_size=1),
)
# Valid more often than chance would make them, so 201s get checked too.
mostly_valid = st.fixed_dictionaries(
    {"owner": st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF), min_size=1,
                      max_size=30).filter(str.strip)},
    optional={"services": st.lists(st.sampled_from(SERVICES), min_size=1, max_size=3),
              "expires_in": st.one_of(st.integers(1, 10**6), st.floats(0.001, 10**6)),
              "rate_limit": st.integers(1, 2**31 - 1)},
)


def encode(value, ensure_ascii):
    """JSON bytes as a client might send them; lone surrogates become bad UTF-8."""
    return json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


@pytest_twisted.ensureDeferred
async def test_any_json_body_gives_a_key_or_a_clean_400(admin):
    """When any JSON value is posted to /admin/keys, the answer is 201 with a well-formed key or a one-sentence JSON 400 that changed nothing."""

    @PROPERTIES
    @given(st.one_of(mostly_valid, near_valid, json_values), st.booleans())
    @example({"owner": "test-client"}, True)
    @example({"owner": "\ud800"}, True)
    @example({"owner": "a", "services": ["service1", "service1"]}, True)
    @example({"owner": "a", "expires_in": 3_155_760_000}, True)
    @example({"owner": "a", "rate_limit": 2**31 - 1}, True)
    @example({"owner": "a", "expires_in": 1e-9}, True)
    @example([[[[[]]]]], True)
    def json_bodies(body, ensure_ascii):
        check_answer(admin, encode(body, ensure_ascii), sent=body)

    await in_worker(json_bodies)


@pytest_twisted.ensureDeferred
async def test_any_bytes_give_a_key_or_a_clean_400(admin):
    """When any bytes at all are posted to /admin/keys, the answer is 201 or a one-sentence JSON 400 that changed nothing, never a 500."""

    @PROPERTIES
    @given(st.one_of(
        st.binary(max_size=64),
        st.builds(lambda data, cut: data[:cut], mostly_valid.map(lambda v: encode(v, False)),
                  st.integers(0, 40)),
        st.builds(lambda data, i, byte: data[:i] + bytes([byte]) + data[i + 1:],
                  near_valid.map(lambda v: encode(v, True)), st.integers(0, 30),
                  st.integers(0, 255)),
    ))
    @example(b"[" * 60_000)
    @example(b'{"owner": ' * 6_000 + b'"a"' + b"}" * 6_000)
    @example(b'{"owner": "a", "rate_limit": 1' + b"0" * 5000 + b"}")
    @example(b'{"owner": "a", "expires_in": Infinity}')
    @example(b'{"owner": "a", "expires_in": 1e999}')
    @example(b'\xef\xbb\xbf{"owner": "a"}')
    @example(b'{"owner": "a"}' + b" " * MAX_BODY_BYTES)
    @example(json.dumps({"owner": "\ud800"}, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    def raw_bodies(raw):
        try:
            sent = json.loads(raw)
        except (ValueError, RecursionError):
            sent = None
        check_answer(admin, raw, sent=sent)

    await in_worker(raw_bodies)


def call(client, method, path, master_key=MASTER, host=None):
    """(status, content-type, body bytes) for one admin request on a raw path."""
    async def go():
        headers = {b"X-Master-Key": master_key.encode()}
        if host is not None:
            headers[b"Host"] = host
        d = client.stub.request(method, b"http://localhost:8000" + path, headers=headers)
        response = await client._settle(d)
        return response, await client._settle(client.stub.content(response))

    response, content = on_reactor(go)
    return response.code, response.headers.getRawHeaders("content-type"), content


@pytest_twisted.ensureDeferred
async def test_any_key_id_or_host_gives_a_json_answer(admin):
    """When the key id in the URL (or the Host header) is any bytes at all, GET and DELETE answer JSON: 404 or 400 with the master key, 403 without, never HTML or 500."""
    store, _, client = admin

    @PROPERTIES
    @given(st.binary(min_size=1, max_size=40), st.sampled_from(["GET", "DELETE"]),
           st.booleans(), st.one_of(st.none(), st.binary(min_size=1, max_size=12)))
    @example(b"\xff", "GET", True, None)
    @example(b"\xed\xa0\x80", "DELETE", False, None)
    @example(b"abc", "GET", True, b"\xff\xfe")
    @example(b"/\x00", "GET", False, None)
    @example(b"/x", "DELETE", True, None)
    @example(b"x", "GET", True, b"a..b")
    def key_ids(raw_id, method, right_key, host):
        if host is not None and not re.fullmatch(rb"[!-~\x80-\xff]+", host):
            host = None  # a Host the HTTP client itself would refuse to send
        before = key_count(store)
        path = b"/admin/keys/" + b"".join(b"%%%02X" % byte for byte in raw_id)
        code, content_type, content = call(client, method, path,
                                           MASTER if right_key else "wrong", host)
        assert content_type == ["application/json"], (code, content)
        body = json.loads(content)
        assert set(body) == {"error", "request_id"} and len(body["error"].splitlines()) == 1
        assert code == (404 if right_key else 403) or (right_key and code == 400), code
        assert key_count(store) == before

    await in_worker(key_ids)
