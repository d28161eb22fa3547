"""The demo upstreams behind the README quickstart: in process, then as a command."""

import json
import os
import selectors
import signal
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
