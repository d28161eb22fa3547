"""Real loopback upstreams for integration tests.

`TestUpstream` is one twisted.web server whose behaviour is chosen by the
last path segment; it records every request and every TCP connection so
tests can count what reached it. `RawUpstream` speaks raw TCP for the
failure modes HTTP servers are too polite to produce.
"""

import gzip
import hashlib
import json
import socket

from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IPushProducer
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface import implementer

GZIPPED = gzip.compress(b'{"compressed": true}' * 50)


class _Recorder(Resource):
    isLeaf = True

    def __init__(self, upstream):
        super().__init__()
        self.upstream = upstream

    def render(self, request):
        body = request.content.read()
        seen = {
            "method": request.method.decode(),
            "uri": request.uri.decode("latin-1"),
            "headers": {
                k.decode().lower(): [v.decode("latin-1") for v in vs]
                for k, vs in request.requestHeaders.getAllRawHeaders()
            },
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "body_length": len(body),
        }
        self.upstream.requests.append(seen)
        action = request.path.rsplit(b"/", 1)[-1]
        handler = getattr(self, "do_" + action.decode("latin-1"), None)
        if handler is not None:
            return handler(request, seen)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(seen).encode()

    def do_status(self, request, seen):
        code = int(request.args.get(b"code", [b"200"])[0])
        request.setResponseCode(code)
        return json.dumps(seen).encode()

    def do_setcookie(self, request, seen):
        request.setHeader(b"set-cookie", b"session=secret-of-a; Path=/")
        return json.dumps(seen).encode()

    def do_gzip(self, request, seen):
        request.setHeader(b"content-encoding", b"gzip")
        request.setHeader(b"content-type", b"application/json")
        return GZIPPED

    def do_redirect(self, request, seen):
        request.setResponseCode(302)
        request.setHeader(b"location", b"/elsewhere")
        return b"moved"

    def do_hop(self, request, seen):
        request.setHeader(b"connection", b"X-Secret-Hop")
        request.setHeader(b"x-secret-hop", b"1")
        request.setHeader(b"keep-alive", b"timeout=5")
        request.setHeader(b"proxy-authenticate", b"Basic")
        request.setHeader(b"x-end-to-end", b"kept")
        return b"hop"

    def do_hang(self, request, seen):
        self.upstream.hanging.append(request)
        return server.NOT_DONE_YET

    def do_via(self, request, seen):
        # As if a cache sat between the gateway and this upstream.
        request.setHeader(b"via", b"1.1 cache-a")
        return b"via"

    def do_stream(self, request, seen):
        # No Content-Length: HTTP/1.1 chunks it, HTTP/1.0 ends it by closing.
        request.write(b"streamed")
        request.finish()
        return server.NOT_DONE_YET

    def do_nobody(self, request, seen):
        request.setResponseCode(204)
        return b""


class _CountingSite(server.Site):
    noisy = False

    def __init__(self, resource, upstream):
        super().__init__(resource)
        self.upstream = upstream

    def buildProtocol(self, addr):
        self.upstream.connections += 1
        return super().buildProtocol(addr)

    def log(self, request):
        pass


class TestUpstream:
    """An HTTP upstream on 127.0.0.1 with a free port."""

    __test__ = False

    def __init__(self):
        self.requests = []
        self.hanging = []
        self.connections = 0
        self.site = _CountingSite(_Recorder(self), self)
        self.port = None

    def start(self):
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        return self

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port.getHost().port}"

    def stop(self):
        for request in self.hanging:
            if not request.finished and not request._disconnected:
                request.channel.transport.abortConnection()
        return defer.maybeDeferred(self.port.stopListening)


@implementer(IPushProducer)
class _EndlessBody:
    """Chunks for as long as the reader takes them (bounded at 256 MiB)."""

    def __init__(self, transport):
        self.transport = transport
        self.sent = 0
        self.paused = False

    def resumeProducing(self):
        self.paused = False
        chunk = b"%x\r\n%s\r\n" % (65536, b"z" * 65536)
        while not self.paused and self.sent < 256 * 1024 * 1024:
            self.sent += 65536
            self.transport.write(chunk)

    def pauseProducing(self):
        self.paused = True

    def stopProducing(self):
        self.paused = True


class _Raw(protocol.Protocol):
    def connectionLost(self, reason):
        self.factory.lost += 1

    def connectionMade(self):
        self.factory.connections += 1
        mode = self.factory.mode
        if mode == "reset":
            self.transport.abortConnection()
        elif mode == "garbage":
            self.transport.write(b"this is not HTTP at all\r\n\r\n")
            self.transport.loseConnection()

    def dataReceived(self, data):
        if self.factory.mode == "stall":
            # Headers and the start of the body, then silence, connection open.
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"
            )
        if self.factory.mode == "cut":
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10
            )
            self.transport.loseConnection()
        mode = self.factory.mode
        if mode == "badchunk":
            self.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"zz\r\nhello\r\n0\r\n\r\n")
        elif mode in ("until-close-reset", "until-close-fin"):
            # A body whose end is the connection's end: FIN completes it,
            # a reset cuts it.
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"
                                 + b"x" * 10)
            if mode == "until-close-fin":
                self.transport.loseConnection()
            else:
                reactor.callLater(0.05, self.transport.abortConnection)
        elif mode == "huge-head":
            # 300 KB of header lines (bounded), then the connection stays open.
            self.transport.write(b"HTTP/1.1 200 OK\r\n" + b"".join(
                b"X-Filler-%d: %s\r\n" % (i, b"y" * 90) for i in range(3000)))
        elif mode == "endless-body":
            self.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            producer = _EndlessBody(self.transport)
            self.transport.registerProducer(producer, True)
            producer.resumeProducing()
        elif mode == "ws101":
            # Accepts a WebSocket handshake, then ends the tunnel.
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\n"
                                 b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
            reactor.callLater(0.05, self.transport.loseConnection)
        elif mode == "many-headers":
            self.transport.write(b"HTTP/1.1 200 OK\r\n" + b"".join(
                b"X-%d: a\r\n" % i for i in range(150)) + b"Content-Length: 0\r\n\r\n")


class RawUpstream(protocol.Factory):
    """reset: RST on connect; garbage: a non-HTTP answer; cut: body cut short;
    stall: body started, then silence; badchunk: a bad chunk size right after
    the head; until-close-fin / until-close-reset: a close-delimited body
    ended by FIN / cut by a reset; huge-head: header lines without end;
    many-headers: 150 header lines; endless-body: chunks while they are read;
    ws101: accepts a WebSocket handshake and ends the tunnel."""

    protocol = _Raw
    noisy = False

    def __init__(self, mode):
        self.mode = mode
        self.connections = 0
        self.lost = 0
        self.port = None

    def start(self):
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")
        return self

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port.getHost().port}"

    def stop(self):
        return defer.maybeDeferred(self.port.stopListening)


def refused_url():
    """A loopback URL where nothing listens."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"
