"""twistd's log through apigw.twistd_log: twistd's own lines, info lines
written in batches, warnings at once, rotation kept."""

import io
import os
import signal
import subprocess
import time
import urllib.request

import pytest
from twisted.internet import task
from twisted.logger import LogLevel, textFileLogObserver
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile

from apigw.twistd_log import (
    _SIMPLE,
    FLUSH_INTERVAL_S,
    MAX_FORMATS,
    MAX_PENDING,
    BatchedLogObserver,
    observer_for,
)
from tests.helpers import TWISTD, free_port, wait_for_port


class _Reactor(task.Clock):
    running = True


class _CountingFile(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, text):
        self.writes += 1
        return super().write(text)


def _events():
    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    return [
        {"log_format": "GET {path} -> {status}", "path": "/svc/x", "status": 200,
         "log_level": LogLevel.info, "log_namespace": "apigw.access", "log_time": 1800000000.25},
        {"log_format": "two\nlines", "log_level": LogLevel.info, "log_namespace": "apigw",
         "log_time": 1800000000.75},
        {"log_format": "next second", "log_level": LogLevel.info, "log_namespace": "apigw",
         "log_time": 1800000001.0},
        {"log_format": "no time", "log_level": LogLevel.info, "log_namespace": "apigw",
         "log_time": None},
        {"log_format": "legacy", "log_system": "-", "log_time": 1800000001.5},
        {"log_format": "it broke", "log_failure": failure, "log_level": LogLevel.critical,
         "log_namespace": "apigw", "log_time": 1800000002.0},
        {"log_level": LogLevel.info, "log_namespace": "apigw", "log_time": 1800000002.0},
        {"log_format": "{access_text}", "access_text": "GET /a -> 200 (1.5 ms)",
         "access": {"status": 200}, "log_level": LogLevel.info,
         "log_namespace": "apigw.access", "log_time": 1800000002.5},
        {"log_format": "{log_text}", "log_text": "legacy\nmulti-line", "log_system": "-",
         "log_time": 1800000003.0},
        {"log_format": "{n}", "n": 42, "log_level": LogLevel.warn, "log_namespace": "t",
         "log_time": 1800000003.0},
        {"log_format": "{absent}", "log_level": LogLevel.info, "log_namespace": "t",
         "log_time": 1800000003.0},
        {"log_format": "{empty}", "empty": "", "log_level": LogLevel.info,
         "log_namespace": "t", "log_time": 1800000003.0},
        {"log_format": "{{braces}} {n!r:>5}", "n": 7, "log_namespace": "t",
         "log_time": 1800000003.0},
        {"log_format": "", "log_level": LogLevel.info, "log_time": 1800000003.0},
        {"log_format": "no namespace, no level", "log_time": 1800000003.0},
        {"log_format": "system of its own", "log_system": "worker 2", "log_level": LogLevel.info,
         "log_namespace": "ignored", "log_time": 1800000004.0},
        {"log_format": "{access_text}", "access_text": "with\nnewline", "log_system": "a\nb",
         "log_time": 1800000004.0},
    ]


def _observer(out, reactor=None, in_io_thread=lambda: True):
    return BatchedLogObserver(out, reactor or _Reactor(), in_io_thread=in_io_thread)


def test_lines_are_exactly_twistds_own():
    """For the same events, the text is what twistd's default observer writes."""
    ours, theirs = io.StringIO(), io.StringIO()
    observer, reference = _observer(ours), textFileLogObserver(theirs)
    for event in _events():
        observer(dict(event))
        reference(dict(event))
    observer.flush()
    assert "Traceback" in theirs.getvalue() and "\n\t" in theirs.getvalue()
    assert "Unable to format event" in theirs.getvalue()  # {absent}
    assert ours.getvalue().splitlines() == theirs.getvalue().splitlines()
    assert ours.getvalue() == theirs.getvalue()


