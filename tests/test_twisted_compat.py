"""Pins the Twisted behaviour behind each function of apigw._twisted_compat.

A Twisted release that renames or reworks what one of them leans on fails
here, under the function's name, before anything in the request path.
"""

import signal
import sys

from twisted.application import app
from twisted.internet.address import IPv4Address
from twisted.internet.base import ReactorBase
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.scripts.twistd import ServerOptions
from twisted.web import http, server
from twisted.web.resource import Resource

from apigw._twisted_compat import clear_exit_signal, request_line, start_response


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
