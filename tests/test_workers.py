"""`twistd -n apigw --workers 2` end to end: real processes, one shared socket.

Which worker serves a request is decided from outside: a worker stopped with
SIGSTOP cannot accept, so whatever is answered while it is stopped was
answered by the other one.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.web.client import HTTPConnectionPool

from tests.helpers import TWISTD, free_port, http
from tests.ratelimit_support import delete_keys, sleep
from tests.upstreams import TestUpstream

pytestmark = pytest.mark.slow

REDIS_DB = 12  # this file's own index on the shared Redis
SERVING = re.compile(r"worker (\d+) serving \(pid (\d+)\)")


@pytest_twisted.async_yield_fixture
async def upstream():
    up = TestUpstream().start()
    yield up
    await up.stop()


def service_yaml(services, settings=""):
    text = "services:\n"
    for name, url in services.items():
        text += f"  {name}:\n    url: \"{url}\"\n    auth: false\n    retries: 0\n"
    return text + settings


class Supervisor:
    """A `twistd apigw --workers 2` of the test's own, stopped by PID."""

    def __init__(self, tmp_path, yaml_text, env=None, port=None, extra=(), daemon=False):
        self.tmp_path = tmp_path
        self.config = tmp_path / "gw.yaml"
        self.config.write_text(yaml_text)
        self.pidfile = tmp_path / "twistd.pid"
        self.logfile = tmp_path / "twistd.log"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        full_env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
        full_env["DATABASE_URL"] = f"sqlite:///{tmp_path}/apigw.db"
        full_env.update(env or {})
        args = [TWISTD, *([] if daemon else ["-n"]),
                "--pidfile", str(self.pidfile), "--logfile", str(self.logfile), "apigw",
                "--config", str(self.config),
                "--port", port or f"tcp:{self.port}:interface=127.0.0.1", "--workers", "2", *extra]
        self.proc = subprocess.Popen(args, cwd=str(tmp_path), env=full_env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.daemon = daemon
        self.pid = None if daemon else self.proc.pid

    async def daemonized(self):
        """Daemon mode: waits for the foreground part, then reads the pidfile."""
        assert await deferToThread(self.proc.wait, 30) == 0, self.proc.stderr.read()
        self.pid = int(self.pidfile.read_text())

    def alive(self):
        if not self.daemon:
            return self.proc.poll() is None
        try:
            os.kill(self.pid, 0)  # not our child: no zombie to mistake for it
            return True
        except ProcessLookupError:
            return False

    def log(self):
        return self.logfile.read_text() if self.logfile.exists() else ""

    def workers(self):
        """PIDs of the supervisor's children, from /proc."""
        pids = set()
        for task in os.listdir(f"/proc/{self.pid}/task"):
            with open(f"/proc/{self.pid}/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
        return pids

    async def serving(self, timeout_s=20):
        """The two worker PIDs, once both have logged that they serve."""
        deadline = reactor.seconds() + timeout_s
        while True:
            ready = {int(pid) for _, pid in SERVING.findall(self.log())}
            live = self.workers()
            if len(live) == 2 and live <= ready:
                return sorted(live)
            assert self.alive(), self.log()
            assert reactor.seconds() < deadline, self.log()
            await sleep(0.05)

    def index_of(self, pid):
        """The worker number the supervisor gave this PID."""
        return {int(p): int(i) for i, p in SERVING.findall(self.log())}[pid]

    def stop(self):
        """SIGTERM, then the exit status (SIGKILL if it hangs)."""
        if self.daemon:
            self._stop_daemon()
        elif self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()
        return self.proc.returncode

    def _stop_daemon(self):
        if self.pid is None or not self.alive():
            return
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)


@pytest_twisted.async_yield_fixture
async def supervisors():
    started = []
    yield started.append
    for supervisor in started:
        # The supervisor's SIGTERM also ends its workers; stopped ones first resume.
        for pid in supervisor.workers() if supervisor.pid and supervisor.alive() else ():
            _signal(pid, signal.SIGCONT)
        await deferToThread(supervisor.stop)


def _signal(pid, signum):
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


@contextlib.contextmanager
def paused(pid):
    """The worker cannot accept while stopped: the other one serves."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        _signal(pid, signal.SIGCONT)


def total(metrics_text, sample):
    match = re.search(re.escape(sample) + r" ([0-9.e+]+)\n", metrics_text)
    return float(match.group(1)) if match else 0.0


@pytest_twisted.ensureDeferred
async def test_both_workers_serve_and_metrics_are_totals(tmp_path, upstream, supervisors):
    """When each worker in turn is the only one running, both serve, the supervisor serves nothing, and /metrics from either reports the total."""
    access_log = tmp_path / "access.log"
    gw = Supervisor(tmp_path, service_yaml({"svc": upstream.url}), extra=["--access-log", str(access_log)])
    supervisors(gw)
    first, second = await gw.serving()
    with paused(second):
        for _ in range(3):
            assert (await http("GET", gw.base + "/svc/x")).code == 200
    with paused(first):
        for _ in range(4):
            assert (await http("GET", gw.base + "/svc/x")).code == 200
    with paused(first), paused(second):
        waiting = defer.ensureDeferred(http("GET", gw.base + "/svc/y"))
        await sleep(0.5)
        assert not waiting.called  # queued: the supervisor itself never answers
    assert (await waiting).code == 200
    sample = 'gateway_requests_total{method="GET",service="svc",status="200"}'
    # A worker counts a request just after its answer is out: the client
    # can be quicker than that last count.
    deadline = reactor.seconds() + 5
    while total((await http("GET", gw.base + "/metrics")).body.decode(), sample) < 8:
        assert reactor.seconds() < deadline
        await sleep(0.02)
    for one, other in ((first, second), (second, first)):
        with paused(other):
            text = (await http("GET", gw.base + "/metrics")).body.decode()
        assert total(text, sample) == 8
        assert 'gateway_request_latency_seconds_count{service="svc"} 8.0' in text
        assert "gateway_in_flight_requests 0.0" in text
    assert len(upstream.requests) == 8
    # Each worker writes its records in batches, at most 0.1 s apart.
    deadline = reactor.seconds() + 5
    while len(access_log.read_text().splitlines()) < 8:
        assert reactor.seconds() < deadline
        await sleep(0.02)
    records = [json.loads(line) for line in access_log.read_text().splitlines()]
    assert [r["path"] for r in records].count("/svc/x") == 7 and len(records) == 8
    if shutil.which("promtool"):
        result = await deferToThread(subprocess.run, ["promtool", "check", "metrics"],
                                     input=text.encode(), capture_output=True, timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest_twisted.ensureDeferred
async def test_one_rate_limit_across_two_workers(tmp_path, upstream, supervisors):
    """When 60 requests race over connections held by both workers sharing Redis with limit 20, exactly 20 pass."""
    name = f"wk_{uuid.uuid4().hex[:12]}"
    yaml_text = (f"services:\n  {name}:\n    url: \"{upstream.url}\"\n    auth: false\n"
                 "    rate_limit: 20\n    retries: 0\nsettings:\n  rate_period: 3600\n")
    gw = Supervisor(tmp_path, yaml_text, env={"REDIS_URL": f"redis://127.0.0.1:6379/{REDIS_DB}"})
    supervisors(gw)
    pools = []
    try:
        first, second = await gw.serving()
        # 30 kept-alive connections to each worker, opened while the other is stopped.
        for other in (second, first):
            pool = HTTPConnectionPool(reactor, persistent=True)
            pool.maxPersistentPerHost = 30
            pools.append(pool)
            with paused(other):
                warm = await defer.gatherResults(
                    [defer.ensureDeferred(http("GET", gw.base + "/healthz", pool=pool))
                     for _ in range(30)])
            assert [r.code for r in warm] == [200] * 30
        replies = await defer.gatherResults(
            [defer.ensureDeferred(http("GET", f"{gw.base}/{name}/x", pool=pools[i % 2]))
             for i in range(60)],
            consumeErrors=True,
        )
        codes = [r.code for r in replies]
        assert codes.count(200) == 20 and codes.count(429) == 40
        assert len(upstream.requests) == 20
        remaining = sorted(int(r.header(b"RateLimit-Remaining")) for r in replies if r.code == 200)
        assert remaining == list(range(20))
    finally:
        for pool in pools:
            await pool.closeCachedConnections()
        await deferToThread(delete_keys, REDIS_DB, f"apigw:rl:{name}:*")


async def _code_from(gw, worker_pid_to_pause, path, want, timeout_s=10):
    """Polls until the worker that is not paused answers `want` on path."""
    deadline = reactor.seconds() + timeout_s
    while True:
        with paused(worker_pid_to_pause):
            code = (await http("GET", gw.base + path)).code
        if code == want or reactor.seconds() > deadline:
            return code
        await sleep(0.05)


@pytest_twisted.ensureDeferred
async def test_reload_reaches_every_worker(tmp_path, upstream, supervisors):
    """When the supervisor gets SIGHUP, or one worker gets POST /admin/reload on the admin port, both workers serve the new services, each reloading once per request, and each reload is counted once."""
    admin = free_port()
    gw = Supervisor(tmp_path, service_yaml({"a": upstream.url}), env={"MASTER_KEY": "mk-test"},
                    extra=["--admin-port", f"tcp:{admin}:interface=127.0.0.1"])
    supervisors(gw)
    first, second = await gw.serving()
    gw.config.write_text(service_yaml({"a": upstream.url, "b": upstream.url}))
    os.kill(gw.pid, signal.SIGHUP)
    assert await _code_from(gw, first, "/b/x", 200) == 200
    assert await _code_from(gw, second, "/b/x", 200) == 200

    gw.config.write_text(service_yaml({"a": upstream.url, "c": upstream.url}))
    with paused(second):
        reply = await http("POST", f"http://127.0.0.1:{admin}/admin/reload",
                           headers={b"X-Master-Key": b"mk-test"})
    assert reply.code == 200, reply.body
    assert await _code_from(gw, first, "/c/x", 200) == 200  # the other worker, via the supervisor
    assert await _code_from(gw, first, "/b/x", 404) == 404
    text = (await http("GET", gw.base + "/metrics")).body.decode()
    assert total(text, 'gateway_config_reloads_total{result="ok"}') == 2  # once per reload


@pytest_twisted.ensureDeferred
async def test_killed_worker_is_restarted_and_totals_survive(tmp_path, upstream, supervisors):
    """When a worker is killed, the port keeps answering, a new worker replaces it, the restart is logged and its counts stay in the totals."""
    gw = Supervisor(tmp_path, service_yaml({"svc": upstream.url}))
    supervisors(gw)
    first, second = await gw.serving()
    with paused(second):
        for _ in range(2):
            assert (await http("GET", gw.base + "/svc/x")).code == 200
        # A worker counts a request just after its answer is sent: the kill
        # must come once the counts are in, or it would test that race.
        text = (await http("GET", gw.base + "/metrics")).body.decode()
    assert total(text, 'gateway_requests_total{method="GET",service="svc",status="200"}') == 2
    os.kill(first, signal.SIGKILL)
    for _ in range(5):
        assert (await http("GET", gw.base + "/svc/x")).code == 200
    replacement = [pid for pid in await gw.serving() if pid != second]
    assert replacement and replacement[0] != first
    assert f"worker {gw.index_of(first)} (pid {first}) was killed by signal 9; restarting it" in gw.log()
    with paused(second):
        text = (await http("GET", gw.base + "/metrics")).body.decode()
    assert total(text, 'gateway_requests_total{method="GET",service="svc",status="200"}') == 7
    assert "gateway_in_flight_requests 0.0" in text


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_both_workers(tmp_path, upstream, supervisors):
    """When the supervisor gets SIGTERM with a slow request on each worker, both finish with 200, then it exits 0 and removes its pidfile."""
    gw = Supervisor(tmp_path, service_yaml({"svc": upstream.url}, "settings:\n  shutdown_grace: 10\n"))
    supervisors(gw)
    first, second = await gw.serving()
    metrics_dir = _metrics_dir(first)
    slow = []
    for other in (second, first):
        with paused(other):
            slow.append(defer.ensureDeferred(http("GET", gw.base + "/svc/hang")))
            while len(upstream.hanging) < len(slow):
                await sleep(0.02)
    assert gw.pidfile.exists()
    os.kill(gw.pid, signal.SIGTERM)
    deadline = reactor.seconds() + 5
    while _accepts(gw.port):  # every copy of the socket closes at once
        assert reactor.seconds() < deadline
        await sleep(0.05)
    await sleep(0.3)
    assert gw.proc.poll() is None and not any(d.called for d in slow)
    for request in upstream.hanging:
        request.write(b"finished")
        request.finish()
    replies = await defer.gatherResults(slow)
    assert [(r.code, r.body) for r in replies] == [(200, b"finished")] * 2
    assert await deferToThread(gw.proc.wait, 20) == 0
    assert not gw.pidfile.exists() and not os.path.exists(metrics_dir)
    assert "Traceback" not in gw.log(), gw.log()


def _accepts(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _unix_get(path, target):
    """One HTTP/1.0 request over a unix socket (blocking: run it in a thread)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(b"GET " + target + b" HTTP/1.0\r\nHost: gw\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


@pytest_twisted.ensureDeferred
async def test_daemon_mode_on_a_unix_socket(tmp_path, upstream, supervisors):
    """When daemonized on a unix: endpoint, each worker answers on the socket, one worker stopping on its own neither breaks the socket for the other nor stays gone, and SIGTERM removes the pidfile and the socket file."""
    sock = tmp_path / "gw.sock"
    gw = Supervisor(tmp_path, service_yaml({"svc": upstream.url}), port=f"unix:{sock}", daemon=True)
    supervisors(gw)
    await gw.daemonized()
    first, second = await gw.serving()
    for other in (second, first):
        with paused(other):
            assert await deferToThread(_unix_get, str(sock), b"/svc/x") == 200
    os.kill(first, signal.SIGTERM)  # drains and exits 0: still replaced
    while first in gw.workers():
        await sleep(0.05)
    with paused(second):
        assert await deferToThread(_unix_get, str(sock), b"/svc/x") == 200
    replacement = next(pid for pid in await gw.serving() if pid != second)
    with paused(replacement):
        assert await deferToThread(_unix_get, str(sock), b"/svc/x") == 200
    assert f"worker {gw.index_of(first)} (pid {first}) exited with status 0; restarting it" in gw.log()
    os.kill(gw.pid, signal.SIGTERM)
    deadline = reactor.seconds() + 20
    while gw.pidfile.exists():
        assert reactor.seconds() < deadline, gw.log()
        await sleep(0.05)
    assert not sock.exists() and not (tmp_path / "gw.sock.lock").exists()
    assert "Traceback" not in gw.log(), gw.log()


@pytest_twisted.ensureDeferred
async def test_tls_on_both_workers(tmp_path, upstream, supervisors):
    """When --port is an ssl: endpoint, each worker serves HTTPS with the configured certificate."""
    key_path, cert_path = tmp_path / "key.pem", tmp_path / "cert.pem"
    await deferToThread(subprocess.run, [
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(key_path), "-out", str(cert_path), "-days", "1",
        "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
    ], capture_output=True, timeout=30, check=True)
    port = free_port()
    gw = Supervisor(tmp_path, service_yaml({"svc": upstream.url}),
                    port=f"ssl:{port}:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}")
    supervisors(gw)
    first, second = await gw.serving()
    for other in (second, first):
        with paused(other):
            result = await deferToThread(subprocess.run, [
                "curl", "-s", "--max-time", "10", "--cacert", str(cert_path),
                "--resolve", f"localhost:{port}:127.0.0.1", f"https://localhost:{port}/svc/x",
            ], capture_output=True, timeout=30)
        assert result.returncode == 0, result.stderr
    assert [r["headers"]["x-forwarded-proto"] for r in upstream.requests] == [["https"]] * 2


def test_unsupported_endpoint_is_refused_in_one_line(tmp_path):
    """When --workers is above 1 with an endpoint a worker cannot adopt, twistd exits 1 with one line."""
    (tmp_path / "gw.yaml").write_text("services: {}\n")
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "apigw", "--config", str(tmp_path / "gw.yaml"),
         "--workers", "2", "--port", "systemd:domain=INET:index=0"],
        cwd=str(tmp_path), capture_output=True, timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        "apigw: --port 'systemd:domain=INET:index=0': with --workers, use a tcp:, tcp6:, "
        "ssl: or unix: endpoint"
    ]


