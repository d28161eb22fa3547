"""One send(2) per answer: writing to a plain TCP socket at once.

Twisted's TCP transport never writes inside write(): it queues the bytes,
asks the reactor to watch the socket for writability, and sends on the
reactor's next turn, then stops watching. For a proxy, which writes one
small head (often with its whole body) per request to a socket that is all
but always writable, that is two epoll_ctl(2) calls and a reactor turn on
top of every send(2), in each direction.

SendNow sends at once through the socket the transport hands out
(ISystemHandle.getHandle()) for as long as the transport has nothing queued
of its own, which holds while every byte so far was taken whole by the
kernel. The first time the kernel takes less, the rest and everything after
it go through the transport, in order, for good: from then on the
transport's buffer, its flow control (pausing a registered producer) and
its close-after-flush apply as usual. TLS connections, and anything that is
not a plain stream socket, always go through the transport.
"""

import socket

from twisted.internet.interfaces import ISSLTransport, ISystemHandle


def _socket_send(transport):
    if ISSLTransport.providedBy(transport) or not ISystemHandle.providedBy(transport):
        return None
    handle = transport.getHandle()
    if not isinstance(handle, socket.socket) or handle.type != socket.SOCK_STREAM:
        return None
    return handle.send


class SendNow:
    """Writes for one connection; the only writer of its data, so the
    order of bytes is the order of calls."""

    __slots__ = ("_transport", "_send")

    def __init__(self, transport):
        self._transport = transport
        self._send = _socket_send(transport)

    def write(self, data):
        send = self._send
        if send is not None:
            try:
                sent = send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                # Broken or closed: the transport notices and reports it.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
            self._send = None
        self._transport.write(data)

    def through_transport(self):
        """Everything from now on goes through the transport (another
        writer is about to share it)."""
        self._send = None
