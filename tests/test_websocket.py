"""WebSocket through a real `twistd apigw`: a real client (the `websockets`
library) to a real WebSocket server, byte for byte both ways."""

import contextlib
import os
import signal
import threading
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.helpers import free_port
from tests.websocket_support import Gateway, WebSocketUpstream, wait_until

pytestmark = pytest.mark.slow

MiB = 1 << 20


def _yaml(upstream_url, settings="", extra=""):
    dead = f"http://127.0.0.1:{free_port()}"
    return f"""services:
  ws:
    url: "{upstream_url}"
    rate_limit: null
    retries: 0
  limited:
    url: "{upstream_url}"
    rate_limit: 2
  nows:
    url: "{upstream_url}"
    websocket: false
  other:
    url: "{upstream_url}"
  dead:
    url: "{dead}"
    retries: 0
{extra}settings:
  rate_period: 3600
  breaker_failure_threshold: 1
  breaker_min_requests: 1
  breaker_recovery_time: 600
{settings}"""


@pytest.fixture(scope="module")
def upstream():
    up = WebSocketUpstream()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstream):
    tmp = tmp_path_factory.mktemp("ws-gateway")
    gw = Gateway(tmp, _yaml(upstream.url), f"sqlite:///{tmp}/apigw.db")
    gw.key = gw.create_key()["api_key"]
    yield gw
    assert gw.stop() == 0
    assert "Traceback" not in gw.log(), gw.log()


def test_echo_text_binary_large_and_many_in_order(gateway, upstream):
    """When a client echoes text, binary, a 5 MiB message and 200 numbered messages through the gateway, all come back unchanged and in order."""
    with gateway.connect("/ws/echo", gateway.key) as ws:
        ws.send("héllo wörld")
        assert ws.recv() == "héllo wörld"
        blob = os.urandom(1000)
        ws.send(blob)
        assert ws.recv() == blob
        big = os.urandom(5 * MiB)
        ws.send(big)
        assert ws.recv() == big
        for i in range(200):
            ws.send(f"message {i}")
        assert [ws.recv() for _ in range(200)] == [f"message {i}" for i in range(200)]
    seen = upstream.handshakes[-1]
    assert seen["path"] == "/echo"
    headers = seen["headers"]
    assert "x-api-key" not in headers
    assert headers["upgrade"].lower() == "websocket"
    assert headers["x-consumer-username"] == "ws-user"
    assert headers["x-forwarded-prefix"] == "/ws" and headers["x-request-id"]
    assert headers["x-forwarded-for"] == "127.0.0.1"


def test_handshake_refusals_401_403_429_503_and_400(gateway):
    """When the handshake lacks a key, uses one not allowed here, passes the limit, meets an open breaker or a service without WebSocket, the gateway answers 401, 403, 429, 503 and 400."""
    def status(path, key=None):
        with pytest.raises(InvalidStatus) as refused:
            gateway.connect(path, key)
        return refused.value.response.status_code

    assert status("/ws/echo") == 401
    restricted = gateway.create_key(services=["other"])["api_key"]
    assert status("/ws/echo", restricted) == 403
    limited = gateway.create_key()["api_key"]
    for _ in range(2):
        with gateway.connect("/limited/echo", limited):
            pass
    assert status("/limited/echo", limited) == 429
    assert status("/dead/echo", gateway.key) == 502  # the failure that opens the breaker
    assert status("/dead/echo", gateway.key) == 503
    assert status("/nows/echo", gateway.key) == 400


def test_upstream_refusal_is_relayed(gateway):
    """When the upstream refuses the handshake with 403 and a body, the client gets that answer, not a tunnel."""
    with pytest.raises(InvalidStatus) as refused:
        gateway.connect("/ws/refuse", gateway.key)
    assert refused.value.response.status_code == 403
    assert b"the upstream says no" in refused.value.response.body


def test_close_codes_travel_both_ways(gateway, upstream):
    """When the client closes with 4001, the upstream sees 4001; when the upstream closes with 4002, the client sees 4002."""
    with gateway.connect("/ws/echo", gateway.key) as ws:
        ws.send("x")
        assert ws.recv() == "x"
        ws.close(4001, "client says bye")
    wait_until(lambda: ("/echo", 4001) in upstream.closes, 5)
    with gateway.connect("/ws/close", gateway.key) as ws:
        ws.send("bye please")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv()
    assert closed.value.rcvd.code == 4002 and closed.value.rcvd.reason == "server says bye"


def test_gauge_counter_and_one_access_record_per_tunnel(gateway):
    """When two tunnels are open the gauge says 2; once closed it says 0, the 101s are counted, and each tunnel left one access record with its duration and bytes both ways."""
    sample = 'gateway_websocket_connections{service="ws"}'
    counted = 'gateway_requests_total{method="GET",service="ws",status="101"}'
    before = gateway.metric(counted)
    blob = os.urandom(1000)
    with contextlib.ExitStack() as tunnels:
        first = tunnels.enter_context(gateway.connect("/ws/echo", gateway.key))
        second = tunnels.enter_context(gateway.connect("/ws/echo", gateway.key))
        assert gateway.metric(sample) == 2
        assert gateway.metric(counted) == before + 2
        first.send(blob)
        assert first.recv() == blob
        time.sleep(0.3)
    wait_until(lambda: gateway.metric(sample) == 0, 5)
    ids = [ws.response.headers["x-request-id"] for ws in (first, second)]

    def tunnel_records():
        found = {r["request_id"]: r for r in gateway.records() if r["request_id"] in ids}
        return found if len(found) == 2 else None

    records = wait_until(tunnel_records, 5)
    time.sleep(0.3)  # a second record per tunnel would have been written by now
    assert sorted(r["request_id"] for r in gateway.records() if r["request_id"] in ids) \
        == sorted(ids)  # one each
    one = records[ids[0]]
    assert one["status"] == 101 and one["path"] == "/ws/echo" and one["consumer"] == "ws-user"
    assert one["duration_ms"] >= 250
    assert one["bytes_received"] > 1000 and one["bytes_sent"] > 1000
    assert records[ids[1]]["status"] == 101 and records[ids[1]]["duration_ms"] >= 0


