"""A real WebSocket upstream (the `websockets` library's threaded server)
and a real `twistd -n apigw` in front of it, for tests/test_websocket.py.

Everything here blocks: the gateway is another process and the upstream
runs in threads, so the tests drive them without the reactor.
"""

import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from http import HTTPStatus

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from websockets.sync.server import serve

from tests.helpers import TWISTD, free_port, wait_for_port

MASTER_KEY = "mk-websocket-tests"


class WebSocketUpstream:
    """Behaviour by path: /echo echoes; /slow reads a message every
    `slow_pause_s`, counting bytes; /push?n=BYTES sends that many bytes in
    1 MiB messages, then waits; /close closes with 4002 after the first
    message; /refuse answers the handshake 403. Every handshake's headers
    and every close code received are recorded."""

    slow_pause_s = 0.04

    def __init__(self):
        self.handshakes = []
        self.closes = []
        self.slow_bytes = 0
        self._server = serve(self._handle, "127.0.0.1", 0, process_request=self._process,
                             max_size=None, max_queue=2, ping_interval=None)
        self.port = self._server.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self):
        self._server.shutdown()
        self._thread.join(10)

    def _process(self, connection, request):
        self.handshakes.append({"path": request.path,
                                "headers": {k.lower(): v for k, v in request.headers.raw_items()}})
        if request.path.endswith("/refuse"):
            return connection.respond(HTTPStatus.FORBIDDEN, "the upstream says no\n")
        return None

    def _handle(self, ws):
        path = ws.request.path
        try:
            if path.endswith("/echo"):
                for message in ws:
                    ws.send(message)
            elif path.endswith("/slow"):
                for message in ws:
                    self.slow_bytes += len(message)
                    time.sleep(self.slow_pause_s)
            elif "/push" in path:
                left = int(path.rsplit("n=", 1)[1])
                chunk = os.urandom(1 << 20)
                while left > 0:
                    ws.send(chunk[:left])
                    left -= len(chunk)
                ws.recv()  # until the client closes
            elif path.endswith("/close"):
                ws.recv()
                ws.close(4002, "server says bye")
            else:
                ws.close(4004, "no such path")
        except ConnectionClosed:
            pass
        finally:
            self.closes.append((path, ws.close_code))


class Gateway:
    """`twistd -n apigw` on a free port with an access log, stopped by PID."""

    def __init__(self, tmp_path, yaml_text, database_url):
        self.dir = tmp_path
        self.config = tmp_path / "gw.yaml"
        self.config.write_text(yaml_text)
        self.access_log = tmp_path / "access.log"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_base = f"ws://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
        env.update(DATABASE_URL=database_url, MASTER_KEY=MASTER_KEY)
        self.proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "--logfile", str(tmp_path / "twistd.log"), "apigw",
             "--config", str(self.config), "--port", f"tcp:{self.port}:interface=127.0.0.1",
             "--access-log", str(self.access_log)],
            cwd=str(tmp_path), env=env)
        wait_for_port(self.port, 20, self.proc)

    def log(self):
        path = self.dir / "twistd.log"
        return path.read_text() if path.exists() else ""

    def records(self):
        if not self.access_log.exists():
            return []
        return [json.loads(line) for line in self.access_log.read_text().splitlines()]

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def signal(self, signum):
        self.proc.send_signal(signum)

    def stop(self, timeout_s=20):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def get(self, path, headers=None):
        request = urllib.request.Request(self.base + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def create_key(self, **spec):
        request = urllib.request.Request(
            self.base + "/admin/keys", data=json.dumps({"owner": "ws-user", **spec}).encode(),
            headers={"X-Master-Key": MASTER_KEY}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as reply:
            return json.loads(reply.read())

    def connect(self, path, key=None, **kwargs):
        headers = {"X-API-Key": key} if key else {}
        kwargs.setdefault("max_size", None)
        kwargs.setdefault("open_timeout", 10)
        kwargs.setdefault("close_timeout", 5)
        return connect(self.ws_base + path, additional_headers=headers, proxy=None,
                       ping_interval=None, **kwargs)

    def metric(self, sample):
        _, body = self.get("/metrics")
        for line in body.decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def wait_until(predicate, timeout_s, step_s=0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(step_s)