def test_workers_option_parses_counts_and_auto():
    """When --workers is a count or auto it becomes a number; anything else is a usage error."""
    from twisted.python import usage

    from apigw.tap import Options

    for given, expected in (("1", 1), ("3", 3), ("auto", os.cpu_count())):
        options = Options()
        options.parseOptions(["--workers", given])
        assert options["workers"] == expected
    for bad in ("0", "-2", "two", ""):
        with pytest.raises(usage.UsageError):
            Options().parseOptions(["--workers", bad])


@pytest_twisted.ensureDeferred
async def test_worker_that_will_not_stop_is_killed_after_the_grace(tmp_path, upstream, supervisors):
    """When a worker cannot stop (it is SIGSTOPped), the supervisor kills it after shutdown_grace plus its margin and still exits 0."""
    gw = Supervisor(tmp_path, service_yaml({"svc": upstream.url}, "settings:\n  shutdown_grace: 0.5\n"))
    supervisors(gw)
    first, second = await gw.serving()
    os.kill(first, signal.SIGSTOP)
    started = reactor.seconds()
    os.kill(gw.pid, signal.SIGTERM)
    assert await deferToThread(gw.proc.wait, 30) == 0
    assert 5.5 <= reactor.seconds() - started < 15
    assert f"worker {gw.index_of(first)} (pid {first}) still running after 5.5s; killing it" in gw.log()
    assert not gw.pidfile.exists()


def _metrics_dir(worker_pid):
    """The PROMETHEUS_MULTIPROC_DIR the supervisor gave a worker."""
    with open(f"/proc/{worker_pid}/environ", "rb") as f:
        environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    path = environ[b"PROMETHEUS_MULTIPROC_DIR"].decode()
    assert os.path.isdir(path)
    return path


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # exited, not yet reaped
    except FileNotFoundError:
        return True


@pytest_twisted.ensureDeferred
async def test_workers_stop_when_the_supervisor_is_killed(tmp_path, upstream, supervisors):
    """When the supervisor dies without a word (SIGKILL), its workers notice, stop, release the port and remove the metrics directory."""
    gw = Supervisor(tmp_path, service_yaml({"svc": upstream.url}))
    supervisors(gw)
    workers = await gw.serving()
    metrics_dir = _metrics_dir(workers[0])
    gw.proc.kill()
    await deferToThread(gw.proc.wait, 10)
    deadline = reactor.seconds() + 15
    while not all(_gone(pid) for pid in workers):
        assert reactor.seconds() < deadline, "workers outlived their supervisor"
        await sleep(0.1)
    assert not _accepts(gw.port)
    assert not os.path.exists(metrics_dir)
