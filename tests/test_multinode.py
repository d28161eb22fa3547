"""Two gateway nodes, one PostgreSQL, one Sentinel-managed Redis, a failover.

Each node is a `twistd -n apigw --workers 2` of its own on its own port;
both use a private database on the shared PostgreSQL (through a libpq host
list whose first host refuses connections) and a master, a replica and three
sentinels this test starts with `redis-server`. Node "open" runs with
`rate_limit_failure: open`, node "closed" with `closed`, so one failover shows
both policies.

Blocking on purpose: the test drives the nodes from outside, as clients
and an operator would, with threads for concurrent requests.
"""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.procs import create_key, free_port, gateway, http_request, log_problems, wait_healthy
from tests.keys_support import private_database
from tests.sentinel_support import SentinelRedis, redis_cli, wait_until

pytestmark = pytest.mark.slow

MASTER_KEY = "multinode-master-key"
PERIOD_S = 3600


class _Upstream(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"ok":true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def database():
    with private_database("apigw_multinode_") as name:
        yield name


@pytest.fixture
def sentinel_redis(tmp_path):
    servers = SentinelRedis(tmp_path / "redis")
    servers.dir.mkdir()
    try:
        yield servers.start()
    finally:
        servers.stop()


def _config(upstream_port, policy):
    return (f"services:\n  api:\n    url: \"http://127.0.0.1:{upstream_port}\"\n"
            f"    rate_limit: 5\n    retries: 0\n"
            f"settings:\n  rate_period: {PERIOD_S}\n  rate_limit_failure: {policy}\n")


class Sample:
    """One request's outcome, as a client saw it."""

    def __init__(self, node, sent, status, headers):
        self.node = node
        self.sent = sent  # time.monotonic() when sent
        self.answered = time.monotonic()
        self.status = status
        self.wall = time.time()
        self.remaining = headers.get("ratelimit-remaining")
        self.reset_s = headers.get("ratelimit-reset")

    @property
    def decided(self):
        """Counted in Redis: the limiter's headers are on it."""
        return self.remaining is not None

    @property
    def admitted(self):
        return self.status == 200

    @property
    def window(self):
        # Every decision says when its window ends; windows are PERIOD_S apart.
        return round((self.wall + int(self.reset_s)) / PERIOD_S)


def call(node, key):
    sent = time.monotonic()
    try:
        status, headers, _ = http_request(node.port, "GET", "/api/x",
                                          headers={"X-API-Key": key}, timeout_s=5)
    except OSError:
        status, headers = None, {}
    return Sample(node.name, sent, status, headers)


def readyz(node):
    status, _, body = http_request(node.port, "GET", "/readyz", timeout_s=5)
    return status, json.loads(body)


def _switch_watcher(sentinel_port, seen):
    """Records when a sentinel publishes +switch-master (redis-cli, line by line)."""
    import subprocess

    proc = subprocess.Popen(["redis-cli", "-p", str(sentinel_port), "SUBSCRIBE", "+switch-master"],
                            stdout=subprocess.PIPE, text=True)

    def read():
        for line in proc.stdout:
            if line.startswith("apigw-test "):
                seen.append(time.monotonic())
    threading.Thread(target=read, daemon=True).start()
    return proc


def test_two_nodes_keep_one_limit_across_a_sentinel_failover(
    tmp_path, upstream, database, sentinel_redis, record_property
):
    """When two nodes share one Redis behind Sentinel and its master is SIGKILLed, the limit is exact before and within 2 s of the promotion, each node follows its policy meanwhile, nothing crashes and /readyz names the new master."""
    redis = sentinel_redis
    closed_port = free_port()  # nothing listens: libpq must go on to the next host
    env = {
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{closed_port},127.0.0.1:5432/"
                        f"{database}?target_session_attrs=read-write",
        "REDIS_URL": redis.url,
        "MASTER_KEY": MASTER_KEY,
    }
    nodes = [gateway(policy, str(tmp_path), free_port(), _config(upstream, policy), env,
                     workers=2, access_log=False) for policy in ("open", "closed")]
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            wait_healthy(node, timeout_s=30)
        first_master = f"127.0.0.1:{redis.ports[0]}"
        for node in nodes:
            wait_until(f"{node.name} ready on {first_master}",
                       lambda: readyz(node) == (200, {"status": "ready",
                                                      "redis_master": first_master}), 15)
        pids = {node.name: sorted(node.tree()) for node in nodes}
        assert all(len(p) == 3 for p in pids.values()), pids  # supervisor + 2 workers

        # Keys made on one node work on the other: one database.
        exact_key = create_key(nodes[0].port, MASTER_KEY, "exact", rate_limit=20)
        failover_key = create_key(nodes[1].port, MASTER_KEY, "failover", rate_limit=25)
        # /readyz is answered by whichever worker takes the connection; the
        # other may not have reached Redis yet, and would give its first
        # requests the failure policy. Decided answers on many fresh
        # connections in a row mean every worker has.
        warm_key = create_key(nodes[0].port, MASTER_KEY, "warm-up", rate_limit=1_000_000)
        for node in nodes:
            wait_until(f"{node.name} deciding limits in every worker",
                       lambda: all(call(node, warm_key).decided for _ in range(20)), 15)

        # 1. One limit across both nodes and their four workers.
        with ThreadPoolExecutor(8) as pool:
            burst = list(pool.map(lambda i: call(nodes[i % 2], exact_key), range(60)))
        assert all(s.decided for s in burst), [s.status for s in burst]
        by_window = {}
        for s in burst:
            by_window.setdefault(s.window, []).append(s)
        for samples in by_window.values():
            assert sum(s.admitted for s in samples) == min(20, len(samples))
            assert all(s.status in (200, 429) for s in samples)

        # 2. Ten of the failover key's 25 used before the failover.
        before = [call(nodes[i % 2], failover_key) for i in range(10)]
        assert all(s.admitted and s.decided for s in before)

        # 3. SIGKILL the master; both nodes keep being asked.
        replica = redis.replica_port(redis.ports[0])
        switches = []
        # Each sentinel publishes it when it learns of the promotion: the
        # earliest is when the first client could have known.
        watchers = [_switch_watcher(port, switches) for port in redis.sentinel_ports]
        samples = []
        stop = threading.Event()

        def load(node):
            while not stop.is_set():
                samples.append(call(node, failover_key))
                time.sleep(0.01)
        loaders = [threading.Thread(target=load, args=(node,)) for node in nodes]
        time.sleep(0.2)  # the watcher is subscribed
        redis.server(redis.ports[0]).kill()
        killed = time.monotonic()
        for thread in loaders:
            thread.start()
        outage_readyz = {node.name: readyz(node) for node in nodes}
        try:
            promoted = wait_until("the replica promoted",
                                  lambda: redis.role(replica) == "master" and time.monotonic(),
                                  20, step_s=0.01)
            wait_until("+switch-master", lambda: switches, 10)
            time.sleep(2.5)
        finally:
            stop.set()
            for thread in loaders:
                thread.join(10)
            for watcher in watchers:
                watcher.kill()
                watcher.wait(5)
        switched = min(switches)
        new_master = f"127.0.0.1:{replica}"

        # 4. What each node did while no master answered, and when counting resumed.
        report = {"promotion_after_kill_s": round(promoted - killed, 3),
                  "switch_master_after_promotion_s": round(switched - promoted, 3)}
        for node in nodes:
            mine = sorted((s for s in samples if s.node == node.name), key=lambda s: s.sent)
            first_decided = next(s for s in mine if s.decided)
            last_undecided = max((s.sent for s in mine if not s.decided), default=killed)
            outage = [s for s in mine if s.sent < first_decided.sent]
            report[node.name] = {
                "first_decided_after_promotion_s": round(first_decided.answered - promoted, 3),
                "first_decided_after_switch_master_s":
                    round(first_decided.answered - switched, 3),
                "last_undecided_after_promotion_s": round(last_undecided - promoted, 3),
                "outage_admitted": sum(s.admitted for s in outage),
                "outage_refused": sum(not s.admitted for s in outage),
                "outage_statuses": sorted({s.status for s in outage}, key=str),
            }
            # Every worker of the node counts again within 2 s of the promotion.
            assert last_undecided - promoted < 2.0, report
            undecided = [s for s in mine if not s.decided]
            if node.name == "open":
                assert all(s.status == 200 for s in undecided), report
            else:
                assert all(s.status == 503 for s in undecided), report
        record_property("failover", json.dumps(report))
        print("failover report:", json.dumps(report))

        # 5. Nothing counted in Redis beyond the limit in any window, and no
        # count lost in the failover: exactly 25 admitted on the key's window.
        decided = before + [s for s in samples if s.decided]
        windows = {}
        for s in decided:
            windows.setdefault(s.window, []).append(s)
        for window, ss in windows.items():
            admitted = [s for s in ss if s.admitted]
            assert len(admitted) == min(25, len(ss)), (window, len(admitted), len(ss))
            # Each admission took its own slot: no count read twice.
            assert len({s.remaining for s in admitted}) == len(admitted)
        # The closed node admitted nothing Redis did not count.
        assert all(s.decided for s in samples if s.node == "closed" and s.admitted)

        # 6. Nobody crashed, and /readyz names the new master on every worker.
        assert {node.name: sorted(node.tree()) for node in nodes} == pids
        for node in nodes:
            assert outage_readyz[node.name][0] in (200, 503)
            for _ in range(6):
                assert readyz(node) == (200, {"status": "ready", "redis_master": new_master})
            assert log_problems(f"{node.dir}/twistd.log") == {}
            log = open(f"{node.dir}/twistd.log").read()
            assert f"moved to {new_master}" in log
    finally:
        codes = {node.name: node.stop() for node in nodes}
    assert codes == {"open": 0, "closed": 0}
    assert redis_cli(redis.sentinel_ports[0], "PING") == "PONG"
