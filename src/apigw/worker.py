"""One worker process of `twistd apigw --workers N` (see apigw.workers).

The supervisor runs `python -m apigw.worker` with the listening sockets
already bound and passed as file descriptors: each worker adopts them, so
every worker accepts from the same kernel queue and no port is bound twice.
The worker's log events go to the supervisor as JSON records on a pipe of
their own (stdout stays stdout, for `--access-log -`), and the supervisor
writes them into twistd's log.
"""

import io
import json
import os
import shutil
import signal
import socket
import sys
import threading

from twisted.internet import fdesc, tcp, unix
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReadDescriptor, IStreamServerEndpoint
from twisted.logger import Logger, LogLevel, formatEvent, globalLogBeginner
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from zope.interface import implementer

from apigw._twisted_compat import (
    adopt_listening_port, dispatch_without_log_context, listen_on_adopted_unix_socket,
)
from apigw.signals import stop_once_on_sigterm
from apigw.tap import Options

log = Logger(namespace="apigw.worker")

# Records carrying this key are messages to the supervisor, not just logs.
READY = "apigw_worker_ready"
RELOAD_OTHERS = "apigw_reload_others"
# ... with the id of a key changed through this worker, for the others.
KEY_CHANGED = "apigw_key_changed"


class PipeObserver:
    """Each log event as one line of JSON for the supervisor: time, level,
    namespace and the formatted text (traceback included). Formatting here
    keeps the supervisor's share small: without --access-log every request
    is one event, and twisted.logger's own JSON (every field, restored on
    the other side) cost the supervisor about 70 us per event."""

    def __init__(self, out):
        self._out = out
        self._lock = threading.Lock()  # adbapi threads log too

    def __call__(self, event):
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}\n{failure.getTraceback()}"
        level = event.get("log_level", LogLevel.info)
        record = {"time": event.get("log_time"), "level": level.name,
                  "namespace": event.get("log_namespace", "-"), "text": text}
        for key in (READY, RELOAD_OTHERS):
            if event.get(key):
                record[key] = True
        if event.get(KEY_CHANGED):
            record[KEY_CHANGED] = str(event[KEY_CHANGED])
        line = json.dumps(record) + "\n"
        with self._lock:
            self._out.write(line)


class WorkerOptions(Options):
    optParameters = [
        ["index", None, "1", "Worker number, for the logs."],
        ["log-fd", None, None, "Write JSON log records to this descriptor."],
        ["port-fd", None, None, "The public listening socket."],
        ["admin-port-fd", None, None, "The admin listening socket."],
    ]

    def postOptions(self):
        super().postOptions()
        for name in ("log-fd", "port-fd", "admin-port-fd"):
            if self[name] is not None:
                self[name] = int(self[name])
        if self["port-fd"] is None:
            raise usage.UsageError("--port-fd is required")


@implementer(IStreamServerEndpoint)
class InheritedSocketEndpoint:
    """An endpoint whose listen() adopts a socket bound by the supervisor.

    The description is parsed by Twisted as usual (so ssl: loads its
    certificate and key here), only the bind is replaced by adoption.
    """

    def __init__(self, reactor, description, fd):
        self._reactor = reactor
        self._description = description
        self._fd = fd

    def __str__(self):
        return self._description

    def listen(self, factory):
        return serverFromString(_Adopting(self._reactor, self._fd), self._description).listen(
            factory
        )


class _Adopting:
    """Stands in for the reactor while a parsed endpoint listens."""

    def __init__(self, reactor, fd):
        self._reactor = reactor
        self._fd = fd

    def listenTCP(self, port, factory, backlog=50, interface=""):
        return self._adopt(factory)

    def listenSSL(self, port, factory, contextFactory, backlog=50, interface=""):
        # What the reactor's own listenSSL does: TLS as a wrapper over TCP.
        return self._adopt(TLSMemoryBIOFactory(contextFactory, False, factory))

    def listenUNIX(self, address, factory, backlog=50, mode=0o666, wantPID=0):
        return self._adopt(factory)

    def _adopt(self, factory):
        with socket.socket(fileno=os.dup(self._fd)) as probe:
            family = probe.family
        # reactor.adoptStreamPort's own steps, with the port classes below
        # (it only builds Twisted's own).
        port_class = _InheritedUNIXPort if family == socket.AF_UNIX else _InheritedTCPPort
        port = adopt_listening_port(port_class, self._reactor, self._fd, family, factory)
        port.startListening()
        # The port holds a duplicate; once it stops listening no descriptor
        # of ours may keep the socket accepting into a queue nobody reads.
        os.close(self._fd)
        return port


class _OneAcceptPerWakeup:
    """Every worker is woken for each new connection; the first to call
    accept() gets it. Twisted's port accepts up to 100 in a row, so one
    worker would take a whole burst (and, with keep-alive clients, keep it
    for good). One accept per reactor turn lets the others compete: with
    wrk -c50 on two workers, no run left a worker idle."""

    numberAccepts = property(lambda self: 1, lambda self, value: None)


class _InheritedTCPPort(_OneAcceptPerWakeup, tcp.Port):
    pass


