"""The seed's curl flow against a real `twistd -n apigw`, and keys that
outlive the process."""

import json
import os
import shutil
import signal
import subprocess

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.helpers import assert_no_secrets, free_port, run_twistd, wait_for_port
from tests.upstreams import TestUpstream

pytestmark = pytest.mark.slow

SEED = """services:
  service1:
    url: "{url}"
    rate_limit: 100
  service2:
    url: "{url}"
    rate_limit: 50

settings:
  rate_period: 60
"""


class Twistd:
    def __init__(self, tmp_path, port, env):
        self.proc = run_twistd(
            ["--config", str(tmp_path / "gateway_config.yaml"),
             "--port", f"tcp:{port}:interface=127.0.0.1"],
            cwd=str(tmp_path), env=env,
        )
        self.port = port

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        out, err = self.proc.communicate()
        return self.proc.returncode, out.decode("utf-8", "replace") + err.decode("utf-8", "replace")


def curl(*args):
    """curl as the README shows it: status code on the last line."""
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", *args],
        capture_output=True, timeout=20, check=True,
    )
    body, _, code = result.stdout.decode().rpartition("\n")
    return int(code), body


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest_twisted.ensureDeferred
async def test_seed_curl_flow_and_keys_survive_restart(tmp_path):
    """When the seed's curl generates a key, it opens service1, no key gets 401, and the key still works after a restart."""
    upstream = TestUpstream().start()
    (tmp_path / "gateway_config.yaml").write_text(SEED.format(url=upstream.url))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["MASTER_KEY"] = "supersecret"  # DATABASE_URL unset: sqlite:///apigw.db in cwd
    port = free_port()
    base = f"http://localhost:{port}"
    logs = []
    gw = Twistd(tmp_path, port, env)
    try:
        await deferToThread(wait_for_port, port, proc=gw.proc)
        code, body = await deferToThread(
            curl, "-X", "POST", f"{base}/admin/generate_key",
            "-H", "X-Master-Key: supersecret", "-H", "Content-Type: application/json",
            "-d", '{"owner":"test-client"}')
        assert code == 201, body
        api_key = json.loads(body)["api_key"]

        code, body = await deferToThread(curl, f"{base}/service1/hello", "-H", f"X-API-Key: {api_key}")
        assert code == 200, body
        assert upstream.requests[-1]["headers"]["x-consumer-username"] == ["test-client"]
        code, body = await deferToThread(curl, f"{base}/service1/hello")
        assert code == 401 and json.loads(body)["error"]
    finally:
        code, output = await deferToThread(gw.stop)
        logs.append(output)
    assert code == 0, output
    assert (tmp_path / "apigw.db").exists()

    gw = Twistd(tmp_path, port, env)
    try:
        await deferToThread(wait_for_port, port, proc=gw.proc)
        code, body = await deferToThread(curl, f"{base}/service2/again", "-H", f"X-API-Key: {api_key}")
        assert code == 200, body
        code, body = await deferToThread(curl, f"{base}/admin/keys", "-H", "X-Master-Key: supersecret")
        assert code == 200 and [k["owner"] for k in json.loads(body)["keys"]] == ["test-client"]
    finally:
        code, output = await deferToThread(gw.stop)
        logs.append(output)
        await upstream.stop()
    assert code == 0, output
    all_logs = "\n".join(logs)
    assert "key store ready (sqlite" in all_logs
    assert api_key not in all_logs and "supersecret" not in all_logs
    assert_no_secrets(all_logs, "twistd output")
    assert "Traceback" not in all_logs


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest_twisted.ensureDeferred
async def test_without_master_key_admin_refuses_and_startup_says_why_once(tmp_path):
    """When MASTER_KEY is unset, admin calls get 403 and the log says why exactly once."""
    (tmp_path / "gateway_config.yaml").write_text(SEED.format(url="http://127.0.0.1:9"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "MASTER_KEY")}
    port = free_port()
    gw = Twistd(tmp_path, port, env)
    try:
        await deferToThread(wait_for_port, port, proc=gw.proc)
        for _ in range(2):
            code, body = await deferToThread(
                curl, "-X", "POST", f"http://127.0.0.1:{port}/admin/generate_key",
                "-H", "X-Master-Key: supersecret", "-d", '{"owner":"x"}')
            assert code == 403 and "MASTER_KEY" in json.loads(body)["error"]
    finally:
        code, output = await deferToThread(gw.stop)
    assert code == 0, output
    assert output.count("MASTER_KEY is not set") == 1, output
    assert_no_secrets(output, "twistd output")