def test_info_lines_go_out_together_within_the_flush_interval():
    """Info lines wait up to FLUSH_INTERVAL_S after the first of them, then go out in one write, in order."""
    out, reactor = _CountingFile(), _Reactor()
    observer = _observer(out, reactor)
    for n in range(3):
        observer({"log_format": "line {n}", "n": n, "log_level": LogLevel.info,
                  "log_namespace": "t", "log_time": 1800000000.0})
    reactor.advance(FLUSH_INTERVAL_S * 0.99)
    assert out.writes == 0
    reactor.advance(FLUSH_INTERVAL_S * 0.01)
    assert out.writes == 1
    assert [line.split("] ", 1)[1] for line in out.getvalue().splitlines()] == \
        ["line 0", "line 1", "line 2"]
    reactor.advance(FLUSH_INTERVAL_S)
    assert out.writes == 1 and not reactor.getDelayedCalls()


def test_a_warning_goes_out_at_once_after_what_is_pending():
    """A warning is written at once, after the info lines before it, and cancels the pending flush."""
    out, reactor = _CountingFile(), _Reactor()
    observer = _observer(out, reactor)
    observer({"log_format": "first", "log_level": LogLevel.info, "log_namespace": "t",
              "log_time": 1.0})
    observer({"log_format": "trouble", "log_level": LogLevel.warn, "log_namespace": "t",
              "log_time": 1.0})
    assert out.writes == 1
    assert out.getvalue().splitlines()[0].endswith("first")
    assert out.getvalue().splitlines()[1].endswith("trouble")
    assert not reactor.getDelayedCalls()


@pytest.mark.parametrize("where", ["reactor not running", "another thread"])
def test_written_at_once_outside_the_running_reactor_thread(where):
    """Before the reactor runs, after it stopped, or from another thread, lines are written at once."""
    out, reactor = _CountingFile(), _Reactor()
    if where == "reactor not running":
        reactor.running = False
        observer = _observer(out, reactor)
    else:
        observer = _observer(out, reactor, in_io_thread=lambda: False)
    observer({"log_format": "now", "log_level": LogLevel.info, "log_namespace": "t",
              "log_time": 1.0})
    assert out.writes == 1 and out.getvalue().endswith("now\n")
    assert not reactor.getDelayedCalls()


def test_a_line_from_another_thread_is_written_at_once_and_leaves_the_timer_be():
    """A line from a thread other than the reactor's goes out at once with what
    is pending; the reactor's timer is not touched from there and later
    finds nothing to write."""
    out, reactor = _CountingFile(), _Reactor()
    on_reactor = [True]
    observer = _observer(out, reactor, in_io_thread=lambda: on_reactor[0])
    observer({"log_format": "first", "log_level": LogLevel.info, "log_namespace": "t",
              "log_time": 1.0})
    on_reactor[0] = False
    observer({"log_format": "from a thread", "log_level": LogLevel.info, "log_namespace": "t",
              "log_time": 1.0})
    assert out.writes == 1 and out.getvalue().endswith("first\n" + out.getvalue().splitlines()[1] + "\n")
    assert len(reactor.getDelayedCalls()) == 1
    on_reactor[0] = True
    reactor.advance(FLUSH_INTERVAL_S)
    assert out.writes == 1 and len(out.getvalue().splitlines()) == 2


def test_formats_made_per_event_are_not_kept():
    """A program that logs a fresh format string each time does not grow the format cache past its bound."""
    observer = _observer(io.StringIO())
    for n in range(MAX_FORMATS + 50):
        observer({"log_format": f"made per event {n}", "log_level": LogLevel.info,
                  "log_namespace": "t", "log_time": 1.0})
    assert len(_SIMPLE) <= MAX_FORMATS


