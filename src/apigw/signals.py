"""Signal plumbing shared by the single-process service and the supervisor."""

import signal
import threading

from apigw._twisted_compat import clear_exit_signal


class SighupHandler:
    """Calls `callback` on the reactor thread for each SIGHUP while installed.

    A signal handler may run between any two bytecodes, so it only hands the
    work to the reactor. Installed from the main thread only (tests run
    services elsewhere too); `uninstall` restores what was there before.
    """

    def __init__(self, reactor, callback):
        self._reactor = reactor
        self._callback = callback
        self._previous = None

    def install(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGHUP, self._handle)

    def uninstall(self):
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _handle(self, signum, frame):
        self._reactor.callFromThread(self._callback)


def exit_zero_after_sigterm(reactor):
    """twistd re-raises the signal that stopped it, so a clean drain after
    SIGTERM would exit 143, and operators are promised exit 0.

    Cleared at the very end of shutdown: a second SIGTERM during the drain
    (systemd's control-group kill, an impatient operator) sets it again.
    """
    def clear():
        clear_exit_signal(reactor, signal.SIGTERM)

    clear()
    if getattr(reactor, "running", False):
        reactor.addSystemEventTrigger("after", "shutdown", clear)


def stop_once_on_sigterm(reactor):
    """Replace the reactor's SIGTERM handler (installed by now) with one
    that stops only once: under systemd's control-group kill or a kill of
    the process group, a gateway gets SIGTERM from the system and again from
    whoever started it, and a second reactor.stop() while draining would
    log ReactorNotRunning."""
    stopping = []

    def handler(signum, frame):
        if not stopping:
            stopping.append(signum)
            reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, handler)
