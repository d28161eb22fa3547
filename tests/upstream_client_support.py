"""Fixtures for tests/test_upstream_client.py: an in-memory endpoint, a body
collector, a twisted.web site and a scripted raw HTTP server on loopback."""

import hashlib

from httptools import HttpParserError, HttpRequestParser
from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import StringTransport
from twisted.web import server
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.resource import Resource
from zope.interface import implementer

from apigw.body import BytesProducer
from tests.upstreams import GZIPPED

BIG = bytes(range(256)) * (20 * 1024 * 1024 // 256)


class MemoryEndpoint:
    """Connects each attempt to a fresh StringTransport, or hangs when told."""

    def __init__(self):
        self.connections = []  # (protocol, transport)
        self.pending = []
        self.hang = False

    def connect(self, factory):
        if self.hang:
            d = defer.Deferred(lambda d: self.pending.remove(d))
            self.pending.append(d)
            return d
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.connections.append((proto, transport))
        return defer.succeed(proto)


class Collect(protocol.Protocol):
    """Gathers a response body; `done` fires with (bytes, reason Failure)."""

    def __init__(self, pause_at_start=False):
        self.chunks = []
        self.received = 0
        self.reason = None
        self.done = defer.Deferred()
        self._pause_at_start = pause_at_start

    def connectionMade(self):
        if self._pause_at_start:
            self.transport.pauseProducing()

    def dataReceived(self, data):
        self.chunks.append(data)
        self.received += len(data)

    def connectionLost(self, reason):
        self.reason = reason
        self.done.callback((b"".join(self.chunks), reason))

    @property
    def complete(self):
        return self.reason is not None and self.reason.check(ResponseDone, PotentialDataLoss)


class Bytes(BytesProducer):
    """The gateway's one-write body, counting its starts; `restartable` and
    `known_length` can be turned off to test the client's other paths."""

    def __init__(self, data, restartable=True, known_length=True):
        super().__init__(data)
        if not known_length:
            self.length = UNKNOWN_LENGTH
        self.restartable = restartable
        self.starts = 0

    def startProducing(self, consumer):
        self.starts += 1
        return super().startProducing(consumer)


@implementer(IBodyProducer)
class Stream:
    """Writes `total` bytes in 64 KiB pieces, one per reactor turn while not
    paused; remembers whether it was ever paused."""

    length = UNKNOWN_LENGTH

    def __init__(self, total, clock=reactor):
        self._total = total
        self._clock = clock
        self.sent = 0
        self.paused = False
        self.was_paused = False
        self.digest = hashlib.sha256()
        self._call = None
        self._done = None

    def startProducing(self, consumer):
        self._consumer = consumer
        self._done = defer.Deferred()
        self._schedule()
        return self._done

    def _schedule(self):
        if self._call is None and not self.paused:
            self._call = self._clock.callLater(0, self._step)

    def _step(self):
        self._call = None
        if self.paused or self._done is None:
            return
        piece = bytes([self.sent // 65536 % 256]) * min(65536, self._total - self.sent)
        self.sent += len(piece)
        self.digest.update(piece)
        self._consumer.write(piece)
        if self.sent >= self._total:
            done, self._done = self._done, None
            done.callback(None)
        else:
            self._schedule()

    def pauseProducing(self):
        self.paused = self.was_paused = True

    def resumeProducing(self):
        self.paused = False
        self._schedule()

    def stopProducing(self):
        self._done = None
        if self._call is not None:
            self._call.cancel()
            self._call = None


class _Site(Resource):
    isLeaf = True

    def render(self, request):
        action = request.path.rsplit(b"/", 1)[-1].decode()
        request.setHeader(b"x-seen-host", request.getHeader(b"host") or b"")
        return getattr(self, "do_" + action)(request)

    def do_fixed(self, request):
        request.setHeader(b"content-type", b"text/plain")
        request.setHeader(b"set-cookie", b"a=1")
        request.responseHeaders.addRawHeader(b"set-cookie", b"b=2")
        return b"fixed body\n" * 10

    def do_chunked(self, request):
        for piece in (b"one ", b"two ", b"three"):
            request.write(piece)
        request.finish()
        return server.NOT_DONE_YET

    def do_gzip(self, request):
        request.setHeader(b"content-encoding", b"gzip")
        return GZIPPED

    def do_nocontent(self, request):
        request.setResponseCode(204)
        return b""

    def do_big(self, request):
        return BIG

    def do_echo(self, request):
        body = request.content.read()
        request.setHeader(b"x-method", request.method)
        request.setHeader(b"x-te", request.getHeader(b"transfer-encoding") or b"-")
        return hashlib.sha256(body).hexdigest().encode() + b" %d" % len(body)

    def do_hang(self, request):
        self.hanging.append(request)
        return server.NOT_DONE_YET


class CountingSite(server.Site):
    """A twisted.web server on 127.0.0.1 that counts TCP connections."""

    noisy = False

    def __init__(self):
        self.resource = _Site()
        self.resource.hanging = []
        super().__init__(self.resource)
        self.connections = 0
        self.port = None

    def buildProtocol(self, addr):
        self.connections += 1
        return super().buildProtocol(addr)

    def log(self, request):
        pass

    def start(self):
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")
        return self

    @property
    def url(self):
        return b"http://127.0.0.1:%d" % self.port.getHost().port

    def stop(self):
        for request in self.resource.hanging:
            if not request.finished and not request._disconnected:
                request.channel.transport.abortConnection()
        return defer.maybeDeferred(self.port.stopListening)


class _ScriptedConnection(protocol.Protocol):
    def connectionMade(self):
        self.factory.connections += 1
        self.factory.open.append(self)
        self.served = 0
        self.parser = HttpRequestParser(self)
        self.lost = defer.Deferred()
        if self.factory.deaf_for_s:
            # Not reading: the client's writes back up into its own buffers.
            self.transport.pauseProducing()
            reactor.callLater(self.factory.deaf_for_s, self._listen)

    def _listen(self):
        if self.transport.connected:
            self.transport.resumeProducing()

    def dataReceived(self, data):
        try:
            self.parser.feed_data(data)
        except HttpParserError:
            self.transport.abortConnection()

    def on_message_begin(self):
        self.url = b""
        self.headers = []
        self.body = []

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers.append((name.lower(), value))

    def on_body(self, data):
        self.body.append(data)

    def on_message_complete(self):
        self.served += 1
        body = b"".join(self.body)
        self.factory.requests.append((self.parser.get_method(), self.url, self.headers, body))
        self.factory.routes[self.url](self, body)

    def connectionLost(self, reason):
        self.factory.open.remove(self)
        self.factory.closed += 1
        self.lost.callback(None)


class ScriptedServer(protocol.Factory):
    """Raw HTTP/1.1 on 127.0.0.1: `routes` maps a request target to a
    function(connection, body) that writes whatever bytes the test wants."""

    protocol = _ScriptedConnection
    noisy = False

    def __init__(self, routes):
        self.routes = routes
        self.requests = []
        self.open = []
        self.connections = 0
        self.closed = 0
        self.deaf_for_s = 0
        self.port = None

    def start(self):
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")
        return self

    @property
    def url(self):
        return b"http://127.0.0.1:%d" % self.port.getHost().port

    def stop(self):
        for conn in list(self.open):
            conn.transport.abortConnection()
        return defer.maybeDeferred(self.port.stopListening)


def reply(raw, close=False):
    """A route answering with fixed bytes, closing afterwards if told."""

    def route(conn, body):
        conn.transport.write(raw)
        if close:
            conn.transport.loseConnection()

    return route


class _Firehose:
    """Server side of a big body: writes while the socket takes it."""

    def __init__(self, transport, total):
        self.transport = transport
        self.left = total
        self.paused = False
        transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self):
        self.paused = False
        while not self.paused and self.left:
            piece = min(self.left, 256 * 1024)
            self.left -= piece
            self.transport.write(b"z" * piece)
        if not self.left:
            self.transport.unregisterProducer()

    def pauseProducing(self):
        self.paused = True

    def stopProducing(self):
        self.left = 0


def firehose(total):
    """A route streaming `total` bytes of body under backpressure."""

    def route(conn, body):
        conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        conn.firehose = _Firehose(conn.transport, total)

    return route


def self_signed():
    """A throwaway key and certificate for 127.0.0.1, as PEM bytes."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)
