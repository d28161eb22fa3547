"""Reload and drain under wrk load: does either lose a request?

    .venv/bin/python bench/ops_under_load.py [--duration 10] [--connections 20]

Starts an nginx upstream and `twistd -n apigw` on loopback, then:
1. reload: wrk runs for --duration seconds; meanwhile the config file gains
   a service and SIGHUP is sent, twice. Every response must be 2xx, with no
   socket error of any kind.
2. drain: wrk runs again; halfway through, SIGTERM. Every response wrk got
   must be 2xx and no request may be cut mid-flight (no read errors, no
   timeouts). Connections refused after the listener closed (wrk counts
   them as connect or write errors) are requests never sent, reported
   separately. The gateway must exit 0.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import procs  # noqa: E402


def wrk(url, connections, duration_s):
    argv = procs.wrk_argv(url, connections, duration_s, "report.lua")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 30)
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):]), out.stdout
    raise procs.BenchError(f"wrk printed no summary:\n{out.stdout}\n{out.stderr}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=20)
    args = parser.parse_args()
    procs.exit_cleanly_on_sigterm()
    workdir = tempfile.mkdtemp(prefix="apigw-ops-")
    upstream = procs.nginx("upstream", workdir, procs.free_port()).start()
    started = [upstream]
    failures = []
    try:
        procs.wait_for_port(upstream.port, 10, upstream)
        config = (f"services:\n  svc:\n    url: \"http://127.0.0.1:{upstream.port}\"\n"
                  "    auth: false\n    rate_limit: null\n")
        env = {"DATABASE_URL": f"sqlite:///{workdir}/apigw.db"}
        gw = procs.gateway("gateway", workdir, procs.free_port(), config, env).start()
        started.append(gw)
        procs.wait_healthy(gw)
        url = f"http://127.0.0.1:{gw.port}/svc/x"
        config_path = os.path.join(gw.dir, "gateway.yaml")

        # 1. reload under load
        def reloads():
            for i, at in enumerate((0.3, 0.6)):
                time.sleep(args.duration * (at - (0.3 if i else 0)))
                with open(config_path, "a") as f:
                    f.write(f"  added{i}:\n    url: \"http://127.0.0.1:{upstream.port}\"\n"
                            "    auth: false\n")
                gw.send(signal.SIGHUP)
        t = threading.Thread(target=reloads)
        t.start()
        summary, _ = wrk(url, args.connections, args.duration)
        t.join()
        status = procs.http_request(gw.port, "GET", "/added1/x")[0]
        errors = {k: summary[k] for k in ("connect_errors", "read_errors", "write_errors",
                                          "status_errors", "timeouts")}
        print(f"reload: {summary['requests']} requests, errors {errors}, "
              f"new service answered {status}")
        if any(errors.values()) or status != 200:
            failures.append("reload lost requests or did not apply")

        # 2. drain under load
        def terminate():
            time.sleep(args.duration / 2)
            gw.send(signal.SIGTERM)
        t = threading.Thread(target=terminate)
        t.start()
        summary, _ = wrk(url, args.connections, args.duration)
        t.join()
        code = gw.popen.wait(timeout=30)
        # A request is lost if it went out and no whole 2xx came back: read
        # errors, timeouts, non-2xx. Once the listener is closed, wrk's
        # reconnects are refused and its next write fails: connect and
        # write errors are requests that never left wrk.
        cut = {k: summary[k] for k in ("read_errors", "status_errors", "timeouts")}
        never_sent = summary["connect_errors"] + summary["write_errors"]
        print(f"drain: {summary['requests']} requests answered, lost {cut}, "
              f"refused after the listener closed (never sent) {never_sent}, "
              f"gateway exit status {code}")
        if any(cut.values()) or code != 0:
            failures.append("drain lost requests or exited non-zero")
        with open(os.path.join(gw.dir, "twistd.log")) as f:
            for line in f:
                if "config reloaded" in line or "draining" in line or "grace" in line:
                    print("  log:", line.rstrip())
    finally:
        for proc in reversed(started):
            if proc.alive:
                proc.stop()
    print("OK" if not failures else "FAILED: " + "; ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
