"""A listening port as a service, through the public endpoint API.

Twisted's StreamServerEndpointService keeps the port's Deferred private and
reports a failed bind only through the log unless a private flag is set;
here a bind that fails at once raises from startService (twistd then stops
with the error), and `when_listening` hands out the port.
"""

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString


class Listener(Service):
    def __init__(self, endpoint, factory, reactor):
        """`endpoint`: a Twisted endpoint description or an IStreamServerEndpoint."""
        if isinstance(endpoint, str):
            endpoint = serverFromString(reactor, endpoint)
        self.endpoint = endpoint
        self.factory = factory
        self.port = None
        self._pending = None
        self._waiters = []

    def privilegedStartService(self):
        super().privilegedStartService()
        self._listen()

    def startService(self):
        super().startService()
        if self.port is None and self._pending is None:
            self._listen()

    def _listen(self):
        failed = []
        d = self._pending = self.endpoint.listen(self.factory)
        d.addCallbacks(self._listening, failed.append)
        if failed:
            self._pending = None
            failed[0].raiseException()

    def _listening(self, port):
        self._pending = None
        self.port = port
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(port)

    def when_listening(self):
        """Fires with the IListeningPort once bound."""
        if self.port is not None:
            return defer.succeed(self.port)
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def stopService(self):
        super().stopService()
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)
