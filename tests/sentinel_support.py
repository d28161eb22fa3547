"""A Sentinel-managed Redis of the test's own: a master, a replica and three
sentinels, each a `redis-server` on a free loopback port, stopped by PID.

Blocking on purpose (subprocess, redis-cli, short sleeps): it is set up and
inspected from outside the gateway, like an operator's shell would.
"""

import subprocess
import time

from tests.ratelimit_support import free_port

MASTER_NAME = "apigw-test"
# Small enough for a failover in a few seconds, large enough that a
# loaded CI machine does not see a master as down when it is only slow.
DOWN_AFTER_MS = 600


def redis_cli(port, *args, timeout_s=5):
    out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *map(str, args)],
                         capture_output=True, text=True, timeout=timeout_s)
    return out.stdout.strip()


def wait_until(what, check, timeout_s, step_s=0.02):
    """check()'s first true value; an assertion naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} within {timeout_s}s"
        time.sleep(step_s)


class _Server:
    def __init__(self, name, argv, port, log_path):
        self.name = name
        self.argv = argv
        self.port = port
        self.log_path = log_path
        self.process = None

    def start(self):
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)

        def up():
            assert self.process.poll() is None, \
                f"{self.name} exited with {self.process.returncode}; see {self.log_path}"
            return redis_cli(self.port, "PING") == "PONG"

        wait_until(f"{self.name} answering on :{self.port}", up, 5)

    def kill(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)

    @property
    def alive(self):
        return self.process is not None and self.process.poll() is None


class SentinelRedis:
    """Master on `ports[0]`, replica on `ports[1]`, sentinels on `sentinel_ports`."""

    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.ports = [free_port(), free_port()]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.servers = []
        self.sentinels = []

    def _redis(self, name, port, *extra):
        d = self.dir / name
        d.mkdir()
        return _Server(name, ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", str(d), *extra],
                       port, str(d / "log"))

    def start(self):
        master = self._redis("redis-a", self.ports[0])
        replica = self._redis("redis-b", self.ports[1], "--replicaof", "127.0.0.1",
                              str(self.ports[0]))
        self.servers = [master, replica]
        for server in self.servers:
            server.start()
        for i, port in enumerate(self.sentinel_ports):
            d = self.dir / f"sentinel-{i}"
            d.mkdir()
            conf = d / "sentinel.conf"
            # Sentinel rewrites its file (known replicas, epochs): one each.
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {d}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.ports[0]} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER_NAME} 10000\n"
            )
            sentinel = _Server(f"sentinel-{i}", ["redis-server", str(conf), "--sentinel"],
                               port, str(d / "log"))
            sentinel.start()
            self.sentinels.append(sentinel)
        self.wait_settled(self.ports[0])
        return self

    def master_fields(self, sentinel_port):
        words = redis_cli(sentinel_port, "SENTINEL", "MASTER", MASTER_NAME).split("\n")
        return dict(zip(words[::2], words[1::2]))

    def wait_settled(self, master_port, timeout_s=20):
        """Until every sentinel names `master_port` with one replica and two
        other sentinels, and the replica is in sync: a failover can happen."""
        def settled():
            for port in self.sentinel_ports:
                f = self.master_fields(port)
                if f.get("port") != str(master_port) or f.get("num-slaves") != "1" \
                        or f.get("num-other-sentinels") != "2" or "s_down" in f.get("flags", ""):
                    return False
            replica = self.replica_port(master_port)
            return "master_link_status:up" in redis_cli(replica, "INFO", "replication")
        wait_until("the sentinels to agree on the master, its replica and each other",
              settled, timeout_s, step_s=0.1)

    def replica_port(self, master_port):
        return next(p for p in self.ports if p != master_port)

    def server(self, port):
        return next(s for s in self.servers if s.port == port)

    def role(self, port):
        return redis_cli(port, "ROLE", timeout_s=2).split("\n")[0]

    @property
    def url(self):
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def stop(self):
        for server in self.sentinels + self.servers:
            server.kill()
