"""A short soak against hostile peers: is the gateway's memory flat?

Two misbehaving upstreams and one kind of misbehaving client, each bounded
in count and time, against one `twistd -n apigw` on loopback:

- an upstream that answers with header lines that never end (the gateway
  must cut it off at upstream_max_head_bytes and answer 502);
- an upstream whose body never ends, read by 200 clients that never read
  (the gateway must cut each off after client_send_timeout and let go of
  its upstream connection).

It prints the gateway's RSS and open file descriptors once a second and
ends with a verdict: RSS flat (within 10 MB) over the second half of the
run, once the held clients' buffers have reached their high-water mark, and
no upstream connection left held. Run: .venv/bin/python
bench/hostile_soak.py [--duration 60].
"""

import argparse
import os
import socket
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import procs  # noqa: E402  (a sibling module; bench/ is not a package)

YAML = """\
services:
  heads:
    url: "http://127.0.0.1:{heads}"
    auth: false
    retries: 0
  stream:
    url: "http://127.0.0.1:{stream}"
    auth: false
    retries: 0
settings:
  client_send_timeout: 3
  default_rate_limit: null
"""


class _Upstream(threading.Thread):
    """A raw upstream on a thread of its own; `mode` is heads or stream."""

    def __init__(self, mode, stop):
        super().__init__(daemon=True)
        self.mode = mode
        self.stop = stop
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.open = 0
        self._lock = threading.Lock()

    def run(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with self._lock:
            self.open += 1
        conn.settimeout(5)
        try:
            conn.recv(65536)
            # Blocking from here: only the gateway hanging up ends a send.
            conn.settimeout(None)
            if self.mode == "heads":
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                line = b"X-Filler: " + b"y" * 100 + b"\r\n"
                while not self.stop.is_set():
                    conn.sendall(line * 100)  # until the gateway hangs up
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                chunk = b"%x\r\n%s\r\n" % (65536, b"z" * 65536)
                while not self.stop.is_set():
                    conn.sendall(chunk)  # blocks once the gateway stops reading
        except OSError:
            pass
        finally:
            conn.close()
            with self._lock:
                self.open -= 1


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench/hostile_soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=30, help="seconds of load (default 30)")
    p.add_argument("--clients", type=int, default=200, help="clients that never read")
    args = p.parse_args(argv)
    stop = threading.Event()
    heads, stream = _Upstream("heads", stop), _Upstream("stream", stop)
    heads.start()
    stream.start()
    workdir = tempfile.mkdtemp(prefix="apigw-hostile-soak-")
    port = procs.free_port()
    gw = procs.gateway("gw", workdir, port, YAML.format(heads=heads.port, stream=stream.port),
                       {"DATABASE_URL": f"sqlite:///{workdir}/k.db"}, access_log=False)
    held = []
    try:
        gw.start()
        procs.wait_healthy(gw)
        pid = gw.pid
        samples = []
        started = time.monotonic()
        statuses = {}
        while time.monotonic() - started < args.duration:
            # A round: endless heads (each must end as a 502) and a wave of
            # clients that never read an endless body.
            for _ in range(5):
                status, _, _ = procs.http_request(port, "GET", "/heads/x", timeout_s=10)
                statuses[status] = statuses.get(status, 0) + 1
            for _ in range(args.clients // 10):
                s = socket.create_connection(("127.0.0.1", port))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.sendall(b"GET /stream/x HTTP/1.1\r\nHost: x\r\n\r\n")
                held.append(s)  # never read
            while len(held) > args.clients:
                held.pop(0).close()
            rss, fds = procs.rss_kb(pid), procs.fd_count(pid)
            samples.append((time.monotonic() - started, rss, fds, stream.open))
            procs.say(f"{samples[-1][0]:5.1f} s  RSS {rss} kB  fds {fds}  "
                      f"held upstream bodies {stream.open}  /heads statuses {statuses}")
            time.sleep(1)
        for s in held:
            s.close()
        held = []
        time.sleep(4)  # past client_send_timeout: every cut-off is done
        end_rss, end_fds = procs.rss_kb(pid), procs.fd_count(pid)
        # The same number of clients is held from the first
        # client_send_timeout on, but the allocator's high-water mark takes
        # a while to settle: judge the second half of the run.
        half = [r for t, r, _, _ in samples if t >= args.duration / 2] or [samples[-1][1]]
        procs.say(f"end: RSS {end_rss} kB (first {samples[0][1]}, second half "
                  f"{half[0]} -> {half[-1]}), fds {end_fds}, "
                  f"upstream bodies still held {stream.open}")
        problems = []
        # 502 for each endless head; 503 once that target's breaker opened.
        if statuses.keys() - {502, 503} or not statuses.get(502):
            problems.append(f"endless heads answered {statuses}, not only 502 and 503")
        if half[-1] - half[0] > 10 * 1024:
            problems.append(f"RSS grew by {(half[-1] - half[0]) // 1024} MB in the second half")
        if stream.open:
            problems.append(f"{stream.open} upstream connections still held")
        procs.say("verdict: CLEAN" if not problems else "verdict: " + "; ".join(problems))
        return 1 if problems else 0
    finally:
        for s in held:
            s.close()
        stop.set()
        gw.stop()


if __name__ == "__main__":
    procs.run_script(main, "hostile_soak")
