"""A listening port as a service, through the public endpoint API.

Twisted's StreamServerEndpointService keeps the port's Deferred private and
reports a failed bind only through the log unless a private flag is set;
here a bind that fails at once ends startup with one line (see
CannotStart), and `when_listening` hands out the port.
"""

import sys

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class CannotStart(SystemExit, Exception):
    """Startup refused for a reason the operator can fix: one line, exit 1.

    Raised while twistd starts the service tree. As an Exception, twistd
    reports it to a daemon's waiting parent and removes the pidfile before
    re-raising it; as a SystemExit, it then ends the process with status 1
    instead of printing a traceback.
    """

    def __init__(self, message):
        super().__init__(message)
        self.code = 1
        self.message = message

    def __str__(self):
        return self.message


def refuse_to_start(message):
    """Say why in the log and on the terminal, then raise CannotStart."""
    log.critical("{message}", message=message)
    # twistd has pointed sys.stderr at the log by now; the terminal (when
    # there is one) still deserves the line a bad config would give.
    terminal = sys.__stderr__
    if terminal is not None:
        try:
            terminal.write(f"apigw: {message}\n")
            terminal.flush()
        except (OSError, ValueError):
            pass
    raise CannotStart(message)


def why_not_listening(failure):
    """One line for a bind that failed: the address and the system's reason."""
    error = failure.value
    if isinstance(error, CannotListenError):
        reason = error.socketError
        reason = getattr(reason, "strerror", None) or str(reason)
        return reason.lower()
    return str(error) or type(error).__name__


def listen_now(endpoint, factory, description):
    """endpoint.listen(factory) for endpoints that bind at once (tcp:, ssl:,
    unix:...): the port, or CannotStart naming `description`."""
    result = []
    endpoint.listen(factory).addBoth(result.append)
    if result and isinstance(result[0], Failure):
        refuse_to_start(f"cannot listen on {description}: {why_not_listening(result[0])}")
    return result[0] if result else None


class Listener(Service):
    def __init__(self, endpoint, factory, reactor, description=None):
        """`endpoint`: a Twisted endpoint description or an IStreamServerEndpoint;
        `description`: how errors name it (the option as given)."""
        if description is None:
            description = endpoint if isinstance(endpoint, str) else str(endpoint)
        if isinstance(endpoint, str):
            endpoint = serverFromString(reactor, endpoint)
        self.endpoint = endpoint
        self.description = description
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
            refuse_to_start(
                f"cannot listen on {self.description}: {why_not_listening(failed[0])}")

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
