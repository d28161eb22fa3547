"""The places where apigw leans on Twisted beyond its documented API.

Each function here names what it relies on; tests/test_twisted_compat.py
pins that behaviour, so a Twisted upgrade that changes it fails there, by
name, instead of somewhere in the request path.
"""

import signal
import socket

from twisted.internet import tcp


def start_response(request, code, phrase, header_lines, chunked):
    """Write a response's status line and headers, pre-encoded, on a
    twisted.web Request, leaving it as its own first write() would.

    `header_lines` is a list of b"Name: value\\r\\n" lines. Relies on
    http.Request's first write() being the only reader of `startedWriting`
    and on later writes framing the body by `chunked` (and finish() writing
    the last chunk): so the head of a proxied answer skips the Headers
    object twisted.web would build, fill and serialise again.
    """
    request.code = code
    request.code_message = phrase
    request.startedWriting = 1
    request.chunked = 1 if chunked else 0
    request.channel.writeSequence(
        [request.clientproto, b" %d " % code, phrase, b"\r\n", *header_lines, b"\r\n"]
    )


def clear_exit_signal(reactor, signum=signal.SIGTERM):
    """Forget that `signum` stopped the reactor, so twistd exits 0.

    twistd re-raises the signal that stopped the reactor (the reactor's
    private `_exitSignal`); there is no public way to say a shutdown went
    as planned.
    """
    if getattr(reactor, "_exitSignal", None) == signum:
        reactor._exitSignal = None


def request_line(channel):
    """The (method, target, version) of the request an HTTPChannel is
    reading, from the moment its headers are in.

    HTTPChannel hands them to the Request only in allContentReceived(),
    after the whole body; a request answered before its body arrives needs
    them sooner. Relies on the channel's private `_command`, `_path` and
    `_version`, set from the request line and deleted in
    allContentReceived().
    """
    return channel._command, channel._path, channel._version


def adopt_listening_port(port_class, reactor, fd, family, factory):
    """A `port_class` over the listening socket `fd`, not yet listening:
    what reactor.adoptStreamPort() builds, for a subclass of tcp.Port or
    unix.Port (adoptStreamPort only builds the stock classes).

    Relies on the private classmethod `_fromListeningDescriptor` that
    adoptStreamPort calls (tcp.Port's takes the address family, unix.Port's
    does not), which duplicates `fd` and builds an instance of the class it
    is called on; and on startListening() then taking that socket instead
    of binding one.
    """
    if family == socket.AF_UNIX:
        return port_class._fromListeningDescriptor(reactor, fd, factory)
    return port_class._fromListeningDescriptor(reactor, fd, family, factory)


def listen_on_adopted_unix_socket(port):
    """unix.Port.startListening() for a port from adopt_listening_port(),
    leaving the socket as its owner made it: no lock file, no chmod of
    its path, and, as tcp.Port does for an adopted socket, no shutdown()
    when the port closes (that would stop the socket in every process
    sharing it).

    Relies on unix.Port.startListening()'s steps and the private names
    they use: tcp's `_reservedFD` (the spare descriptor that lets a port
    shed clients on EMFILE), the port's `_preexistingSocket` and
    `_shouldShutdown`; and on `socket`, `fileno` and `connected` being what
    the port's doRead() and connectionLost() use.
    """
    tcp._reservedFD.reserve()
    port._shouldShutdown = False
    port.factory.doStart()
    port.socket, port._preexistingSocket = port._preexistingSocket, None
    port.connected = True
    port.fileno = port.socket.fileno
    port.startReading()


def take_unread_bytes(channel):
    """The bytes an HTTPChannel has read past the request it is handling,
    taken out of it: for whoever takes the connection over once that
    request is answered with a 101 (a WebSocket tunnel).

    Relies on HTTPChannel keeping what arrives while a request is being
    handled in its private `_dataBuffer` (a list of bytes it replays once
    the request is done), and on LineReceiver keeping what it has not yet
    handed on in its private `_buffer`.
    """
    data = b"".join(channel._dataBuffer) + channel._buffer
    channel._dataBuffer = []
    channel._buffer = b""
    return data


def write_at_once(transport, data):
    """transport.write(data), but sent by this call, not at the reactor's
    next turn, when nothing else waits in the transport to go out.

    A small request on an idle connection (the limiter's EVALSHAs of one
    reactor turn) then costs one send() instead of registering the socket
    for writing, a wakeup to write it and unregistering it again. Relies on
    a plain tcp.Connection's private buffer state (`dataBuffer`, `offset`,
    `_tempDataLen`) saying that nothing waits, on its private `_aborting`
    saying it is not being aborted, and on its `socket` being the
    connected non-blocking socket that doWrite() sends on. Whatever is not
    sent (a full socket buffer, an error) goes to write() as before, which
    also reports a broken connection the usual way; TLS and other
    transports always do.

    Not apigw.sendnow.SendNow, which needs no private state because it is
    its connection's only writer: txredisapi writes to this transport too
    (script loads, PING), so whether anything waits must be asked of it.
    """
    if (
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and transport.connected
        and not (transport.disconnecting or transport._aborting
                 or transport._writeDisconnecting or transport._writeDisconnected)
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def closing(transport):
    """Whether loseConnection() or abortConnection() was called on
    `transport`, which may still say it is connected until its
    connectionLost: an abort only disconnects at the reactor's next turn.

    Relies on abortConnection() of Twisted's stream transports setting the
    private `_aborting` (loseConnection() sets the public `disconnecting`).
    """
    return bool(getattr(transport, "disconnecting", False)
                or getattr(transport, "_aborting", False))


def dispatch_without_log_context(reactor):
    """Have an epoll reactor hand each ready descriptor straight to its
    handler, not through twisted.python.log.callWithLogger; True if it
    does from now on, False if `reactor` is not one this knows.

    callWithLogger asks the selectable for its log prefix and pushes a copy
    of the legacy log context for every event: about 2 µs an event, twice
    or three times a request, so 3-5% of a gateway's CPU. That context only
    names the connection in messages logged through the legacy
    twisted.python.log API while the event is handled: Twisted's own
    "Unhandled Error" for an exception a protocol raised shows `[-]` there
    instead of the connection, with the same traceback. apigw logs through
    twisted.logger, which never reads that context.

    Relies on EPollReactor.doPoll() being doIteration(), on the private
    `_poller` and `_selectables` (fd -> selectable) it polls and looks up,
    and on `_doReadOrWrite(selectable, fd, event)` handling one event and
    disconnecting the selectable if its handler fails, as doPoll() does.
    """
    from twisted.internet.epollreactor import EPollReactor
    from twisted.python import log as legacy_log

    if not isinstance(reactor, EPollReactor) or type(reactor).doIteration is not EPollReactor.doPoll:
        return False
    dispatch = reactor._doReadOrWrite

    def do_poll(timeout):
        if timeout is None:
            timeout = -1
        selectables = reactor._selectables
        try:
            events = reactor._poller.poll(timeout, len(selectables))
        except InterruptedError:
            return
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue  # gone during this turn's earlier events
            try:
                dispatch(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                # Where callWithLogger would have reported it: a handler that
                # failed while being disconnected.
                legacy_log.err(None, "while handling an event of %r" % (selectable,))

    reactor.doIteration = do_poll
    return True
