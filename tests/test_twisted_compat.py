"""Pins the Twisted behaviour behind each function of apigw._twisted_compat.

A Twisted release that renames or reworks what one of them leans on fails
here, under the function's name, before anything in the request path.
"""

import os
import signal
import socket
import stat
import sys

import pytest

from twisted.application import app
from twisted.internet import protocol, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.base import ReactorBase
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.scripts.twistd import ServerOptions
from twisted.web import http, server
from twisted.web.resource import Resource

from apigw._twisted_compat import (
    clear_exit_signal, closing, dispatch_without_log_context, request_line, start_response,
    take_unread_bytes, write_at_once,
)
from apigw.worker import InheritedSocketEndpoint, _InheritedTCPPort, _InheritedUNIXPort


def _channel(site):
    """A connected HTTPChannel of `site`, on an in-memory transport."""
    site.protocol = http.HTTPChannel  # as GatewaySite: no HTTP/2 negotiation wrapper
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


# --- start_response -------------------------------------------------------------

class _Head(Resource):
    isLeaf = True

    def __init__(self, chunked):
        super().__init__()
        self.chunked = chunked

    def render_GET(self, request):
        lines = [b"X-Up: 1\r\n"]
        if not self.chunked:
            lines.append(b"Content-Length: 5\r\n")
        start_response(request, 201, b"Made", lines, self.chunked)
        request.write(b"hel")
        request.write(b"lo")
        request.finish()
        return server.NOT_DONE_YET


