"""Operations: reload, drain, readiness, daemon mode, TLS, the metrics contract."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater

from apigw.config import Environment, parse_config
from tests.helpers import (
    TWISTD, assert_no_secrets, free_port, http, raw_exchange, start_gateway, wait_for_port,
)
from tests.upstreams import TestUpstream


def sleep(seconds):
    return deferLater(reactor, seconds, lambda: None)


async def wait_until(predicate, timeout_s=5.0):
    deadline = reactor.seconds() + timeout_s
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("condition not reached in time")
        await sleep(0.01)


@pytest_twisted.async_yield_fixture
async def upstreams():
    first, second = TestUpstream().start(), TestUpstream().start()
    yield first, second
    await first.stop()
    await second.stop()


def _yaml(services, settings=""):
    text = "services:\n"
    for name, url in services.items():
        text += f"  {name}:\n    url: \"{url}\"\n    auth: false\n    retries: 0\n"
    return text + settings


@pytest_twisted.ensureDeferred
async def test_reload_applies_to_new_requests_and_in_flight_finish_on_old(tmp_path, upstreams):
    """When the config is reloaded mid-request, the in-flight request finishes on the old upstream and new ones use the new config."""
    first, second = upstreams
    path = tmp_path / "gw.yaml"
    path.write_text(_yaml({"svc": first.url, "gone": first.url}))
    config = parse_config(path.read_text(), str(path), Environment(database_url=f"sqlite:///{tmp_path}/gw.db"))
    from apigw.service import GatewayService

    service = GatewayService(config, port="tcp:0:interface=127.0.0.1")
    service.startService()
    base = f"http://127.0.0.1:{(await service.when_listening()).getHost().port}"
    try:
        in_flight = ensureDeferred(http("GET", base + "/svc/hang"))
        await wait_until(lambda: first.hanging)
        path.write_text(_yaml({"svc": second.url, "added": second.url}))
        assert service.reload() == ["added", "svc"]
        assert (await http("GET", base + "/svc/x")).code == 200
        assert second.requests[-1]["uri"] == "/x"
        assert (await http("GET", base + "/added/y")).code == 200
        assert (await http("GET", base + "/gone/z")).code == 404
        hung = first.hanging[0]
        hung.write(b"old upstream")
        hung.finish()
        reply = await in_flight
        assert reply.code == 200 and reply.body == b"old upstream"
        metrics = (await http("GET", base + "/metrics")).body
        assert b'gateway_config_reloads_total{result="ok"} 1.0' in metrics
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_invalid_reload_keeps_old_config(tmp_path, upstreams):
    """When the reloaded file is invalid, the error is raised and counted and the old services keep answering."""
    first, _ = upstreams
    path = tmp_path / "gw.yaml"
    path.write_text(_yaml({"svc": first.url}))
    config = parse_config(path.read_text(), str(path), Environment(database_url=f"sqlite:///{tmp_path}/gw.db"))
    from apigw.config import ConfigError
    from apigw.service import GatewayService

    service = GatewayService(config, port="tcp:0:interface=127.0.0.1")
    service.startService()
    base = f"http://127.0.0.1:{(await service.when_listening()).getHost().port}"
    try:
        path.write_text("services:\n  svc:\n    url: ftp://x\n")
        with pytest.raises(ConfigError):
            service.reload()
        assert (await http("GET", base + "/svc/x")).code == 200
        metrics = (await http("GET", base + "/metrics")).body
        assert b'gateway_config_reloads_total{result="error"} 1.0' in metrics
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_drain_waits_for_in_flight_then_stops(upstreams):
    """When the service stops with a request in flight, it stops accepting, reports not ready, and finishes that request first."""
    first, _ = upstreams
    service, base = await start_gateway(_yaml({"svc": first.url}, "settings:\n  shutdown_grace: 10\n"))
    port = int(base.rsplit(":", 1)[1])
    in_flight = ensureDeferred(raw_exchange(port, b"GET /svc/hang HTTP/1.1\r\nHost: gw\r\n\r\n"))
    await wait_until(lambda: first.hanging)
    stopped = service.stopService()
    assert (await service.readiness()) == ["shutting down"]
    await sleep(0.1)
    assert not stopped.called
    with pytest.raises(Exception):
        await http("GET", base + "/healthz")  # no longer accepting
    first.hanging[0].write(b"done")
    first.hanging[0].finish()
    head, _, body = (await in_flight).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b"4\r\ndone\r\n0\r\n\r\n"
    # The client is told not to reuse the connection of a draining process,
    # and the gateway closes it (raw_exchange returns at the close).
    assert b"\r\nconnection: close" in head.lower()
    await wait_until(lambda: stopped.called)


@pytest_twisted.ensureDeferred
async def test_drain_gives_up_after_grace(upstreams):
    """When in-flight requests outlast shutdown_grace, stopping completes anyway."""
    first, _ = upstreams
    service, base = await start_gateway(_yaml({"svc": first.url}, "settings:\n  shutdown_grace: 0.2\n"))
    in_flight = ensureDeferred(http("GET", base + "/svc/hang"))
    in_flight.addErrback(lambda f: None)
    await wait_until(lambda: first.hanging)
    started = reactor.seconds()
    await service.stopService()
    assert 0.15 <= reactor.seconds() - started < 3


@pytest_twisted.ensureDeferred
async def test_readyz_ready_then_503(upstreams):
    """When running, /readyz is 200; once shutdown begins it says so with 503."""
    first, _ = upstreams
    service, base = await start_gateway(_yaml({"svc": first.url}))
    try:
        reply = await http("GET", base + "/readyz")
        assert reply.code == 200 and reply.json()["status"] == "ready"
        service.shutting_down = True
        reply = await http("GET", base + "/readyz")
        assert reply.code == 503 and "shutting down" in reply.json()["down"]
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_metrics_exact_deltas_and_bounded_labels(upstreams):
    """When known traffic passes, each counter moves by exactly that much and unrouted paths count as unknown."""
    first, _ = upstreams
    service, base = await start_gateway(_yaml({"svc": first.url}))
    try:
        for _ in range(3):
            await http("GET", base + "/svc/x")
        await http("POST", base + "/svc/status?code=503", body=b"x")
        for path in ("/random-1", "/random-2/deep"):
            await http("GET", base + path)
        for method in ("FOO1", "FOO2"):
            await http(method, base + "/svc/x")
        await http("GET", base + "/healthz")
        text = (await http("GET", base + "/metrics")).body.decode()
        assert 'gateway_requests_total{method="GET",service="svc",status="200"} 3.0' in text
        assert 'gateway_requests_total{method="POST",service="svc",status="503"} 1.0' in text
        assert 'gateway_requests_total{method="GET",service="unknown",status="404"} 2.0' in text
        assert 'gateway_request_latency_seconds_count{service="svc"} 6.0' in text
        assert 'gateway_upstream_latency_seconds_count{service="svc"} 6.0' in text
        assert 'gateway_requests_total{method="OTHER",service="svc",status="200"} 2.0' in text
        assert "random" not in text and "healthz" not in text and "FOO" not in text
        assert "gateway_in_flight_requests 0.0" in text
    finally:
        await service.stopService()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (make test installs it)")
@pytest_twisted.ensureDeferred
async def test_metrics_pass_promtool(upstreams):
    """When /metrics is scraped after traffic, promtool check metrics finds no problem."""
    first, _ = upstreams
    service, base = await start_gateway(_yaml({"svc": first.url}))
    try:
        await http("GET", base + "/svc/x")
        await http("GET", base + "/nope")
        body = (await http("GET", base + "/metrics")).body
    finally:
        await service.stopService()
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"gateway_requests_total" in body


def _make_cert(directory):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import datetime

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest_twisted.ensureDeferred
async def test_tls_listener_serves_https(tmp_path, upstreams):
    """When --port is an ssl endpoint, the gateway serves HTTPS and tells the upstream the proto was https."""
    first, _ = upstreams
    key_path, cert_path = _make_cert(tmp_path)
    port = free_port()
    config = parse_config(_yaml({"svc": first.url}), "t.yaml", Environment(database_url=f"sqlite:///{tmp_path}/gw.db"))
    from apigw.service import GatewayService

    service = GatewayService(
        config, port=f"ssl:{port}:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}"
    )
    service.startService()
    await service.when_listening()
    try:
        result = await _in_thread(lambda: subprocess.run(
            ["curl", "-s", "--cacert", str(cert_path), "--resolve", f"localhost:{port}:127.0.0.1",
             f"https://localhost:{port}/svc/x"], capture_output=True, timeout=30,
        ))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["uri"] == "/x"
        assert first.requests[-1]["headers"]["x-forwarded-proto"] == ["https"]
    finally:
        await service.stopService()


def _in_thread(f):
    from twisted.internet.threads import deferToThread

    return deferToThread(f)


def test_daemon_lifecycle(tmp_path):
    """When run without -n, apigw daemonizes with pidfile and logfile, serves, reloads on SIGHUP and exits on SIGTERM removing the pidfile."""
    import urllib.request

    port = free_port()
    config = tmp_path / "gw.yaml"
    config.write_text("services:\n  a:\n    url: http://127.0.0.1:9\n    auth: false\n")
    pidfile, logfile = tmp_path / "twistd.pid", tmp_path / "twistd.log"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["DATABASE_URL"] = f"sqlite:///{tmp_path}/apigw.db"
    result = subprocess.run(
        [TWISTD, "--pidfile", str(pidfile), "--logfile", str(logfile), "apigw",
         "--config", str(config), "--port", f"tcp:{port}:interface=127.0.0.1"],
        cwd=str(tmp_path), env=env, capture_output=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    wait_for_port(port)
    pid = int(pidfile.read_text())
    try:
        def get(path):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:  # reactor-free test thread
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        assert get("/healthz") == 200
        assert get("/b/x") == 404
        config.write_text(config.read_text() + "  b:\n    url: http://127.0.0.1:9\n    auth: false\n")
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while get("/b/x") == 404 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert get("/b/x") == 502  # routed now; nothing listens on port 9
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not pidfile.exists()
    log_text = logfile.read_text()
    assert "config reloaded" in log_text
    assert "Traceback" not in log_text
    assert_no_secrets(log_text, "twistd.log")


@pytest.mark.parametrize("debug", [True, False])
@pytest_twisted.ensureDeferred
async def test_debug_setting_adds_one_debug_line_per_attempt(tmp_path, upstreams, debug):
    """When DEBUG is true, each upstream attempt is logged at debug level; when false, nothing is."""
    from twisted.logger import LogLevel, globalLogPublisher

    first, _ = upstreams
    events = []
    globalLogPublisher.addObserver(events.append)
    env = Environment(database_url=f"sqlite:///{tmp_path}/gw.db", debug=debug)
    service, base = await start_gateway(_yaml({"svc": first.url}), env=env)
    try:
        await http("GET", base + "/svc/x?q=1", headers={b"X-Request-ID": b"dbg-1"})
    finally:
        await service.stopService()
        globalLogPublisher.removeObserver(events.append)
    lines = [e for e in events if e.get("log_level") == LogLevel.debug
             and e.get("log_namespace") == "apigw.forward"]
    if debug:
        assert len(lines) == 1
        assert lines[0]["request_id"] == "dbg-1" and lines[0]["uri"].endswith("/x?q=1")
    else:
        assert lines == []


@pytest_twisted.ensureDeferred
async def test_fixed_paths_refuse_other_methods_in_json(upstreams):
    """When /healthz, /readyz or /metrics get a POST, the answer is a JSON 405 with Allow."""
    first, _ = upstreams
    service, base = await start_gateway(_yaml({"svc": first.url}))
    try:
        for path in ("/healthz", "/readyz", "/metrics"):
            reply = await http("POST", base + path, body=b"x")
            assert reply.code == 405, path
            assert reply.header(b"content-type") == "application/json"
            assert reply.json()["request_id"] and reply.header(b"allow") == "GET, HEAD"
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_429_status_line_has_its_phrase(upstreams):
    """When a request is rate limited, the status line reads 429 Too Many Requests."""
    first, _ = upstreams
    service, base = await start_gateway(
        f"services:\n  none:\n    url: \"{first.url}\"\n    auth: false\n    rate_limit: 0\n"
    )
    try:
        port = int(base.rsplit(":", 1)[1])
        data = await raw_exchange(port, b"GET /none/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
        assert first.requests == []
    finally:
        await service.stopService()
