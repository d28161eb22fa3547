"""bench/bench.py in --quick mode: the harness runs end to end and prints a
row for every peer at every concurrency (skipped without wrk or nginx)."""

import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from tests.helpers import REPO, TWISTD

pytestmark = pytest.mark.slow


def _redis_up():
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def tools():
    missing = [t for t in ("wrk", "nginx", "redis-cli") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (bench/run installs them)")
    if not _redis_up():
        pytest.skip("no Redis on 127.0.0.1:6379")


def test_quick_run_prints_every_peer_at_every_concurrency(tools, tmp_path):
    """When the harness runs in --quick mode, its table has one measured row per peer and concurrency."""
    help_text = subprocess.run([TWISTD, "apigw", "--help"], capture_output=True, text=True,
                               timeout=60).stdout
    peers = ["upstream direct", "nginx proxy", "apigw"]
    if "--workers" in help_text:
        peers.append("apigw --workers 2")
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "bench.py"), "--quick",
         "--results-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and re.fullmatch(r"\d+", cells[1]):
            rows[(cells[0], int(cells[1]))] = cells
    assert set(rows) == {(p, c) for p in peers for c in (10, 50)}
    for (peer, _), cells in rows.items():
        assert float(cells[2].replace(",", "")) > 0, cells  # requests/s
        assert cells[7] == "0", cells  # no errors: every response was a 2xx
        if peer.startswith("apigw"):
            assert float(cells[5]) > 0, cells  # the gateway's CPU per request
    assert len(list(tmp_path.glob("bench-*.json"))) == 1