def test_reload_in_the_middle_keeps_the_tunnel(gateway):
    """When the config is reloaded (SIGHUP) while a tunnel is open, the tunnel goes on and new services answer."""
    original = gateway.config.read_text()
    with gateway.connect("/ws/echo", gateway.key) as ws:
        ws.send("before")
        assert ws.recv() == "before"
        gateway.config.write_text(original.replace("  other:", "  added:\n    url: \"http://127.0.0.1:9\"\n  other:"))
        gateway.signal(signal.SIGHUP)
        wait_until(lambda: "config reloaded" in gateway.log(), 10)
        for i in range(20):
            ws.send(f"after {i}")
            assert ws.recv() == f"after {i}"
    status, _ = gateway.get("/added/x", {"X-API-Key": gateway.key})
    assert status == 502  # routed: the new service exists
    gateway.config.write_text(original)


def _peak_rss_while(gateway, work):
    """(result of work(), peak VmRSS growth in KiB while it ran)."""
    base = gateway.rss_kib()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], gateway.rss_kib())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join(5)
    return result, peak[0] - base


def test_50_mib_to_a_slow_reader_and_back_without_growing(tmp_path, upstream):
    """When a client sends 50 MiB to an upstream that reads slowly, and an upstream sends 20 MiB to a client that reads slowly, the gateway's RSS grows by only a few MB."""
    gw = Gateway(tmp_path, _yaml(upstream.url), f"sqlite:///{tmp_path}/apigw.db")
    try:
        key = gw.create_key()["api_key"]
        # Warm up: the first tunnel's imports and buffers are not growth.
        with gw.connect("/ws/echo", key, compression=None) as ws:
            ws.send(os.urandom(MiB))
            ws.recv()
        chunk = os.urandom(MiB)
        upstream.slow_bytes = 0

        def upload():
            with gw.connect("/ws/slow", key, compression=None) as ws:
                started = time.monotonic()
                for _ in range(50):
                    ws.send(chunk)
                sent_s = time.monotonic() - started
                wait_until(lambda: upstream.slow_bytes == 50 * MiB, 30)
            return sent_s

        sent_s, growth_kib = _peak_rss_while(gw, upload)
        print(f"50 MiB to a slow reader: sent in {sent_s:.1f}s, RSS growth {growth_kib} KiB")
        # Sending took about as long as the reader's pace: back-pressure held.
        assert sent_s > 50 * upstream.slow_pause_s * 0.5
        assert growth_kib < 8 * 1024

        def download():
            with gw.connect(f"/ws/push?n={20 * MiB}", key, compression=None) as ws:
                got = 0
                while got < 20 * MiB:
                    got += len(ws.recv())
                    time.sleep(0.02)
            return got

        got, growth_kib = _peak_rss_while(gw, download)
        print(f"20 MiB from the upstream to a slow reader: RSS growth {growth_kib} KiB")
        assert got == 20 * MiB
        assert growth_kib < 8 * 1024
    finally:
        assert gw.stop() == 0


def test_idle_tunnel_is_closed_and_sigterm_drains(tmp_path, upstream):
    """When a tunnel is idle for websocket_idle_timeout it is closed; on SIGTERM an open tunnel keeps working within shutdown_grace, is then closed, and the process exits 0."""
    gw = Gateway(tmp_path, _yaml(upstream.url, "  websocket_idle_timeout: 1\n  shutdown_grace: 2\n"),
                 f"sqlite:///{tmp_path}/apigw.db")
    try:
        key = gw.create_key()["api_key"]
        with gw.connect("/ws/echo", key) as ws:
            started = time.monotonic()
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=5)
            idle_s = time.monotonic() - started
        assert 0.9 <= idle_s < 3, idle_s
        # Traffic keeps a tunnel open past the idle timeout.
        with gw.connect("/ws/echo", key) as busy:
            for i in range(8):
                busy.send(str(i))
                assert busy.recv() == str(i)
                time.sleep(0.25)
        # Reloaded, new tunnels idle out only after 30 s: what ends the next
        # one is the drain.
        gw.config.write_text(gw.config.read_text().replace(
            "websocket_idle_timeout: 1", "websocket_idle_timeout: 30"))
        gw.signal(signal.SIGHUP)
        wait_until(lambda: "config reloaded" in gw.log(), 10)
        with gw.connect("/ws/echo", key) as ws:
            gw.signal(signal.SIGTERM)
            stopping = time.monotonic()
            for i in range(3):
                time.sleep(0.25)  # within the grace
                ws.send(f"draining {i}")
                assert ws.recv() == f"draining {i}"
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
            closed_s = time.monotonic() - stopping
        assert 1.5 <= closed_s < 5, closed_s
        assert gw.proc.wait(timeout=15) == 0
    finally:
        gw.stop()
    records = [r for r in gw.records() if r["status"] == 101]
    assert len(records) == 3
    assert "Traceback" not in gw.log(), gw.log()
