"""The first lines of twistd's log: what runs, where, with what; quiet outages."""

import os
import re
import signal
import subprocess
import time

import pytest

import apigw
from tests.helpers import TWISTD, assert_no_secrets, free_port, wait_for_port

pytestmark = pytest.mark.slow

SEED = "services:\n  a:\n    url: http://127.0.0.1:9\n    auth: false\n"
TIMEOUT_S = 30


def _run(tmp_path, env_update, *args, until, settle_s=0.0):
    """twistd -n apigw until `until` is in the log (then `settle_s` more), then SIGTERM; the log."""
    config = tmp_path / "gw.yaml"
    config.write_text(SEED)
    logfile = tmp_path / "twistd.log"
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "MASTER_KEY")}
    env.update(env_update)
    port = free_port()
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "--logfile", str(logfile), "apigw", "--config", str(config),
         "--port", f"tcp:{port}:interface=127.0.0.1", *args],
        cwd=str(tmp_path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port, proc=proc)
        deadline = time.monotonic() + TIMEOUT_S
        while until not in (logfile.read_text() if logfile.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, logfile.read_text()
            time.sleep(0.05)
        time.sleep(settle_s)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return port, logfile.read_text()


def _messages(log):
    """The log's lines without the timestamp and system prefix."""
    return [re.sub(r"^\S+ \[[^]]*\] ", "", line) for line in log.splitlines()]


def _closed_port():
    return free_port()  # nothing listens there once the probe socket is closed


def test_one_process_states_its_setup_and_reports_outages_once(tmp_path):
    """When Postgres and Redis are unreachable, the log states version, listeners, stores, limiter, master key and workers, warns once for each store and never shows a password or ClientService's retries."""
    pg_port, redis_port, admin = _closed_port(), _closed_port(), free_port()
    _, log = _run(tmp_path, {
        "DATABASE_URL": f"postgresql://apigw:pg-pass-123@127.0.0.1:{pg_port}/keys",
        "REDIS_URL": f"redis://:redis-pass-456@127.0.0.1:{redis_port}/3",
    }, "--admin-port", f"tcp:{admin}:interface=127.0.0.1",
        until=f"Redis at 127.0.0.1:{redis_port}/3 is unreachable", settle_s=5.0)
    messages = _messages(log)
    assert f"apigw {apigw.__version__} starting (pid " in log
    assert any(m.startswith("listeners: public tcp:") and f"admin tcp:{admin}:" in m
               for m in messages), log
    assert f"key store: PostgreSQL at 127.0.0.1:{pg_port}/keys" in messages
    assert (f"rate limiter: Redis at 127.0.0.1:{redis_port}/3, shared by every gateway process"
            in messages)
    assert any(m.startswith("master key: MASTER_KEY is not set") for m in messages), log
    assert "workers: 1 (this process serves requests itself)" in messages
    assert len([m for m in messages if f"127.0.0.1:{redis_port}/3 is unreachable" in m]) == 1, log
    assert len([m for m in messages if f"127.0.0.1:{pg_port}/keys) is unreachable" in m]) == 1, log
    assert "ClientService" not in log and "Scheduling retry" not in log
    assert "GatewaySite" not in log
    assert "pg-pass-123" not in log and "redis-pass-456" not in log
    assert "Traceback" not in log
    assert_no_secrets(log, "twistd log")


def test_workers_state_their_setup_once_without_internal_names(tmp_path):
    """When run with --workers 2, the supervisor states the setup once: SQLite path, per-worker limits, master key set, 2 workers; no class names."""
    _, log = _run(tmp_path, {"DATABASE_URL": "sqlite:///keys.db", "MASTER_KEY": "hunter2-master"},
                  "--workers", "2", until="worker 2 serving")
    messages = _messages(log)
    assert log.count(f"apigw {apigw.__version__} starting") == 1
    assert any(m.startswith("listeners: public tcp:") and "admin API at /admin" in m
               for m in messages), log
    assert f"key store: SQLite file {tmp_path / 'keys.db'}" in messages
    assert any(m.startswith("rate limiter: in-process, per worker") for m in messages), log
    assert "master key: set" in messages
    assert "workers: 2, supervised by this process" in messages
    assert "_Unused" not in log and "GatewaySite" not in log
    assert "hunter2-master" not in log
    assert "Traceback" not in log