class _InheritedUNIXPort(_OneAcceptPerWakeup, unix.Port):
    """The supervisor owns the socket's path, mode and lock file."""

    def startListening(self):
        # Not unix.Port's: the supervisor set the mode, and under --uid a
        # worker may not chmod a file root made; and a shutdown() when this
        # port closes would stop the socket for every worker.
        listen_on_adopted_unix_socket(self)

    def connectionLost(self, reason):
        # The path belongs to the supervisor: other workers still accept on
        # it, and a restarted worker must find it.
        tcp.Port.connectionLost(self, reason)


def _make_service(options, reactor):
    from apigw.config import ConfigError, load_config
    from apigw.heap import Heap
    from apigw.metrics import Metrics
    from apigw.service import GatewayService

    try:
        config = load_config(options["config"], environ=os.environ)
    except ConfigError as e:
        log.critical("cannot start: {error}", error=str(e))
        return None
    admin_port = None
    if options["admin-port"] is not None:
        admin_port = InheritedSocketEndpoint(
            reactor, options["admin-port"], options["admin-port-fd"]
        )
    service = GatewayService(
        config,
        port=InheritedSocketEndpoint(reactor, options["port"], options["port-fd"]),
        admin_port=admin_port,
        access_log=options["access-log"],
        reactor=reactor,
        metrics=Metrics(multiprocess_dir=os.environ["PROMETHEUS_MULTIPROC_DIR"]),
        heap=Heap(reactor),
    )
    # Each reload reaches every worker (SIGHUP from the supervisor, or the
    # admin call here and SIGHUP to the others): counted once, by worker 1.
    service.counts_reloads = options["index"] == "1"
    service.announce = False
    # POST /admin/reload reached this worker only; the supervisor passes it on.
    service.reload_others = lambda: log.info(
        "asking the supervisor to reload the other workers", **{RELOAD_OTHERS: True}
    )
    # So does a revocation: the others' caches must forget the key now (with
    # SQLite nothing else would tell them before auth_cache_ttl).
    service.relay_key_change = lambda key_id: log.info(
        "key {key_id} changed; asking the supervisor to tell the other workers",
        key_id=key_id, **{KEY_CHANGED: key_id}
    )
    return service


@implementer(IReadDescriptor)
class SupervisorMessages:
    """What the supervisor tells this worker, one JSON object per line on
    our stdin: {"key_changed": id} is a key changed through another worker."""

    def __init__(self, reactor, service, fd=0):
        self._reactor = reactor
        self._service = service
        self._fd = fd
        self._buffer = b""

    def start(self):
        fdesc.setNonBlocking(self._fd)
        self._reactor.addReader(self)

    def fileno(self):
        return self._fd

    def doRead(self):
        return fdesc.readFromFD(self._fd, self._received)

    def _received(self, data):
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
                key_id = message["key_changed"]
            except (ValueError, TypeError, KeyError):
                log.warn("unreadable message from the supervisor: {line!r}", line=line[:200])
                continue
            self._service.authenticator.invalidate(str(key_id))

    def connectionLost(self, reason):
        # The supervisor went away; _watch_parent deals with that.
        self._reactor.removeReader(self)

    def logPrefix(self):
        return "apigw supervisor messages"


def _started(service, index, reactor, parent_pid):
    # Ctrl-C in a terminal reaches the whole process group: shutting down
    # is the supervisor's decision, it sends SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    SupervisorMessages(reactor, service).start()
    service.startService()
    d = service.when_listening()
    if service.admin_listener is not None:
        d.addCallback(lambda _: service.when_admin_listening())
    d.addCallback(lambda _: log.info(
        "worker {index} serving (pid {pid})", index=index, pid=os.getpid(), **{READY: True}
    ))
    d.addErrback(_listen_failed, reactor)
    _watch_parent(reactor, parent_pid)


def _listen_failed(failure, reactor):
    log.failure("worker cannot listen", failure)
    reactor.stop()


def _watch_parent(reactor, parent_pid):
    """Drain and exit if the supervisor is gone (killed with SIGKILL)."""
    from twisted.internet.task import LoopingCall

    def check():
        if os.getppid() != parent_pid and reactor.running:
            log.warn("supervisor (pid {pid}) is gone; stopping", pid=parent_pid)
            _orphaned.set()
            loop.stop()
            reactor.stop()

    loop = LoopingCall(check)
    loop.clock = reactor
    loop.start(1.0, now=False)


_orphaned = threading.Event()


def main(argv=None):
    parent_pid = os.getppid()  # first thing: the supervisor may die while we start
    options = WorkerOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write(f"apigw.worker: {e}\n")
        return 2
    if options["log-fd"] is not None:
        out = io.open(options["log-fd"], "w", buffering=1, encoding="utf-8")
        globalLogBeginner.beginLoggingTo([PipeObserver(out)], redirectStandardIO=False)
    from twisted.internet import reactor

    service = _make_service(options, reactor)
    if service is None:
        return 1
    reactor.callWhenRunning(stop_once_on_sigterm, reactor)
    reactor.callWhenRunning(dispatch_without_log_context, reactor)
    reactor.callWhenRunning(_started, service, options["index"], reactor, parent_pid)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    # Requests that outlived the grace end as the reactor stops, after the
    # service did: their counts too.
    try:
        service.metrics.flush()
    except Exception:
        log.failure("writing the last metrics to the shared files")
    if _orphaned.is_set():
        # Nobody else will remove the metrics files now; a sibling still
        # draining keeps its open mmaps, and /metrics no longer matters.
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
