"""The demo upstreams behind the README quickstart: in process, then as a command."""

import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred

from apigw.demo import start_backends

COMMAND_TIMEOUT_S = 20


async def _get_json(url, method="GET", data=None):
    response = await treq.request(method, url, data=data, persistent=False, reactor=reactor)
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    return response.code, json.loads(await response.text())


@pytest_twisted.ensureDeferred
async def test_test_path_greets_like_the_seed_services():
    """When GET /test reaches either demo service, it answers JSON naming that service."""
    listening = await start_backends(reactor, {"service1": 0, "service2": 0})
    try:
        for name, port in listening.items():
            code, body = await _get_json(f"http://127.0.0.1:{port.getHost().port}/test")
            assert code == 200
            assert body == {"service": name, "message": f"Hello from {name}"}
    finally:
        for port in listening.values():
            await maybeDeferred(port.stopListening)


@pytest_twisted.ensureDeferred
async def test_other_requests_are_echoed():
    """When any other request arrives, the answer echoes its method, raw path, query and body size."""
    listening = await start_backends(reactor, {"service2": 0})
    port = listening["service2"].getHost().port
    try:
        code, body = await _get_json(
            f"http://127.0.0.1:{port}/a/b%2Fc?x=1&y=%20", method="POST", data=b"12345"
        )
    finally:
        await maybeDeferred(listening["service2"].stopListening)
    assert code == 200
    assert body["service"] == "service2"
    assert (body["method"], body["path"], body["query"]) == ("POST", "/a/b%2Fc", "x=1&y=%20")
    assert body["body_length"] == 5
    assert body["headers"]["host"] == [f"127.0.0.1:{port}"]


def _read_ready_lines(proc, count, deadline):
    # Raw reads: a buffered readline could swallow the second line into a
    # buffer that select() no longer sees.
    seen = b""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while seen.count(b"\n") < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"demo printed only {seen!r}"
            if selector.select(remaining):
                chunk = os.read(proc.stdout.fileno(), 4096)
                assert chunk, f"demo exited early ({proc.wait(5)}) after {seen!r}"
                seen += chunk
    return seen.decode().splitlines()[:count]


@pytest.mark.slow
def test_command_serves_on_chosen_ports_and_stops_on_sigterm():
    """When `python -m apigw.demo --port1 0 --port2 0` runs, both services answer /test and SIGTERM ends it with status 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "apigw.demo", "--port1", "0", "--port2", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        lines = _read_ready_lines(proc, 2, time.monotonic() + COMMAND_TIMEOUT_S)
        urls = dict(line.split(" listening on ") for line in lines)
        assert set(urls) == {"service1", "service2"}
        for name, url in urls.items():
            assert url.startswith("http://127.0.0.1:")
            with urllib.request.urlopen(f"{url}/test", timeout=COMMAND_TIMEOUT_S) as answer:
                assert json.load(answer) == {"service": name, "message": f"Hello from {name}"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(COMMAND_TIMEOUT_S) == 0, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(COMMAND_TIMEOUT_S)
        proc.stdout.close()
        proc.stderr.close()


# `make demo` itself, with this interpreter's environment standing in for the
# Makefile's .venv (-o: never install anything from a test).
VENV = os.path.dirname(os.path.dirname(sys.executable))
MAKEFILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Makefile")


def _make_demo(cwd, **ports):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "MASTER_KEY")}
    env["DATABASE_URL"] = f"sqlite:///{cwd}/apigw.db"
    env.update({name: str(port) for name, port in ports.items()})
    return subprocess.Popen(
        ["make", "-s", "-f", MAKEFILE, "-o", f"{VENV}/.installed-demo", f"VENV={VENV}", "demo"],
        cwd=str(cwd), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True,
    )


def _stop_group(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(COMMAND_TIMEOUT_S)
    out, err = proc.communicate()
    return out.decode(), err.decode()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url, data=None, headers=None):
    request = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(request, timeout=COMMAND_TIMEOUT_S) as answer:
        return json.load(answer)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_on_chosen_ports_beside_a_daemons_pidfile(tmp_path):
    """When make demo runs with DEMO_* ports next to a running daemon's twistd.pid, the gateway serves the demo on 127.0.0.1 with the demo key and leaves the pidfile alone."""
    # What `twistd apigw` (daemonized) leaves in the folder: a live PID.
    (tmp_path / "twistd.pid").write_text(str(os.getpid()))
    gateway, one, two = _free_port(), _free_port(), _free_port()
    proc = _make_demo(tmp_path, DEMO_PORT=gateway, DEMO_SERVICE1_PORT=one, DEMO_SERVICE2_PORT=two)
    try:
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        while True:
            assert proc.poll() is None, _stop_group(proc)
            try:
                socket.create_connection(("127.0.0.1", gateway), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the demo gateway never listened"
                time.sleep(0.1)
        created = _call(f"http://127.0.0.1:{gateway}/admin/generate_key", b'{"owner": "demo"}',
                        {"X-Master-Key": "supersecret", "Content-Type": "application/json"})
        for name in ("service1", "service2"):
            assert _call(f"http://127.0.0.1:{gateway}/{name}/test",
                         headers={"X-API-Key": created["api_key"]})["service"] == name
    finally:
        out, err = _stop_group(proc)
    assert (tmp_path / "twistd.pid").read_text() == str(os.getpid())
    assert f"listeners: public tcp:{gateway}:interface=127.0.0.1" in out
    assert f"service1 listening on http://127.0.0.1:{one}" in out
    assert "demo key" in out and "this demo only" in out
    assert "Traceback" not in out + err


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_stops_when_an_upstream_port_is_taken(tmp_path):
    """When a demo upstream's port is in use, make demo fails at once with a clear line and starts no gateway."""
    gateway = _free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        proc = _make_demo(tmp_path, DEMO_PORT=gateway, DEMO_SERVICE1_PORT=0, DEMO_SERVICE2_PORT=busy)
        try:
            proc.wait(COMMAND_TIMEOUT_S)
        finally:
            out, err = _stop_group(proc)
    assert proc.returncode != 0
    assert f"cannot listen on 127.0.0.1:{busy}" in err
    assert "the demo upstreams did not start" in err
    assert "starting up" not in out and "listeners:" not in out  # no twistd ran
    assert "Traceback" not in out + err
