"""A gateway in memory for tests: a GatewayService on a MemoryReactorClock,
an upstream client the test answers, and client connections over a
StringTransport."""

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from apigw.body import BytesProducer
from apigw.config import Environment, parse_config
from apigw.service import GatewayService
from tests.helpers import private_dir


class FakeResponse:
    """What the upstream client hands back, answered by the test."""

    def __init__(self, code, body=b"", headers=()):
        self.code = code
        self.phrase = b"OK" if code == 200 else b"Service Unavailable"
        self.raw_headers = [(b"Content-Length", b"%d" % len(body)), *headers]
        self.length = len(body)
        self._body = body

    def deliverBody(self, protocol):
        protocol.makeConnection(BytesProducer(b""))
        if self._body:
            protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))


class FakeClient:
    """The upstream client contract; each request waits for the test."""

    def __init__(self):
        self.requests = []
        self.bodies = []  # each request's body, None for none at all

    def request(self, target, method, path, header_pairs, body_producer=None):
        self.bodies.append(_body_of(body_producer))
        d = defer.Deferred()
        self.requests.append((target, method, path, dict(header_pairs), d))
        return d

    def close_idle(self):
        return defer.succeed(None)


def gateway_service(yaml_text, clock, client, **kwargs):
    env = Environment(database_url=f"sqlite:///{private_dir()}/gw.db")
    config = parse_config(yaml_text, "test.yaml", env)
    return GatewayService(config, port="tcp:0", reactor=MemoryReactorClock(), clock=clock,
                         client=client, **kwargs)


def connect(site):
    channel = site.buildProtocol(IPv4Address("TCP", "10.0.0.7", 50000))
    transport = StringTransport(hostAddress=IPv4Address("TCP", "10.0.0.1", 8000),
                                peerAddress=IPv4Address("TCP", "10.0.0.7", 50000))
    channel.makeConnection(transport)
    return channel, transport


class _Collect:
    def __init__(self):
        self.data = b""

    def write(self, data):
        self.data += data


def _body_of(producer):
    """The bytes a small-body producer writes (its length for another)."""
    if producer is None:
        return None
    if isinstance(producer, BytesProducer):
        collect = _Collect()
        producer.startProducing(collect)
        return collect.data
    return producer.length
