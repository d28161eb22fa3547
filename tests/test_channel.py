"""The client connection: HTTP/1.0 keep-alive, over raw sockets."""

import socket

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.helpers import start_gateway
from tests.upstreams import TestUpstream

TIMEOUT_S = 5


@pytest_twisted.async_yield_fixture
async def gateway():
    upstream = TestUpstream().start()
    service, _ = await start_gateway(f"services:\n  pub:\n    url: {upstream.url}\n    auth: false\n")
    port = (await service.when_listening()).getHost().port
    yield port
    await service.stopService()
    await upstream.stop()


class _Client:
    """A blocking HTTP client on one socket; run it in a thread."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
        self.buffer = b""

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the gateway closed the connection")
        self.buffer += data

    def exchange(self, path, headers=b"Connection: keep-alive\r\n"):
        """Send one HTTP/1.0 GET; returns (head lines lowercased, body)."""
        self.sock.sendall(b"GET " + path + b" HTTP/1.0\r\nHost: gw\r\n" + headers + b"\r\n")
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.lower().split(b"\r\n")
        fields = dict(line.split(b": ", 1) for line in lines[1:])
        if b"content-length" in fields:
            length = int(fields[b"content-length"])
            while len(self.buffer) < length:
                self._fill()
            body, self.buffer = self.buffer[:length], self.buffer[length:]
        else:
            try:
                while True:
                    self._fill()
            except EOFError:
                pass
            body, self.buffer = self.buffer, b""
        return lines, fields, body

    def is_open(self):
        """True if the server has not closed the connection (nothing arrives within 0.3 s)."""
        self.sock.settimeout(0.3)
        try:
            return self.sock.recv(1) != b""
        except socket.timeout:
            return True
        finally:
            self.sock.settimeout(TIMEOUT_S)

    def close(self):
        self.sock.close()


def _two_on_one_connection(port, path):
    client = _Client(port)
    try:
        answers = [client.exchange(path) for _ in range(2)]
        return answers, client.is_open()
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_http10_keep_alive_to_the_gateways_own_answer(gateway):
    """When an HTTP/1.0 client asks for keep-alive, /healthz answers twice on one connection, saying keep-alive."""
    answers, still_open = await deferToThread(_two_on_one_connection, gateway, b"/healthz")
    for lines, fields, body in answers:
        assert lines[0].startswith(b"http/1.0 200")
        assert fields[b"connection"] == b"keep-alive"
        assert body == b'{"status": "ok"}'
    assert still_open


@pytest_twisted.ensureDeferred
async def test_http10_keep_alive_to_a_proxied_answer_with_length(gateway):
    """When a relayed answer has a Content-Length, an HTTP/1.0 keep-alive connection carries two of them."""
    answers, still_open = await deferToThread(_two_on_one_connection, gateway, b"/pub/x")
    for lines, fields, body in answers:
        assert lines[0].startswith(b"http/1.0 200")
        assert fields[b"connection"] == b"keep-alive"
        assert int(fields[b"content-length"]) == len(body) > 0
    assert still_open


def _one(port, path, headers=b"Connection: keep-alive\r\n"):
    client = _Client(port)
    try:
        lines, fields, body = client.exchange(path, headers)
        return lines, fields, body, client.is_open()
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_http10_proxied_answer_without_length_still_closes(gateway):
    """When a relayed answer has no Content-Length, an HTTP/1.0 client gets the body ended by a close."""
    lines, fields, body, still_open = await deferToThread(_one, gateway, b"/pub/stream")
    assert lines[0].startswith(b"http/1.0 200")
    assert b"content-length" not in fields and b"transfer-encoding" not in fields
    assert fields.get(b"connection") != b"keep-alive"
    assert body == b"streamed"
    assert not still_open


@pytest_twisted.ensureDeferred
async def test_http10_without_keep_alive_closes(gateway):
    """When an HTTP/1.0 client does not ask for keep-alive, the connection closes after the answer."""
    lines, fields, body, still_open = await deferToThread(_one, gateway, b"/healthz", b"")
    assert lines[0].startswith(b"http/1.0 200")
    assert fields.get(b"connection") != b"keep-alive"
    assert not still_open
