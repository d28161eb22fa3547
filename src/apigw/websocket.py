"""WebSocket: the handshake goes through the pipeline like any request; on
the upstream's 101 the two connections are joined byte for byte.

Frames are never parsed: after the 101 the gateway copies bytes, so
extensions (permessage-deflate) and subprotocols stay between the client
and the upstream. Each end of the tunnel is the push producer of the other
end's transport: when the client reads slower than the upstream sends, the
client's socket buffer fills, its transport pauses the upstream's reading,
and the upstream's TCP window closes; the same holds the other way. The
gateway buffers no more than a transport's write buffer per direction.

A tunnel ends when either side closes (the other is then closed once its
pending bytes are out), when no byte went either way for
`websocket_idle_timeout`, or when the gateway shuts down (the drain waits
for tunnels like any request in flight, up to `shutdown_grace`).
"""

from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from apigw._twisted_compat import start_response
from apigw.headers import add_gateway_pairs, connection_tokens, switching_header_pairs

log = Logger()

TUNNELED = "tunneled"
# How long a closing tunnel may take to flush what one side still owes the
# other before it is cut.
CLOSE_GRACE_S = 5.0


def is_handshake(request):
    """A WebSocket opening handshake (RFC 6455 4.1): an HTTP/1.1 GET with
    Upgrade: websocket and Connection: upgrade."""
    if request.method != b"GET" or request.clientproto != b"HTTP/1.1":
        return False
    headers = request.requestHeaders
    return (b"websocket" in connection_tokens(headers.getRawHeaders(b"upgrade"))
            and b"upgrade" in connection_tokens(headers.getRawHeaders(b"connection")))


class Tunnels:
    """The open tunnels of one process: started by the pipeline, watched
    for idleness by its watchdog, counted in gateway_websocket_connections."""

    def __init__(self, accounting, metrics, watchdog, clock):
        self._accounting = accounting
        self._metrics = metrics
        self._watchdog = watchdog
        self._clock = clock
        self.open = set()

    async def run(self, request, response, extra_headers, outcome, idle_timeout_s):
        """Relay the upstream's 101 (`response`), join the connections, and
        return TUNNELED once both are closed, with `outcome` filled in."""
        if request.client_gone:
            response.stopProducing()
            return TUNNELED
        pairs = switching_header_pairs(response.raw_headers)
        add_gateway_pairs(pairs, extra_headers, request.request_id)
        # Not request.start_response: nothing twisted.web queued for this
        # request (Connection: close while draining) belongs on a 101.
        start_response(request, 101, response.phrase or b"Switching Protocols",
                       [name + b": " + value + b"\r\n" for name, value in pairs], False)
        self._accounting.upgraded(outcome)
        tunnel = _Tunnel(self._clock, idle_timeout_s, request.request_id)
        request.channel.switch_protocol(tunnel.client)
        response.take_over(tunnel.upstream)
        tunnel.start()
        gauge = self._metrics.websocket_connections.labels(outcome.service)
        gauge.inc()
        self.open.add(tunnel)
        self._watchdog.watch(tunnel)
        try:
            await tunnel.done
        finally:
            self._watchdog.forget(tunnel)
            self.open.discard(tunnel)
            gauge.dec()
            outcome.tunnel_closed_s = self._clock.seconds()
            outcome.bytes_received = tunnel.client.bytes_read
            outcome.bytes_sent = tunnel.upstream.bytes_read
        return TUNNELED

    def close_all(self):
        """Cut every open tunnel (shutdown, once the grace is over)."""
        for tunnel in list(self.open):
            tunnel.abort()


class _Tunnel:
    """Two ends, each reading its own connection and writing to the other's."""

    def __init__(self, clock, idle_timeout_s, request_id):
        self._clock = clock
        self._idle_timeout_s = idle_timeout_s
        self._request_id = request_id
        self.client = _End(self, "client")
        self.upstream = _End(self, "upstream")
        self.client.other, self.upstream.other = self.upstream, self.client
        self.last_active = clock.seconds()
        self._closing_since = None
        # Cancelled only if the pipeline gives up on the request: cut both.
        self.done = defer.Deferred(lambda d: self.abort())

    def start(self):
        for end in (self.client, self.upstream):
            # Writes to one end's transport pause the other end's reading.
            end.other.transport.registerProducer(end, True)
            # The client's may still be paused by twisted.web, which stops
            # reading while a request is handled.
            end.transport.resumeProducing()

    def active(self):
        self.last_active = self._clock.seconds()

    def end_lost(self, end):
        other = end.other
        if not other.lost:
            # Once what it still owes the other side is written.
            self._closing_since = self._clock.seconds()
            other.transport.loseConnection()
            return
        if not self.done.called:
            self.done.callback(None)

    def abort(self):
        for end in (self.client, self.upstream):
            if not end.lost:
                end.transport.abortConnection()

    def check_deadline(self, now):
        if self._closing_since is not None:
            if now - self._closing_since >= CLOSE_GRACE_S:
                self.abort()
        elif now - self.last_active >= self._idle_timeout_s:
            log.info("request {request_id}: WebSocket tunnel idle for {timeout}s; closing it",
                     request_id=self._request_id, timeout=self._idle_timeout_s)
            self._closing_since = now
            for end in (self.client, self.upstream):
                end.transport.loseConnection()


@implementer(IPushProducer, IHalfCloseableProtocol)
class _End(Protocol):
    """One end of a tunnel: the protocol of its own connection and the
    producer registered with the other end's transport."""

    def __init__(self, tunnel, name):
        self._tunnel = tunnel
        self.name = name
        self.other = None
        self.bytes_read = 0
        self.lost = False

    def dataReceived(self, data):
        self.bytes_read += len(data)
        self._tunnel.active()
        if not self.other.lost:
            self.other.transport.write(data)

    def readConnectionLost(self):
        # This side said all it will say: so do we, to the other side,
        # which may still answer (the client's half of a TCP half-close).
        lose_write = getattr(self.other.transport, "loseWriteConnection", None)
        if lose_write is not None and not self.other.lost:
            lose_write()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self):
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self.lost = True
        self._tunnel.end_lost(self)

    # IPushProducer: the other end's transport is full, or has room again.

    def pauseProducing(self):
        if not self.lost:
            self.transport.pauseProducing()

    def resumeProducing(self):
        if not self.lost:
            self.transport.resumeProducing()

    def stopProducing(self):
        if not self.lost:
            self.transport.loseConnection()
