"""twistd's own log, written in batches.

twistd's default observer formats a timestamp, then calls write(2) and
flushes, for every event; with the access records going there (no
--access-log) that was a quarter of the gateway's time under load. This
observer writes the same lines to the same place (the --logfile, rotated
by size and on SIGUSR1 as twistd does; stdout under -n without one) but
formats each second's timestamp once and writes info lines together, at
most FLUSH_INTERVAL_S after the first of them. Warnings and worse, events
from other threads and anything while the reactor is not running go out at
once, after whatever is pending, so the order of lines is kept and a
process killed outright loses at most that interval's info lines.

twistd takes an observer from the application's ILogObserver component,
the hook a .tac file would use; `LoggingRoot` sets it when twistd puts the
gateway into its application. --logger and --syslog keep twistd's own.
"""

import re
import signal
import sys
import threading

from twisted.application.app import ServerOptions
from twisted.application.service import MultiService
from twisted.logger import ILogObserver, LogLevel, formatEventAsClassicLogText, formatTime
from twisted.python import threadable
from twisted.python.logfile import LogFile
from zope.interface import implementer

# Info lines wait at most this long; one write per reactor turn still cost
# about 4 µs a request at 10 connections.
FLUSH_INTERVAL_S = 0.1
# More lines than this are written without waiting.
MAX_PENDING = 256

_AT_ONCE = frozenset({LogLevel.warn, LogLevel.error, LogLevel.critical})

# log_format -> the one field it shows, "" for plain text, None for any
# other format (Twisted's own formatting then).
_SIMPLE = {}
MAX_FORMATS = 1000
_UNKNOWN = object()
_ONE_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}\Z")


def _simple_field(fmt):
    if "{" not in fmt and "}" not in fmt:
        return ""
    match = _ONE_FIELD.match(fmt)
    return match.group(1) if match else None


@implementer(ILogObserver)
class BatchedLogObserver:
    """twistd's classic text lines to `out_file`, info lines in batches."""

    def __init__(self, out_file, reactor, in_io_thread=threadable.isInIOThread):
        self._file = out_file
        self._reactor = reactor
        self._in_io_thread = in_io_thread
        self._pending = []
        self._flush_call = None
        self._lock = threading.Lock()
        # (whole second, its text): one tuple, so that threads never see a
        # second paired with another second's text.
        self._stamp = (None, None)

    def __call__(self, event):
        text = self._text(event)
        if text is None:
            return
        level = event.get("log_level")
        in_io_thread = self._in_io_thread()
        with self._lock:
            self._pending.append(text)
            if not in_io_thread:
                # Written now; a pending timer stays (the reactor's timers
                # are not for other threads to cancel) and finds nothing.
                self._write_pending(cancel_timer=False)
            elif level in _AT_ONCE or not self._reactor.running \
                    or len(self._pending) >= MAX_PENDING:
                self._write_pending()
            elif self._flush_call is None:
                self._flush_call = self._reactor.callLater(FLUSH_INTERVAL_S, self.flush)

    def flush(self):
        """Write what is pending now (in the reactor thread)."""
        with self._lock:
            self._write_pending()

    def rotate(self):
        """Rotate the log file (SIGUSR1), after writing what is pending."""
        with self._lock:
            self._write_pending()
            self._file.rotate()

    def _write_pending(self, cancel_timer=True):
        if cancel_timer:
            call, self._flush_call = self._flush_call, None
            if call is not None and call.active():
                call.cancel()
        if self._pending:
            text = "".join(self._pending)
            self._pending = []
            self._file.write(text)
            self._file.flush()

    def _text(self, event):
        """formatEventAsClassicLogText(event), by a shorter way for the
        usual events: a format that is plain text or one field ("{access_text}",
        twisted.python.log's "{log_text}"). Anything else, a failure
        included, goes through Twisted's own; tests/test_twistd_log.py holds
        both to the same bytes."""
        fmt = event.get("log_format")
        field = _SIMPLE.get(fmt, _UNKNOWN) if fmt.__class__ is str else None
        if field is _UNKNOWN:
            field = _simple_field(fmt)
            if len(_SIMPLE) < MAX_FORMATS:  # formats made per event are not kept
                _SIMPLE[fmt] = field
        if field is None or "log_failure" in event or "log_flattened" in event:
            return formatEventAsClassicLogText(event, formatTime=self._time)
        if field:
            if field not in event:
                return formatEventAsClassicLogText(event, formatTime=self._time)
            try:
                message = format(event[field])
            except Exception:
                return formatEventAsClassicLogText(event, formatTime=self._time)
        else:
            message = fmt
        if not message:
            return None
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = "%s#%s" % (event.get("log_namespace", "-"),
                                "-" if level is None else level.name)
        elif system.__class__ is not str:
            return formatEventAsClassicLogText(event, formatTime=self._time)
        line = "%s [%s] %s" % (self._time(event.get("log_time")), system, message)
        if "\n" in line:
            line = line.replace("\n", "\n\t")
        return line + "\n"

    def _time(self, when):
        # twistd's format has whole seconds: one formatting per second.
        if when is None:
            return formatTime(None)
        second = int(when)
        stamp = self._stamp
        if second != stamp[0]:
            stamp = self._stamp = (second, formatTime(float(second)))
        return stamp[1]


def observer_for(server_options, reactor):
    """The observer for twistd's log as `server_options` (twistd's own
    options) ask for it, or None where twistd's default must stay: a
    --logger or --syslog, a daemon told to log to stdout (twistd refuses
    it), or options that are not twistd's (`twist`, or none at all)."""
    if not isinstance(server_options, ServerOptions):
        return None
    if server_options.get("logger") or server_options.get("syslog"):
        return None
    name = server_options.get("logfile") or ""
    nodaemon = server_options.get("nodaemon", False)
    if name == "-" or (nodaemon and not name):
        if not nodaemon:
            return None
        return BatchedLogObserver(sys.stdout, reactor)
    log_file = LogFile.fromFullPath(name or "twistd.log")
    observer = BatchedLogObserver(log_file, reactor)
    # As twistd does: SIGUSR1 rotates, unless something else wants it.
    if not signal.getsignal(signal.SIGUSR1):
        signal.signal(signal.SIGUSR1,
                      lambda signum, frame: reactor.callFromThread(observer.rotate))
    return observer


class LoggingRoot(MultiService):
    """What `twistd apigw` runs: the gateway, and the observer for twistd's
    log, given to the application it is put in."""

    def __init__(self, observer):
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent):
        if self.observer is not None and parent.getComponent(ILogObserver, None) is None:
            parent.setComponent(ILogObserver, self.observer)
        return super().setServiceParent(parent)