def test_start_response_leaves_body_framing_and_finish_to_twisted():
    """When the head is written by start_response, later writes are framed by
    `chunked`, finish() ends the body, and the connection takes the next request."""
    for chunked, body in [(True, b"3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n"), (False, b"hello")]:
        clock = MemoryReactorClock()
        channel, transport = _channel(server.Site(_Head(chunked), reactor=clock))
        channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        length = b"" if chunked else b"Content-Length: 5\r\n"
        assert transport.value() == b"HTTP/1.1 201 Made\r\nX-Up: 1\r\n" + length + b"\r\n" + body
        transport.clear()
        channel.dataReceived(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        assert transport.value().startswith(b"HTTP/1.1 201 Made\r\n")
        assert not transport.disconnecting


# --- clear_exit_signal ----------------------------------------------------------

class _SigtermedReactor(ReactorBase):
    """A reactor whose run() gets twistd's SIGTERM handling and then shuts
    down as apigw's service does, optionally clearing the exit signal."""

    def __init__(self, clear):
        super().__init__()
        self.clear = clear

    def installWaker(self):
        pass

    def run(self):
        self.sigTerm(signal.SIGTERM, None)  # the handler twistd installs
        if self.clear:
            clear_exit_signal(self, signal.SIGTERM)


def test_clear_exit_signal_leaves_twistd_nothing_to_reraise():
    """When SIGTERM stopped the reactor, twistd's runner records it to re-raise
    at exit; after clear_exit_signal it records nothing."""
    config = ServerOptions()
    config["nodaemon"] = True
    for clear, recorded in [(False, signal.SIGTERM), (True, None)]:
        runner = app.ApplicationRunner(config)
        runner.startReactor(_SigtermedReactor(clear), sys.stdout, sys.stderr)
        # What twisted.scripts.twistd.runApp re-raises with _exitWithSignal.
        assert runner._exitSignal == recorded


# --- request_line ---------------------------------------------------------------

class _AnsweredOnHeaders(http.Request):
    """Reads the request line as GatewayChannel.answer_early does: when the
    declared length is known, before any of the body."""

    line = None
    drop_expect = True

    def gotLength(self, length):
        self.line = request_line(self.channel)
        if self.drop_expect:
            self.requestHeaders.removeHeader(b"expect")
        super().gotLength(length)


def test_request_line_is_known_when_the_length_is():
    """When gotLength() runs, the channel holds the parsed request line, and
    it reads Expect: 100-continue only afterwards (so a request refused there
    can go without the invitation)."""
    for drop_expect, written in [(True, b""), (False, b"HTTP/1.1 100 Continue\r\n\r\n")]:
        clock = MemoryReactorClock()
        site = server.Site(Resource(), reactor=clock)
        site.requestFactory = type("R", (_AnsweredOnHeaders,), {"drop_expect": drop_expect})
        channel, transport = _channel(site)
        channel.dataReceived(b"POST /up/load?x=1 HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: 9\r\nExpect: 100-continue\r\n\r\n")
        (request,) = channel.requests
        assert request.line == (b"POST", b"/up/load?x=1", b"HTTP/1.1")
        assert transport.value() == written


# --- adopt_listening_port, listen_on_adopted_unix_socket -----------------------
# Through the worker's own endpoint, which calls both.

class _Accepted(protocol.Factory):
    protocol = protocol.Protocol

    def __init__(self):
        self.transports = []

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        p.connectionMade = lambda: self.transports.append(p.transport)
        return p

    def close_all(self):
        for transport in self.transports:
            transport.getHandle().close()


def _adopt(family, address, description):
    """Bind and listen like the supervisor, then adopt like a worker."""
    owner = socket.socket(family, socket.SOCK_STREAM)
    owner.bind(address)
    if family == socket.AF_UNIX:
        os.chmod(address, 0o600)  # not unix.Port's default of 0o666
    owner.listen(16)
    owner.setblocking(False)
    clock = MemoryReactorClock()
    factory = _Accepted()
    endpoint = InheritedSocketEndpoint(clock, description, os.dup(owner.fileno()))
    ports = []
    endpoint.listen(factory).addCallback(ports.append)
    return owner, clock, factory, ports[0]


def _connect(family, address):
    client = socket.socket(family, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(address)
    return client


def _still_accepting(owner):
    """The supervisor's socket takes a new connection after the port closed."""
    client = _connect(owner.family, owner.getsockname())
    try:
        owner.setblocking(True)
        owner.settimeout(5)
        accepted, _ = owner.accept()
        accepted.close()
        return True
    finally:
        client.close()


def test_adopted_tcp_port_accepts_one_per_wakeup_and_leaves_the_socket():
    """When a worker adopts the supervisor's TCP socket, the port is its own
    class over that very socket, takes one connection per wakeup, and closing
    it neither shuts the socket down nor stops it accepting."""
    owner, clock, factory, port = _adopt(
        socket.AF_INET, ("127.0.0.1", 0), "tcp:0:interface=127.0.0.1")
    clients = []
    try:
        assert type(port) is _InheritedTCPPort
        assert port.getHost().port == owner.getsockname()[1]
        clients = [_connect(socket.AF_INET, owner.getsockname()) for _ in range(3)]
        port.doRead()
        assert len(factory.transports) == 1
        port.doRead()
        assert len(factory.transports) == 2
        port.stopListening()
        clock.advance(0)
        assert _still_accepting(owner)
    finally:
        factory.close_all()
        for client in clients:
            client.close()
        owner.close()


def test_adopted_unix_port_leaves_path_mode_and_socket_to_their_owner(tmp_path, monkeypatch):
    """When a worker adopts the supervisor's UNIX socket, the port reserves the
    descriptor it sheds clients with on EMFILE, takes one connection per wakeup,
    makes no lock file, does not chmod the path, and closing it removes nothing
    and leaves the socket accepting."""
    # A reservation of this test's own, so that one made earlier elsewhere
    # cannot stand in for the port's.
    reservation = tcp._FileDescriptorReservation(lambda: open(os.devnull))
    monkeypatch.setattr(tcp, "_reservedFD", reservation)
    path = str(tmp_path / "gw.sock")
    owner, clock, factory, port = _adopt(socket.AF_UNIX, path, f"unix:{path}")
    clients = []
    try:
        assert reservation.available()
        assert type(port) is _InheritedUNIXPort
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert not os.path.exists(path + ".lock")
        clients = [_connect(socket.AF_UNIX, path) for _ in range(2)]
        port.doRead()
        assert len(factory.transports) == 1
        port.stopListening()
        clock.advance(0)
        assert os.path.exists(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert _still_accepting(owner)
    finally:
        factory.close_all()
        for client in clients:
            client.close()
        owner.close()
        if reservation.available():
            reservation.__enter__()  # closes the reserved file


# --- take_unread_bytes ------------------------------------------------------------

class _Pending(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = []

    def render_GET(self, request):
        self.requests.append(request)
        return server.NOT_DONE_YET


def test_take_unread_bytes_gets_what_arrived_while_a_request_was_handled():
    """When bytes follow a request the channel is still handling (in the same
    read and later ones), take_unread_bytes returns them all, in order, and the
    channel keeps none to replay as another request."""
    clock = MemoryReactorClock()
    resource = _Pending()
    channel, transport = _channel(server.Site(resource, reactor=clock))
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x81\x02hi")
    channel.dataReceived(b"\x81\x03you")
    assert len(resource.requests) == 1
    assert take_unread_bytes(channel) == b"\x81\x02hi\x81\x03you"
    assert take_unread_bytes(channel) == b""


# --- write_at_once ---------------------------------------------------------------

def _connected_tcp():
    """A tcp.Connection over one end of a socket pair (the other end returned),
    on a reactor that only records which descriptors want to write."""
    ours, theirs = socket.socketpair()
    theirs.settimeout(5)
    reactor = MemoryReactor()
    transport = tcp.Connection(ours, protocol.Protocol(), reactor)
    transport.connected = 1
    return transport, theirs, reactor


def _received(peer, size):
    data = b""
    while len(data) < size:
        data += peer.recv(size - len(data))
    return data


def test_write_at_once_sends_on_an_idle_connection_and_queues_behind_waiting_bytes():
    """When nothing waits in a TCP transport, write_at_once sends at once and
    leaves the transport idle; when something waits, it queues behind it as
    write() would, and the reactor sends both, in order."""
    transport, peer, reactor = _connected_tcp()
    try:
        write_at_once(transport, b"first")
        assert _received(peer, 5) == b"first"
        assert transport not in reactor.getWriters()
        assert not transport._tempDataLen and transport.offset == len(transport.dataBuffer)
        transport.write(b"waiting,")
        write_at_once(transport, b"second")
        assert transport in reactor.getWriters()
        assert transport.doWrite() is None
        assert _received(peer, 14) == b"waiting,second"
        assert transport not in reactor.getWriters()
    finally:
        transport.socket.close()
        peer.close()


def test_closing_says_so_from_the_abort_or_close_call_on():
    """A TCP transport reads as closing from the moment abortConnection() or
    loseConnection() is called, while it still says it is connected; and
    write_at_once sends nothing on an aborted one."""
    for close in ("abortConnection", "loseConnection"):
        ours, theirs = socket.socketpair()
        try:
            transport = tcp.Connection(ours, protocol.Protocol(), MemoryReactorClock())
            transport.connected = 1
            assert not closing(transport)
            getattr(transport, close)()
            assert transport.connected and closing(transport)
            write_at_once(transport, b"late")
            theirs.setblocking(False)
            with pytest.raises(BlockingIOError):
                theirs.recv(10)
        finally:
            ours.close()
            theirs.close()


def test_write_at_once_leaves_a_full_or_closing_connection_to_write():
    """When the socket takes only part of the bytes, the rest waits in the
    transport for the reactor and arrives whole; once the transport is
    closing, bytes go through write() and are not sent by the call."""
    transport, peer, reactor = _connected_tcp()
    try:
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = os.urandom(1 << 20)
        write_at_once(transport, big)
        assert transport in reactor.getWriters()
        assert 0 < transport._tempDataLen < len(big)
        received = b""
        while len(received) < len(big):
            received += peer.recv(1 << 20)
            transport.doWrite()
        assert received == big
        assert transport not in reactor.getWriters()
        transport.loseConnection()
        write_at_once(transport, b"late")
        assert transport._tempDataLen == 4
    finally:
        transport.socket.close()
        peer.close()


# --- dispatch_without_log_context -------------------------------------------------

class _Echo(protocol.Protocol):
    def dataReceived(self, data):
        if data == b"boom":
            raise RuntimeError("the handler failed")
        self.transport.write(data)


def _turn_until(reactor, done, turns=100):
    for _ in range(turns):
        if done():
            return
        reactor.runUntilCurrent()
        reactor.doIteration(0.02)
    raise AssertionError("the reactor never got there")


def _reader(sock):
    got = []

    def read():
        try:
            got.append(sock.recv(100))
        except BlockingIOError:
            return False
        return True
    return got, read


def test_dispatch_without_log_context_hands_each_event_to_its_handler(monkeypatch):
    """An epoll reactor so changed accepts, reads and writes without ever
    calling callWithLogger; a protocol that raises is disconnected and its
    error logged, as the stock doPoll() does, and the others go on."""
    from twisted.internet.epollreactor import EPollReactor
    from twisted.logger import globalLogPublisher
    from twisted.python import log as legacy_log

    reactor = EPollReactor()
    assert dispatch_without_log_context(reactor)
    monkeypatch.setattr(legacy_log, "callWithLogger",
                        lambda *a, **kw: pytest.fail("callWithLogger was called"))
    errors = []
    observer = lambda event: event.get("isError") and errors.append(event)  # noqa: E731
    globalLogPublisher.addObserver(observer)
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(_Echo), interface="127.0.0.1")
    clients = []
    try:
        for _ in range(2):
            client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
            client.setblocking(False)
            clients.append(client)
        good, bad = clients
        good.sendall(b"hello")
        got, read = _reader(good)
        _turn_until(reactor, read)
        assert got == [b"hello"]
        bad.sendall(b"boom")
        closed, read_bad = _reader(bad)
        _turn_until(reactor, read_bad)
        assert closed == [b""]  # disconnected
        assert any("the handler failed" in str(e.get("failure", "")) for e in errors), errors
        good.sendall(b"again")
        got.clear()
        _turn_until(reactor, read)
        assert got == [b"again"]
    finally:
        globalLogPublisher.removeObserver(observer)
        for client in clients:
            client.close()
        port.stopListening()
        _close(reactor)


def _close(reactor):
    reactor.disconnectAll()
    reactor.removeReader(reactor.waker)
    reactor.waker.connectionLost(None)
    reactor._poller.close()


class _Breaks:
    """A readable descriptor whose handler fails, and whose connectionLost
    (called as it is dropped) fails too."""

    def __init__(self, sock):
        self.sock = sock

    def fileno(self):
        return self.sock.fileno()

    def logPrefix(self):
        return "breaks"

    def doRead(self):
        raise RuntimeError("read failed")

    def connectionLost(self, reason):
        raise RuntimeError("and so did closing")


def test_dispatch_without_log_context_logs_what_escapes_a_handler_and_goes_on():
    """When dropping a failed selectable fails too, the error is logged with
    the selectable named, and the reactor goes on serving the others."""
    from twisted.internet.epollreactor import EPollReactor
    from twisted.logger import globalLogPublisher

    reactor = EPollReactor()
    assert dispatch_without_log_context(reactor)
    pairs = [socket.socketpair() for _ in range(2)]
    errors = []
    observer = lambda event: event.get("isError") and errors.append(event)  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        broken = _Breaks(pairs[0][0])
        reactor.addReader(broken)
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(_Echo), interface="127.0.0.1")
        client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
        client.setblocking(False)
        got, read = _reader(client)
        pairs[0][1].sendall(b"x")
        client.sendall(b"still served")
        _turn_until(reactor, read)
        assert got == [b"still served"]
        assert any("while handling an event of" in (e.get("why") or "") for e in errors), errors
        client.close()
        port.stopListening()
    finally:
        globalLogPublisher.removeObserver(observer)
        for a, b in pairs:
            a.close()
            b.close()
        _close(reactor)


def test_dispatch_without_log_context_leaves_other_reactors_alone():
    """A reactor that is not a stock epoll one keeps its own loop."""
    from twisted.internet.selectreactor import SelectReactor

    assert not dispatch_without_log_context(MemoryReactor())
    select_reactor = SelectReactor()
    assert not dispatch_without_log_context(select_reactor)
    assert "doIteration" not in vars(select_reactor)
