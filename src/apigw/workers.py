"""`twistd apigw --workers N`: one supervisor, N worker processes, one socket.

The twistd process becomes a supervisor that serves no requests. It binds
the public listener (and the admin one) once, before twistd drops
privileges, and starts N `python -m apigw.worker` processes that inherit the
bound sockets and accept from them, so the kernel spreads connections over
the workers. tcp:, tcp6:, unix: and ssl: endpoints are supported (a worker
wraps its site in TLS itself with the endpoint's key and certificate).

- SIGHUP is passed to every worker (each re-reads the config); a worker
  still starting gets it as soon as it serves. `POST /admin/reload` on one
  worker makes the supervisor reload the others.
- A key revoked through one worker's admin API is forgotten by the others'
  caches at once: the worker says so on its log pipe and the supervisor
  writes it to the others' stdin (docs/revocation.md).
- SIGTERM: the supervisor stops accepting, sends SIGTERM to every worker,
  waits for them to drain (shutdown_grace plus a margin, then SIGKILL), and
  exits 0; twistd removes the pidfile.
- A worker that exits on its own or is killed is restarted, after a delay
  that doubles while it keeps dying young, and the restart is logged.
- Metrics: prometheus_client multiprocess mode in a directory made here
  and removed at exit (see apigw.metrics for how each kind is merged).
- Rate limits are exact across workers with REDIS_URL; the in-process
  limiter counts per worker.
"""

import os
import json
import shutil
import sys
import tempfile

from prometheus_client import multiprocess
from twisted.application.service import Service
from twisted.internet import defer, error, protocol
from twisted.logger import InvalidLogLevelError, Logger, LogLevel, globalLogPublisher

import apigw
from apigw.config import ConfigError, reload_config
from apigw.listener import listen_now
from apigw.tap import check_endpoint, endpoint_hint
from apigw.signals import SighupHandler, exit_zero_after_sigterm
from apigw.startup import log_startup
from apigw.worker import KEY_CHANGED, READY, RELOAD_OTHERS

log = Logger()

# Those whose listen() the worker can replay on an inherited socket.
SUPPORTED_ENDPOINTS = ("tcp", "tcp6", "ssl", "unix")
STOP_MARGIN_S = 5.0  # beyond shutdown_grace: closing pools, Redis, the database
STABLE_S = 10.0  # a worker that lived this long was not crash-looping
RESTART_BASE_S = 0.5
RESTART_MAX_S = 30.0
# Descriptor numbers in the worker.
LOG_FD, PORT_FD, ADMIN_PORT_FD = 3, 4, 5


def make_supervisor(options, config, reactor):
    """The supervisor for options["workers"] workers, or exit 1 with one line."""
    endpoints = {}
    for name in ("port", "admin-port"):
        description = options[name]
        if description is None:
            continue
        if description.split(":", 1)[0] not in SUPPORTED_ENDPOINTS:
            _refuse(f"--{name} {description!r}: with --workers, use a tcp:, tcp6:, ssl: or unix:"
                    f" endpoint{endpoint_hint(description)}")
        endpoints[name] = (description, check_endpoint(reactor, name, description))
    return WorkerSupervisor(
        config, options["workers"], endpoints, options["access-log"], reactor=reactor
    )


def _refuse(message):
    sys.stderr.write(f"apigw: {message}\n")
    raise SystemExit(1)


class _Unused(protocol.Factory):
    """The supervisor's own factory; it never accepts (see _bind)."""

    noisy = False

    def __init__(self, name):
        self._name = name

    def logPrefix(self):
        # Twisted logs "<prefix> starting on <port>" when it binds.
        return f"apigw {self._name} listener (for the workers)"

    def buildProtocol(self, addr):
        return None


class _Worker(protocol.ProcessProtocol):
    def __init__(self, supervisor, index):
        self.supervisor = supervisor
        self.index = index
        self.pid = None
        self.started_at = None
        self.ready = False
        self.reload_pending = False
        self.ended = False
        self._buffers = {}
        self._ended_waiters = []

    def signal(self, name):
        try:
            self.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass

    def when_ended(self):
        if self.ended:
            return defer.succeed(None)
        d = defer.Deferred()
        self._ended_waiters.append(d)
        return d

    def childDataReceived(self, fd, data):
        *lines, self._buffers[fd] = (self._buffers.get(fd, b"") + data).split(b"\n")
        for line in lines:
            self._line(fd, line)

    def _line(self, fd, line):
        if fd == LOG_FD:
            self.supervisor.worker_event(self, line)
        elif line.strip():
            # Before its logging starts (or if Python itself fails), a worker
            # can only say what is wrong on stderr.
            log.warn("worker {index} (pid {pid}): {line}", index=self.index, pid=self.pid,
                     line=line.decode("utf-8", "replace"))

    def processEnded(self, reason):
        for fd, rest in self._buffers.items():
            if rest:
                self._line(fd, rest)
        self.ended = True
        self.supervisor.worker_ended(self, reason.value)
        waiters, self._ended_waiters = self._ended_waiters, []
        for d in waiters:
            d.callback(None)