def test_only_twistds_own_options_get_an_observer(tmp_path, monkeypatch):
    """Without twistd's options (`twist`, or makeService called directly) no
    observer is made, no file opened and SIGUSR1 left alone; twistd's -n
    with --logfile gets one writing to that file."""
    from twisted.python import usage
    from twisted.scripts.twistd import ServerOptions

    monkeypatch.chdir(tmp_path)
    usr1 = signal.getsignal(signal.SIGUSR1)
    assert observer_for(None, _Reactor()) is None
    assert observer_for(usage.Options(), _Reactor()) is None  # `twist`'s, say
    assert observer_for({"logfile": "x.log", "nodaemon": True}, _Reactor()) is None
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGUSR1) == usr1
    options = ServerOptions()
    options.parseOptions(["-n", "--logfile", str(tmp_path / "t.log")])
    try:
        observer = observer_for(options, _Reactor())
        assert isinstance(observer, BatchedLogObserver)
        observer({"log_format": "hello", "log_level": LogLevel.warn, "log_namespace": "t",
                  "log_time": 1.0})
        assert (tmp_path / "t.log").read_text().endswith("[t#warn] hello\n")
    finally:
        signal.signal(signal.SIGUSR1, usr1)
    syslog = ServerOptions()
    syslog.parseOptions(["--syslog"])
    assert observer_for(syslog, _Reactor()) is None


def test_a_burst_is_written_without_waiting():
    """MAX_PENDING info lines are written as soon as that many are pending."""
    out, reactor = _CountingFile(), _Reactor()
    observer = _observer(out, reactor)
    for n in range(MAX_PENDING):
        observer({"log_format": "x", "log_level": LogLevel.info, "log_namespace": "t",
                  "log_time": 1.0})
    assert out.writes == 1
    assert len(out.getvalue().splitlines()) == MAX_PENDING


def test_rotation_writes_what_is_pending_into_the_old_file(tmp_path):
    """rotate() (SIGUSR1) puts the pending lines in the file being rotated away."""
    log_file = LogFile.fromFullPath(str(tmp_path / "twistd.log"))
    observer = _observer(log_file)
    observer({"log_format": "before", "log_level": LogLevel.info, "log_namespace": "t",
              "log_time": 1.0})
    observer.rotate()
    observer({"log_format": "after", "log_level": LogLevel.warn, "log_namespace": "t",
              "log_time": 1.0})
    log_file.close()
    assert (tmp_path / "twistd.log.1").read_text().endswith("before\n")
    assert (tmp_path / "twistd.log").read_text().endswith("after\n")


def _get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _wait_for(path, text, proc, timeout_s=20):
    deadline = time.monotonic() + timeout_s
    while True:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        assert proc.poll() is None and time.monotonic() < deadline, content
        time.sleep(0.05)


@pytest.mark.slow
def test_twistd_writes_access_lines_rotates_on_sigusr1_and_logs_its_shutdown(tmp_path):
    """A real `twistd -n --logfile` writes the access lines to its log,
    rotates it on SIGUSR1 and still logs its own shutdown."""
    config = tmp_path / "gw.yaml"
    config.write_text("services:\n  a:\n    url: http://127.0.0.1:9\n    auth: false\n")
    logfile = tmp_path / "twistd.log"
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "MASTER_KEY")}
    port = free_port()
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "--logfile", str(logfile), "apigw", "--config", str(config),
         "--port", f"tcp:{port}:interface=127.0.0.1"],
        cwd=str(tmp_path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc=proc)
        assert _get(port, "/nothing-here") == 404
        _wait_for(logfile, "[apigw.access#info] GET /nothing-here -> 404 (", proc)
        proc.send_signal(signal.SIGUSR1)
        _wait_for(tmp_path / "twistd.log.1", "GET /nothing-here -> 404", proc)
        assert _get(port, "/healthz") == 200
        assert _get(port, "/still-nothing") == 404
        _wait_for(logfile, "GET /still-nothing -> 404", proc)
        assert "GET /nothing-here" not in logfile.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert logfile.read_text().rstrip().endswith("Server Shut Down.")
