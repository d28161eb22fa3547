"""Instructions per request: one gateway under callgrind, behind wrk.

    bench/profile [--peer apigw|apigw-noauth] [--seconds 20] [--top 40]

callgrind counts the instructions the gateway process executes (user
space only, not the kernel's share), which is repeatable from run to run
and does not depend on what else the machine is doing, unlike req/s. It
starts the bench's nginx upstream and one gateway exactly as bench/run
does (`apigw`: key, Redis limiter, metrics, access log; `apigw-noauth`:
proxying alone), runs it under `valgrind --tool=callgrind` with instrumentation
off, warms it up, then counts only while wrk sends `--seconds` of requests
(`-c4`). Prints instructions per request and the functions with the
largest inclusive share; the raw profile stays in bench/results/.
"""

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

import bench
import procs

RESULTS = os.path.join(procs.BENCH, "results")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench/profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--peer", choices=("apigw", "apigw-noauth"), default="apigw")
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--top", type=int, default=40)
    return p.parse_args(argv)


def callgrind_control(*args):
    return subprocess.run(["callgrind_control", *args], capture_output=True, text=True,
                          timeout=120)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate", "wrk", "nginx"):
        if shutil.which(tool) is None:
            raise procs.BenchError(f"{tool} is not installed")
    os.makedirs(RESULTS, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="apigw-profile-")
    started = []
    redis_db = None
    try:
        _, upstream_port = procs.start_upstream(workdir, started)
        master_key = secrets.token_urlsafe(24)
        if args.peer == "apigw":
            redis_db = procs.pick_redis_db(bench.SHARED_REDIS_PORT)
            yaml_text = procs.SERVICE_YAML.format(service=bench.SERVICE,
                                                  upstream_port=upstream_port,
                                                  limit=bench.NEVER_REACHED)
            env = {"DATABASE_URL": f"sqlite:///{workdir}/{args.peer}/apigw.db",
                   "REDIS_URL": f"redis://127.0.0.1:{bench.SHARED_REDIS_PORT}/{redis_db}",
                   "MASTER_KEY": master_key}
            access_log = True
        else:
            yaml_text = bench.NOAUTH_YAML.format(service=bench.SERVICE,
                                                 upstream_port=upstream_port)
            env = {"DATABASE_URL": f"sqlite:///{workdir}/{args.peer}/apigw.db",
                   "MASTER_KEY": master_key}
            access_log = False
        g = procs.gateway(args.peer, workdir, procs.free_port(), yaml_text, env,
                          access_log=access_log)
        out_file = os.path.join(g.dir, "callgrind.out")
        g.argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                  f"--callgrind-out-file={out_file}", *g.argv]
        g.start()
        started.append(g)
        procs.wait_healthy(g, timeout_s=180)
        api_key = procs.create_key(g.port, master_key, "profile") \
            if args.peer == "apigw" else "unused"
        peer = bench.Peer(args.peer, g.port, f"/{bench.SERVICE}/")
        peer.api_key = api_key
        bench.check_peer(peer)
        bench.run_wrk(peer, 4, 5)  # warm: imports, caches, pooled connections
        on = callgrind_control("-i", "on", str(g.pid))
        if on.returncode != 0 or "OK" not in on.stdout:
            raise procs.BenchError(f"callgrind_control -i on failed: {on.stdout}{on.stderr}")
        result = bench.run_wrk(peer, 4, args.seconds)
        callgrind_control("-i", "off", str(g.pid))
        callgrind_control("-d", str(g.pid))
        time.sleep(1)
        g.stop()
        dumps = sorted(f for f in os.listdir(g.dir) if f.startswith("callgrind.out"))
        requests = result["requests"]
        stamp = time.strftime("%Y%m%d-%H%M%S")
        kept = os.path.join(RESULTS, f"callgrind-{args.peer}-{stamp}.out")
        biggest = max(dumps, key=lambda n: os.path.getsize(os.path.join(g.dir, n)))
        shutil.copy(os.path.join(g.dir, biggest), kept)
        annotate = subprocess.run(
            ["callgrind_annotate", "--inclusive=yes", kept],
            capture_output=True, text=True, timeout=300).stdout
        totals = re.search(r"^\s*([\d,]+)\s+\(100\.0%\)\s+PROGRAM TOTALS", annotate, re.M)
        total = int(totals.group(1).replace(",", "")) if totals else 0
        print(json.dumps({"peer": args.peer, "requests": requests, "instructions": total,
                          "instructions_per_request": round(total / max(requests, 1)),
                          "errors": result.get("errors"), "profile": kept}))
        rows = [line for line in annotate.splitlines() if re.match(r"^\s*[\d,]+ \(", line)]
        for line in rows[:args.top]:
            print(line[:200])
        return 0
    finally:
        for proc in reversed(started):
            proc.stop()
        if redis_db is not None:
            procs.redis_delete_pattern(bench.SHARED_REDIS_PORT, redis_db, "*")
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    procs.run_script(main, "bench/profile")