class WorkerSupervisor(Service):
    def __init__(self, config, count, endpoints, access_log, reactor, publisher=None):
        self.config = config
        self.count = count
        self.reactor = reactor
        self._endpoints = endpoints  # option name -> (description, endpoint)
        self._access_log = access_log
        self._publish = publisher if publisher is not None else globalLogPublisher
        # Workers start where twistd was started (before --rundir, or the
        # daemon's chdir): relative paths and .env mean the same to them.
        self._cwd = os.getcwd()
        self._ports = {}
        self._workers = {}  # index -> _Worker, the live or latest one
        self._young_deaths = {}  # index -> consecutive exits soon after starting
        self._restart_calls = {}
        self._metrics_dir = None
        self._sighup = SighupHandler(reactor, self._reload_workers)
        self._stopping = False

    # -- start -------------------------------------------------------------

    def privilegedStartService(self):
        # Before twistd sheds privileges, so ports below 1024 work with --uid.
        super().privilegedStartService()
        for name, (description, endpoint) in self._endpoints.items():
            self._ports[name] = _bind(endpoint, description, "public" if name == "port" else "admin")

    def startService(self):
        super().startService()
        self._metrics_dir = tempfile.mkdtemp(prefix="apigw-metrics-")
        self._sighup.install()
        admin = self._endpoints.get("admin-port")
        log_startup(self.config, self._endpoints["port"][0], admin[0] if admin else None,
                    workers=self.count)
        for index in range(1, self.count + 1):
            self._spawn(index)

    def _spawn(self, index):
        self._restart_calls.pop(index, None)
        worker = _Worker(self, index)
        argv = [sys.executable, "-m", "apigw.worker", "--index", str(index),
                "--log-fd", str(LOG_FD), "--config", self.config.path,
                "--port", self._endpoints["port"][0], "--port-fd", str(PORT_FD)]
        child_fds = {0: "w", 1: 1, 2: "r", LOG_FD: "r", PORT_FD: self._ports["port"].fileno()}
        if "admin-port" in self._ports:
            argv += ["--admin-port", self._endpoints["admin-port"][0],
                     "--admin-port-fd", str(ADMIN_PORT_FD)]
            child_fds[ADMIN_PORT_FD] = self._ports["admin-port"].fileno()
        if self._access_log is not None:
            argv += ["--access-log", self._access_log]
        started_at = self.reactor.seconds()
        try:
            self.reactor.spawnProcess(
                worker, sys.executable, argv, env=self._worker_env(), path=self._cwd,
                childFDs=child_fds,
            )
        except OSError as e:  # fork or exec refused: out of memory, permissions...
            self._restart_later(index, started_at, f"could not start ({e})")
            return
        worker.pid = worker.transport.pid
        worker.started_at = started_at
        self._workers[index] = worker

    def _worker_env(self):
        env = dict(os.environ)
        env["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        # `-m apigw.worker` must find this very apigw, however twistd found it.
        root = os.path.dirname(os.path.dirname(os.path.abspath(apigw.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        return env

    # -- what workers say ----------------------------------------------------

    def worker_event(self, worker, line):
        """One line from the worker's log pipe (apigw.worker.PipeObserver)."""
        try:
            record = json.loads(line)
            level = LogLevel.levelWithName(record["level"])
            text, namespace = str(record["text"]), str(record["namespace"])
            log_time = float(record["time"])
        except (ValueError, TypeError, KeyError, InvalidLogLevelError):
            if line.strip():
                log.warn("worker {index}: {line}", index=worker.index,
                         line=line.decode("utf-8", "replace"))
            return
        if record.get(READY):
            worker.ready = True
            if worker.reload_pending:
                worker.reload_pending = False
                worker.signal("HUP")
        if record.get(RELOAD_OTHERS):
            self._reload_workers(but=worker)
        if record.get(KEY_CHANGED):
            self._relay_key_change(str(record[KEY_CHANGED]), but=worker)
        self._publish({
            "log_time": log_time, "log_level": level, "log_namespace": namespace,
            "log_system": f"worker {worker.index} {namespace}#{level.name}",
            "log_format": "{log_text}", "log_text": text,
        })

    def worker_ended(self, worker, reason):
        # Its live gauges (in-flight, breakers) go; its counters stay in the totals.
        multiprocess.mark_process_dead(worker.pid, self._metrics_dir)
        how = f"(pid {worker.pid}) {_describe_exit(reason)}"
        if self._stopping:
            log.info("worker {index} {how}", index=worker.index, how=how)
            return
        self._restart_later(worker.index, worker.started_at, how)

    def _restart_later(self, index, started_at, how):
        lived_s = self.reactor.seconds() - started_at
        # Consecutive early deaths double the delay; a stable run resets it.
        young = 0 if lived_s >= STABLE_S else self._young_deaths.get(index, -1) + 1
        self._young_deaths[index] = young
        delay_s = min(RESTART_MAX_S, RESTART_BASE_S * 2 ** young)
        log.error("worker {index} {how}; restarting it in {delay_s}s",
                  index=index, how=how, delay_s=delay_s)
        self._restart_calls[index] = self.reactor.callLater(delay_s, self._spawn, index)

    def _relay_key_change(self, key_id, but):
        """Tell every other worker's cache to forget a key changed through
        `but` (apigw.worker.SupervisorMessages reads it on its stdin)."""
        line = json.dumps({"key_changed": key_id}).encode("utf-8") + b"\n"
        for worker in self._workers.values():
            if worker is but or worker.ended:
                continue
            try:
                worker.transport.writeToChild(0, line)
            except Exception:  # its stdin is gone: it is on its way out
                log.info("could not tell worker {index} about a changed key",
                         index=worker.index)

    # -- reload --------------------------------------------------------------

    def _reload_workers(self, but=None):
        try:
            # Only shutdown_grace matters here; workers log what is wrong.
            self.config = reload_config(self.config)
        except ConfigError:
            pass
        for worker in self._workers.values():
            if worker is but or worker.ended:
                continue
            if worker.ready:
                worker.signal("HUP")
            else:
                # Not listening yet: it may have read the file already, and
                # until its handler is installed SIGHUP would kill it.
                worker.reload_pending = True

    # -- stop ----------------------------------------------------------------

    def stopService(self):
        return defer.ensureDeferred(self._stop())

    async def _stop(self):
        self._stopping = True
        exit_zero_after_sigterm(self.reactor)
        self._sighup.uninstall()
        for call in self._restart_calls.values():
            call.cancel()
        self._restart_calls.clear()
        # Our copy of the socket would keep queueing connections nobody takes.
        for port in self._ports.values():
            try:
                await defer.maybeDeferred(port.stopListening)
            except Exception:  # e.g. someone removed the unix socket's file
                log.failure("closing the listening socket {port}", port=port)
        live = [w for w in self._workers.values() if not w.ended]
        limit_s = self.config.settings.shutdown_grace_s + STOP_MARGIN_S
        log.info("stopping {n} workers (waiting up to {limit_s}s)", n=len(live), limit_s=limit_s)
        for worker in live:
            worker.signal("TERM")
        if not await self._all_ended(live, limit_s):
            for worker in live:
                if not worker.ended:
                    log.warn("worker {index} (pid {pid}) still running after {limit_s}s; killing it",
                             index=worker.index, pid=worker.pid, limit_s=limit_s)
                    worker.signal("KILL")
            await defer.gatherResults([w.when_ended() for w in live])
        if self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
        super().stopService()

    async def _all_ended(self, workers, limit_s):
        """True once every worker has ended, False if limit_s passes first."""
        verdict = defer.Deferred()

        def decide(value):
            if not verdict.called:
                verdict.callback(value)

        timer = self.reactor.callLater(limit_s, decide, False)
        # Not cancelled on timeout: the same waits are awaited after SIGKILL.
        defer.gatherResults([w.when_ended() for w in workers]).addCallback(
            lambda _: decide(True)
        )
        ended = await verdict
        if timer.active():
            timer.cancel()
        return ended


def _bind(endpoint, description, name):
    """Listen on the endpoint but leave accepting to the workers."""
    # These endpoints bind at once; a failure is CannotStart's one line.
    port = listen_now(endpoint, _Unused(name), description)
    # Out of the reactor before it polls: the supervisor never accepts.
    port.stopReading()
    return port


def _describe_exit(reason):
    if getattr(reason, "signal", None):
        return f"was killed by signal {reason.signal}"
    code = getattr(reason, "exitCode", None)
    return f"exited with status {code}"
