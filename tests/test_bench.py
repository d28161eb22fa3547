"""bench/bench.py in --quick mode: the harness runs end to end and prints a
row for every peer at every concurrency (skipped without wrk or nginx)."""

import json
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


# Row names of bench/bench.py, and which proxy each is (all but the upstream).
PEERS = ["upstream direct", "nginx proxy", "aiohttp proxy (asyncio)", "aiohttp proxy (uvloop)",
         "twisted ReverseProxyResource", "apigw", "apigw auth:false no limit",
         "apigw auth:false no limit, access log file", "apigw --workers 2", "Flask prototype (gunicorn -w 2)"]
# The peers the bench may skip, with its reason on a "skipped:" line: no
# --workers, or no Flask prototype folder or PostgreSQL server for it.
MAY_SKIP = {"apigw --workers 2", "Flask prototype (gunicorn -w 2)"}


def _number(cell):
    return float(cell.replace(",", ""))


def test_quick_run_prints_every_peer_at_every_concurrency(tools, tmp_path):
    """When the harness runs in --quick mode (making bench/.venv-peers if
    needed), its table has one measured row per peer and concurrency, with
    CPU per request and both ratio columns."""
    help_text = subprocess.run([TWISTD, "apigw", "--help"], capture_output=True, text=True,
                               timeout=60).stdout
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "bench.py"), "--quick",
         "--results-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=240, cwd=str(tmp_path),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows, skipped = {}, set()
    for line in out.stdout.splitlines():
        if line.startswith("skipped: "):
            skipped.add(line[len("skipped: "):].split(":")[0])
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and re.fullmatch(r"\d+", cells[1]):
            rows[(cells[0], int(cells[1]))] = cells
    assert skipped <= MAY_SKIP, skipped
    if "--workers" in help_text:
        assert "apigw --workers 2" not in skipped
    assert set(rows) == {(p, c) for p in PEERS if p not in skipped for c in (10, 50)}
    for (peer, c), cells in rows.items():
        _, _, rps, _, _, cpu, cpu_x_nginx, x_nginx, x_aiohttp, errors = cells
        assert _number(rps) > 0, cells
        assert errors == "0", cells  # every response was a 2xx
        assert _number(x_nginx) > 0 and _number(x_aiohttp) > 0, cells
        if peer == "upstream direct":
            assert cpu == cpu_x_nginx == "—", cells  # not a proxy: no CPU measured
        else:
            # Every proxy's CPU per request, all processes of its tree.
            assert _number(cpu) > 0 and _number(cpu_x_nginx) > 0, cells
    for c in (10, 50):
        assert rows[("nginx proxy", c)][6:8] == ["1.00", "1.000"]
        assert rows[("aiohttp proxy (uvloop)", c)][8] == "1.000"
    [result] = tmp_path.glob("bench-*.json")
    data = json.loads(result.read_text())
    assert len(data["rows"]) == len(rows)
    for row in data["rows"]:
        assert {"ratio_to_nginx", "ratio_to_aiohttp_uvloop", "cpu_ratio_to_nginx"} <= set(row)
