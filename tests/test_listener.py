"""Bad endpoints and busy ports: `twistd apigw` says why in one line and exits 1."""

import os
import socket
import subprocess

import pytest

from tests.helpers import TWISTD, free_port

SEED = "services:\n  a:\n    url: http://127.0.0.1:9\n    auth: false\n"


def _twistd(tmp_path, *args, daemon=False):
    config = tmp_path / "gw.yaml"
    config.write_text(SEED)
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["DATABASE_URL"] = f"sqlite:///{tmp_path}/apigw.db"
    head = ["--pidfile", str(tmp_path / "twistd.pid"), "--logfile", str(tmp_path / "twistd.log")] \
        if daemon else ["-n", "--pidfile="]
    return subprocess.run(
        [TWISTD, *head, "apigw", "--config", str(config), *args],
        cwd=str(tmp_path), env=env, capture_output=True, timeout=60, text=True,
    )


def _assert_one_line(result, *expected):
    assert result.returncode == 1, (result.stdout, result.stderr)
    everything = result.stdout + result.stderr
    assert "Traceback" not in everything, everything
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("apigw: ")
    for part in expected:
        assert part in lines[0], lines[0]


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("option", ["--port", "--admin-port"])
@pytest.mark.parametrize("description,expected", [
    ("18001", "tcp:18001"),
    ("localhost:18001", "tcp:18001:interface=localhost"),
    ("tcp:99999", "port must be 0-65535"),
])
def test_bad_endpoint_is_one_line_and_exit_1(tmp_path, workers, option, description, expected):
    """When --port or --admin-port is not a usable endpoint, stderr has one line naming it and the status is 1."""
    args = ["--workers", workers, option, description]
    if option == "--admin-port":
        args += ["--port", f"tcp:{free_port()}:interface=127.0.0.1"]
    result = _twistd(tmp_path, *args)
    _assert_one_line(result, description, expected)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_port_in_use_is_one_line_and_exit_1(tmp_path, workers):
    """When the port is taken, stderr has one line saying so, the log one critical line, and the status is 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        description = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        result = _twistd(tmp_path, "--workers", workers, "--port", description)
    _assert_one_line(result, description, "address already in use")
    assert result.stdout.count("address already in use") == 1, result.stdout


def test_daemon_with_port_in_use_reports_exits_1_and_leaves_no_pidfile(tmp_path):
    """When a daemonized apigw cannot bind, the command says why, exits 1 and no pidfile stays behind."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        description = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        result = _twistd(tmp_path, "--port", description, daemon=True)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "address already in use" in result.stderr
    assert not (tmp_path / "twistd.pid").exists()
    log = (tmp_path / "twistd.log").read_text()
    assert "Traceback" not in log
    assert log.count("address already in use") == 1, log
