"""Secrets (issue 8, point 3): no API key or master key in an error body, a
metric, an upstream request or a log line. The session-wide log guard lives
in secrets_guard.py; here are the places a log observer cannot see, and the
proof that the guard fails a run."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import pytest_twisted

from apigw.keys import new_raw_key
from tests.helpers import REPO, http
from tests.secrets_guard import API_KEY, assert_no_secrets, secrets_in
from tests.test_auth_gateway import MASTER, Gateway, env_for, generate_key

BOGUS_KEY = "agw_" + "b" * 43  # the right shape, in no database


def assert_reply_clean(reply, *secrets):
    """Neither the body nor any response header holds a key or the master key."""
    texts = [reply.body.decode("latin-1")] + [
        value.decode("latin-1") for _, values in reply.headers.getAllRawHeaders()
        for value in values]
    for text in texts:
        assert not API_KEY.search(text), f"a key-shaped string in the {reply.code} answer"
        for secret in secrets:
            assert secret not in text, f"a secret in the {reply.code} answer"


@pytest_twisted.ensureDeferred
async def test_refusals_never_echo_the_key_or_master_key(tmp_path):
    """When keys are refused (401 invalid or revoked, 403 forbidden, 429 limited) and the master key is wrong, no answer holds any of them."""
    async with Gateway(tmp_path) as gw:
        narrow = await generate_key(gw.base, {"owner": "narrow", "services": ["service1"],
                                              "rate_limit": 1})
        revoked = await generate_key(gw.base, {"owner": "gone"})
        assert (await http("DELETE", gw.base + f"/admin/keys/{revoked['id']}",
                           headers={b"X-Master-Key": MASTER.encode()})).code == 200
        keys = (narrow["api_key"], revoked["api_key"], BOGUS_KEY)
        cases = [
            ("/service1/x", BOGUS_KEY, 401),
            ("/service1/x", revoked["api_key"], 401),
            ("/service2/x", narrow["api_key"], 403),
            ("/service1/x", narrow["api_key"], 200),
            ("/service1/x", narrow["api_key"], 429),
        ]
        for path, key, status in cases:
            reply = await http("GET", gw.base + path, headers={b"X-API-Key": key.encode()})
            assert reply.code == status, (path, status)
            if status != 200:
                assert_reply_clean(reply, MASTER, *keys)
        for given in (b"supersecret2", MASTER[:-1].encode(), BOGUS_KEY.encode()):
            reply = await http("GET", gw.base + "/admin/keys", headers={b"X-Master-Key": given})
            assert reply.code == 403
            assert_reply_clean(reply, MASTER, given.decode(), *keys)
        listing = await http("GET", gw.base + "/admin/keys",
                             headers={b"X-Master-Key": MASTER.encode()})
        assert listing.code == 200 and len(listing.json()["keys"]) == 2
        assert_reply_clean(listing, MASTER, *keys)


@pytest_twisted.ensureDeferred
async def test_key_store_outage_503_never_echoes_the_key(tmp_path):
    """When the key database is down, the 503 for a keyed request does not hold the key sent."""
    env = env_for(tmp_path, database_url=f"sqlite:///{tmp_path}/no/such/dir/gw.db")
    async with Gateway(tmp_path, env=env) as gw:
        key = new_raw_key()
        reply = await http("GET", gw.base + "/service1/x", headers={b"X-API-Key": key.encode()})
        assert reply.code == 503
        assert_reply_clean(reply, MASTER, key)


@pytest_twisted.ensureDeferred
async def test_upstream_never_receives_the_api_key_or_master_key(tmp_path):
    """When a client sends its key (and, carelessly, the master key) to a service, the upstream sees neither, only the consumer headers."""
    async with Gateway(tmp_path) as gw:
        created = await generate_key(gw.base)
        key = created["api_key"]
        for path in ("/service1/x", "/open/x"):
            reply = await http("POST", gw.base + path, body=b"{}", headers={
                b"X-API-Key": key.encode(), b"X-Master-Key": MASTER.encode()})
            assert reply.code == 200, path
            seen = gw.upstream.requests[-1]
            assert "x-api-key" not in seen["headers"] and "x-master-key" not in seen["headers"]
            assert_no_secrets(json.dumps(seen["headers"]), f"upstream headers for {path}")
            assert MASTER not in json.dumps(seen["headers"])
        assert gw.upstream.requests[0]["headers"]["x-consumer-id"] == [created["id"]]


@pytest_twisted.ensureDeferred
async def test_metrics_never_hold_a_key_or_the_master_key(tmp_path):
    """When keys and the master key were sent everywhere, including as a path segment, /metrics shows none of them."""
    async with Gateway(tmp_path) as gw:
        created = await generate_key(gw.base)
        key = created["api_key"]
        for path in ("/service1/x", "/service2/" + key, "/" + key + "/x", "/admin/" + key):
            for headers in ({b"X-API-Key": key.encode()}, {b"X-API-Key": BOGUS_KEY.encode()},
                            {b"X-Master-Key": MASTER.encode()}):
                await http("GET", gw.base + path, headers=headers)
        metrics = await http("GET", gw.base + "/metrics")
        assert metrics.code == 200 and b"gateway_requests_total" in metrics.body
        text = metrics.body.decode()
        assert not API_KEY.search(text) and MASTER not in text and key[4:20] not in text


@pytest_twisted.ensureDeferred
async def test_key_in_the_query_string_is_redacted_in_the_access_log(tmp_path):
    """When a client puts its key in the URL, the upstream still gets the query as sent but the access log shows it redacted."""
    access_log = tmp_path / "access.log"
    async with Gateway(tmp_path, access_log=str(access_log)) as gw:
        created = await generate_key(gw.base)
        key = created["api_key"]
        reply = await http("GET", gw.base + f"/service1/x?api_key={key}&a=1",
                           headers={b"X-API-Key": key.encode()})
        assert reply.code == 200
        assert gw.upstream.requests[-1]["uri"] == f"/x?api_key={key}&a=1"  # SPEC 4: byte for byte
    text = access_log.read_text()
    assert_no_secrets(text, "the access log")
    paths = [json.loads(line)["path"] for line in text.splitlines()]
    assert "/service1/x?api_key=agw_<redacted>&a=1" in paths


def test_assert_no_secrets_finds_keys_and_registered_master_keys():
    """When text holds a generated key or a registered master key, the checker says so without repeating it."""
    key = new_raw_key()
    assert secrets_in(f"GET /x?k={key} 200") == ["1 API key(s)"]
    assert secrets_in(b"X-Master-Key: supersecret") == ["1 registered master key(s)"]
    assert secrets_in("created API key 1f2e (agw_AbCdEfGh...)") == []
    with pytest.raises(AssertionError) as caught:
        assert_no_secrets(f"token={key}", "twistd.log")
    assert key not in str(caught.value) and "twistd.log" in str(caught.value)


LEAKY_TESTS = '''
from twisted.logger import Logger

from apigw.keys import new_raw_key
from apigw.logs import AccessLog
from tests.secrets_guard import register_secret

KEY = new_raw_key()
log = Logger(namespace="leaky")


def test_logs_a_key():
    log.info("authenticated {key}", key=KEY)


def test_access_log_file_holds_a_key(tmp_path):
    access = AccessLog(str(tmp_path / "access.log"))
    access.start()
    access.record({"path": "/s/x", "consumer": KEY})
    access.stop()


def test_logs_a_registered_master_key():
    log.warn("admin refused {given}", given=register_secret("m4ster-of-keys"))


def test_clean():
    log.info("created API key {id} ({prefix}...)", id="abc", prefix=KEY[:12])
'''


def _run_pytest(tmp_path, *args):
    (tmp_path / "test_leaky.py").write_text(textwrap.dedent(LEAKY_TESTS))
    env = dict(os.environ, PYTHONPATH=REPO)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.secrets_guard", "-p", "no:cacheprovider",
         "-q", "test_leaky.py", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    return result.returncode, result.stdout + result.stderr


@pytest.mark.slow
def test_guard_fails_a_session_whose_logs_hold_a_secret(tmp_path):
    """When tests log a key, write one to an access log file or log a registered master key, the session fails naming each test but not the secret; a clean session passes."""
    code, output = _run_pytest(tmp_path)
    assert code == 1, output
    assert "4 passed" in output and "secrets in logs" in output
    for test in ("test_logs_a_key", "test_access_log_file_holds_a_key",
                 "test_logs_a_registered_master_key"):
        assert f"test_leaky.py::{test}:" in output, test
    assert "test_leaky.py::test_clean:" not in output
    assert "namespace='leaky' format='authenticated {key}'" in output
    assert not API_KEY.search(output) and "m4ster-of-keys" not in output

    code, output = _run_pytest(tmp_path, "-k", "clean")
    assert code == 0 and "secrets in logs" not in output, output
