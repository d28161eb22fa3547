"""The benchmark: apigw with its full request path against an nginx reverse
proxy, both in front of the same fast nginx upstream, measured with wrk.

Run it through bench/run (see bench/README.md): that wrapper installs wrk and
nginx when missing and uses the project's .venv.
"""

import argparse
import datetime
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import procs  # noqa: E402  (a sibling module; bench/ is not a package)
from procs import BenchError  # noqa: E402

SHARED_REDIS_PORT = 6379
SERVICE = "bench"
# Far above what any run can send in one window: the limiter decides on every
# request but never refuses one.
NEVER_REACHED = 2_000_000_000

GATEWAY_YAML = """\
services:
  {service}:
    url: "http://127.0.0.1:{upstream_port}"
    rate_limit: {limit}
settings:
  rate_period: 60
"""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 s per measurement, 1 round, short warm-up")
    p.add_argument("--duration", type=int, help="whole seconds per measurement (default 10)")
    p.add_argument("--rounds", type=int, help="rounds over all peers (default 2)")
    p.add_argument("--connections", default="10,50",
                   help="comma-separated wrk connection counts (default 10,50)")
    p.add_argument("--no-workers", action="store_true",
                   help="skip the `--workers 2` gateway even when the option exists")
    p.add_argument("--results-dir", default=os.path.join(procs.BENCH, "results"),
                   help="where the raw JSON goes (default bench/results)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (configs and logs) for inspection")
    args = p.parse_args(argv)
    args.duration = args.duration or (2 if args.quick else 10)
    args.rounds = args.rounds or (1 if args.quick else 2)
    # wrk takes whole seconds only.
    args.warmup_s = 1 if args.quick else 2
    args.connections = [int(c) for c in args.connections.split(",")]
    if args.duration <= 0 or args.rounds <= 0 or min(args.connections) <= 0:
        p.error("--duration, --rounds and --connections must be positive")
    return args


class Peer:
    """One thing wrk measures; `cpu_proc` is whose CPU counts per request."""

    def __init__(self, name, port, path, cpu_proc=None):
        self.name = name
        self.port = port
        self.path = path
        self.url = f"http://127.0.0.1:{port}{path}"
        self.cpu_proc = cpu_proc


def run_wrk(peer, connections, duration_s, api_key):
    argv = procs.wrk_argv(peer.url, connections, duration_s, "report.lua",
                          headers=[f"X-API-Key: {api_key}"])
    pids = peer.cpu_proc.tree() if peer.cpu_proc else []
    cpu_before = procs.cpu_seconds(pids)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 30)
    cpu_after = procs.cpu_seconds(peer.cpu_proc.tree()) if peer.cpu_proc else 0.0
    lines = [line for line in out.stdout.splitlines() if line.startswith("BENCH_JSON ")]
    if out.returncode != 0 or not lines:
        raise BenchError(f"wrk against {peer.name} failed ({out.returncode}): "
                         f"{(out.stderr or out.stdout).strip()[-300:]}")
    result = json.loads(lines[-1].split(" ", 1)[1])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["cpu_s"] = cpu_after - cpu_before if peer.cpu_proc else None
    result["peer"] = peer.name
    result["connections"] = connections
    result["processes"] = len(pids)
    return result


def summarise(results, peers, connections):
    """One row per (peer, connections) over all rounds."""
    rows = []
    for c in connections:
        for peer in peers:
            runs = [r for r in results if r["peer"] == peer.name and r["connections"] == c]
            requests = sum(r["requests"] for r in runs)
            seconds = sum(r["duration_us"] for r in runs) / 1e6
            errors = sum(r["connect_errors"] + r["read_errors"] + r["write_errors"]
                         + r["status_errors"] + r["timeouts"] for r in runs)
            cpu = None
            if peer.cpu_proc is not None and requests:
                cpu = sum(r["cpu_s"] for r in runs) / requests * 1e6
            rows.append({
                "peer": peer.name, "connections": c, "rounds": len(runs),
                "rps": requests / seconds if seconds else 0.0,
                "rps_min": min(r["rps"] for r in runs), "rps_max": max(r["rps"] for r in runs),
                "p50_ms": sum(r["p50_us"] for r in runs) / len(runs) / 1000,
                "p99_ms": sum(r["p99_us"] for r in runs) / len(runs) / 1000,
                "cpu_us_per_request": cpu, "errors": errors,
            })
    for row in rows:
        ref = next(r for r in rows if r["peer"] == "nginx proxy"
                   and r["connections"] == row["connections"])
        row["ratio_to_nginx"] = row["rps"] / ref["rps"] if ref["rps"] else None
    return rows


def format_table(rows):
    header = ["peer", "c", "requests/s", "p50 ms", "p99 ms", "CPU µs/req", "× nginx rps",
              "errors"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cpu = "—" if r["cpu_us_per_request"] is None else f"{r['cpu_us_per_request']:.0f}"
        lines.append("| " + " | ".join([
            r["peer"], str(r["connections"]), f"{r['rps']:,.0f}", f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}", cpu, f"{r['ratio_to_nginx']:.3f}", str(r["errors"]),
        ]) + " |")
    return "\n".join(lines)


