"""Rate-limit test support: a private redis-server and Redis key cleanup."""

import socket
import subprocess
import time

from twisted.internet import task

from apigw.config import RedisURL


def sleep(seconds):
    from twisted.internet import reactor

    return task.deferLater(reactor, seconds, lambda: None)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server of the test's own on a free port, killed by PID.

    For outages and SCRIPT FLUSH: the shared Redis is never stopped or flushed.
    """

    def __init__(self, tmp_path):
        self.port = free_port()
        self.dir = tmp_path
        self.process = None

    def start(self):
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert self.process.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)

    def stop(self):
        # SIGKILL also ends a SIGSTOPped server.
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None

    @property
    def url(self):
        return RedisURL(host="127.0.0.1", port=self.port, db=0, password=None)

    @property
    def redis_url(self):
        return f"redis://127.0.0.1:{self.port}/0"


def delete_keys(db, pattern):
    """Delete the shared Redis keys a test made (redis-cli: no reactor needed)."""
    keys = subprocess.run(
        ["redis-cli", "-n", str(db), "--scan", "--pattern", pattern],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout.split()
    for start in range(0, len(keys), 500):
        subprocess.run(
            ["redis-cli", "-n", str(db), "DEL", *keys[start:start + 500]],
            capture_output=True, timeout=10, check=True,
        )
    return len(keys)
