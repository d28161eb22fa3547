"""Shared test helpers: a gateway on a free loopback port and an HTTP client
that shows exactly what came over the wire (no decoding, no redirects)."""

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import attr
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
import treq

from apigw.config import Environment, parse_config
from apigw.service import GatewayService
from apigw.body import BytesProducer
# For what twistd subprocesses print: the in-process log guard cannot see it.
from tests.secrets_guard import assert_no_secrets, register_secret  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


@attr.s(auto_attribs=True)
class Reply:
    code: int
    headers: Headers
    body: bytes

    def header(self, name):
        values = self.headers.getRawHeaders(name)
        return values[0].decode("latin-1") if values else None

    def json(self):
        return json.loads(self.body)


_PRIVATE_ROOT = []


def private_dir():
    """A fresh directory of its own (a gateway's SQLite file), removed with
    the others when the test run ends."""
    if not _PRIVATE_ROOT:
        root = tempfile.mkdtemp(prefix="apigw-tests-")
        atexit.register(shutil.rmtree, root, True)
        _PRIVATE_ROOT.append(root)
    return tempfile.mkdtemp(dir=_PRIVATE_ROOT[0])


async def start_gateway(yaml_text, env=None, **kwargs):
    """A started GatewayService on 127.0.0.1:<free>; returns (service, base URL)."""
    if env is None:
        # A private SQLite file: never the repository's apigw.db.
        env = Environment(database_url=f"sqlite:///{private_dir()}/apigw.db")
    config = parse_config(yaml_text, "test.yaml", env)
    service = GatewayService(config, port="tcp:0:interface=127.0.0.1", **kwargs)
    service.startService()
    port = await service.when_listening()
    return service, f"http://127.0.0.1:{port.getHost().port}"


async def http(method, url, headers=None, body=None, pool=None):
    """One request over a fresh connection unless a pool is given."""
    agent = Agent(reactor, pool=pool or HTTPConnectionPool(reactor, persistent=False))
    h = Headers({k: [v] for k, v in (headers or {}).items()})
    producer = BytesProducer(body) if body is not None else None
    if isinstance(method, str):
        method = method.encode()
    if isinstance(url, str):
        url = url.encode()
    response = await agent.request(method, url, h, producer)
    data = await treq.content(response)
    return Reply(response.code, response.headers, data)


class _Collect(protocol.Protocol):
    def __init__(self):
        self.data = b""
        self.done = defer.Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.done.callback(self.data)


async def raw_exchange(port, payload, timeout_s=5):
    """Send raw bytes, read until the server closes (or timeout)."""
    proto = _Collect()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    proto.transport.write(payload)
    timer = reactor.callLater(timeout_s, proto.transport.loseConnection)
    data = await proto.done
    if timer.active():
        timer.cancel()
    return data


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for_port(port, timeout_s=15, proc=None):
    """Blocking wait, for tests that drive subprocesses outside the reactor."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listened on {port} within {timeout_s}s")


def run_twistd(args, cwd, env=None, **kwargs):
    """Start `twistd -n apigw ...` as a user would; caller terminates it by PID."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "apigw", *args],
        cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs
    )