def check_peer(peer, api_key):
    status, _, body = procs.http_request(peer.port, "GET", peer.path,
                                         headers={"X-API-Key": api_key})
    if status != 200 or b"bench-upstream" not in body:
        raise BenchError(f"{peer.name} answered {status} {body[:200]!r} before the run")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for tool in ("wrk", "nginx", "redis-cli"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed; bench/run installs it (Debian)")
    if not procs.redis_up(SHARED_REDIS_PORT):
        raise BenchError(f"needs Redis on 127.0.0.1:{SHARED_REDIS_PORT} (.ci/run starts one)")
    workers = not args.no_workers and procs.twistd_has_option("--workers")
    workdir = tempfile.mkdtemp(prefix="apigw-bench-")
    started = []
    redis_db = None
    try:
        upstream_port = procs.free_port()
        upstream = procs.nginx("upstream", workdir, upstream_port).start()
        started.append(upstream)
        procs.wait_for_port(upstream_port, 15, upstream)
        proxy_port = procs.free_port()
        proxy = procs.nginx("nginx-proxy", workdir, proxy_port, upstream_port).start()
        started.append(proxy)

        redis_db = procs.pick_redis_db(SHARED_REDIS_PORT)
        master_key = secrets.token_urlsafe(24)
        yaml_text = GATEWAY_YAML.format(service=SERVICE, upstream_port=upstream_port,
                                        limit=NEVER_REACHED)
        gateways = [("apigw", None)] + ([("apigw --workers 2", 2)] if workers else [])
        gateway_procs = []
        for name, n in gateways:
            d = name.replace(" --workers ", "-w")
            env = {"DATABASE_URL": f"sqlite:///{workdir}/{d}/apigw.db",
                   "REDIS_URL": f"redis://127.0.0.1:{SHARED_REDIS_PORT}/{redis_db}",
                   "MASTER_KEY": master_key}
            g = procs.gateway(d, workdir, procs.free_port(), yaml_text, env, workers=n)
            g.start()
            started.append(g)
            gateway_procs.append((name, g))
        procs.wait_for_port(proxy_port, 15, proxy)
        for _, g in gateway_procs:
            procs.wait_healthy(g)

        peers = [Peer("upstream direct", upstream_port, "/"),
                 Peer("nginx proxy", proxy_port, f"/{SERVICE}/", cpu_proc=proxy)]
        keys = {}
        for name, g in gateway_procs:
            keys[name] = procs.create_key(g.port, master_key, "bench")
            peers.append(Peer(name, g.port, f"/{SERVICE}/", cpu_proc=g))
        # nginx ignores the key; sending one everywhere keeps requests alike.
        key_of = {p.name: keys.get(p.name, next(iter(keys.values()))) for p in peers}
        for peer in peers:
            check_peer(peer, key_of[peer.name])  # and caches the key in apigw

        say(f"bench: {len(peers)} peers, c={args.connections}, {args.rounds} round(s) of "
            f"{args.duration:g} s each; workdir {workdir}")
        for peer in peers:
            run_wrk(peer, min(args.connections), args.warmup_s, key_of[peer.name])
        results = []
        for n in range(args.rounds):
            for c in args.connections:
                for peer in peers:
                    r = run_wrk(peer, c, args.duration, key_of[peer.name])
                    r["round"] = n + 1
                    results.append(r)
                    say(f"  round {n + 1} c={c} {peer.name}: {r['rps']:,.0f} req/s")
        crashed = [g.name for _, g in gateway_procs if not g.alive]
        if crashed:
            raise BenchError(f"gateway(s) died during the run: {', '.join(crashed)}")
        access_lines = {name: _count_lines(os.path.join(g.dir, "access.log"))
                        for name, g in gateway_procs}
    finally:
        for proc in reversed(started):
            proc.stop()
        if redis_db is not None:
            procs.redis_delete_pattern(SHARED_REDIS_PORT, redis_db, f"apigw:rl:{SERVICE}:*")
        if args.keep:
            say(f"bench: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = summarise(results, peers, args.connections)
    when = datetime.datetime.now(datetime.timezone.utc)
    command = "bench/run " + " ".join(sys.argv[1:] if argv is None else argv)
    print()
    print(f"apigw benchmark, {when:%Y-%m-%d %H:%M} UTC, `{command.strip()}`, "
          f"{os.cpu_count()} CPUs, wrk -t1 -cN -d{args.duration:g}s, "
          f"{args.rounds} round(s), mean over rounds")
    print(format_table(rows))
    os.makedirs(args.results_dir, exist_ok=True)
    path = os.path.join(args.results_dir, f"bench-{when:%Y%m%dT%H%M%SZ}.json")
    with open(path, "w") as f:
        json.dump({
            "date": when.isoformat(), "command": command.strip(), "rows": rows,
            "runs": results, "access_log_lines": access_lines,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": sys.version.split()[0]},
            "versions": {"wrk": procs.tool_version(["wrk", "-v"]),
                         "nginx": procs.tool_version(["nginx", "-v"]),
                         "apigw_commit": _git_commit()},
        }, f, indent=2)
    print(f"raw results: {os.path.relpath(path)}")
    return 0


def _count_lines(path):
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def _git_commit():
    out = subprocess.run(["git", "-C", procs.REPO, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    return out.stdout.strip() or None


say = procs.say


if __name__ == "__main__":
    procs.run_script(main, "bench")
