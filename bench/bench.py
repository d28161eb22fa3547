"""The benchmark: apigw (its full request path, and proxying alone) against
an nginx reverse proxy, aiohttp and Twisted reverse proxies and the Flask
prototype apigw replaced, all in front of the same fast nginx upstream,
measured with wrk.

Run it through bench/run (see bench/README.md): that wrapper installs wrk and
nginx when missing and uses the project's .venv; the peers' own virtualenv
(bench/.venv-peers) is made here when missing.
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
import peerprocs  # noqa: E402
import procs  # noqa: E402  (a sibling module; bench/ is not a package)
from procs import BenchError  # noqa: E402

SHARED_REDIS_PORT = 6379
SERVICE = "bench"
# Far above what any run can send in one window: the limiter decides on every
# request but never refuses one.
NEVER_REACHED = 2_000_000_000


NOAUTH_YAML = """\
services:
  {service}:
    url: "http://127.0.0.1:{upstream_port}"
    auth: false
    rate_limit: null
"""


# (--peers name, row name), in the order each round measures them.
PEERS = [
    ("upstream", "upstream direct"),
    ("nginx", "nginx proxy"),
    ("aiohttp", "aiohttp proxy (asyncio)"),
    ("aiohttp-uvloop", "aiohttp proxy (uvloop)"),
    ("twisted", "twisted ReverseProxyResource"),
    ("apigw", "apigw"),
    ("apigw-noauth", "apigw auth:false no limit"),
    ("apigw-noauth-file", "apigw auth:false no limit, access log file"),
    ("apigw-w2", "apigw --workers 2"),
    ("prototype", peerprocs.Prototype.name),
]
NAME = dict(PEERS)
# The rows the ratio columns divide by.
NGINX = NAME["nginx"]
AIOHTTP_UVLOOP = NAME["aiohttp-uvloop"]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 s per measurement, 1 round, short warm-up")
    p.add_argument("--duration", type=int, help="whole seconds per measurement (default 10)")
    p.add_argument("--rounds", type=int, help="rounds over all peers (default 2)")
    p.add_argument("--connections", default="10,50",
                   help="comma-separated wrk connection counts (default 10,50)")
    p.add_argument("--peers", default=",".join(k for k, _ in PEERS),
                   help="comma-separated peers to measure, of: "
                        + ", ".join(k for k, _ in PEERS) + " (default: all)")
    p.add_argument("--no-workers", action="store_true",
                   help="skip the `--workers 2` gateway even when the option exists")
    p.add_argument("--no-prototype", action="store_true",
                   help="skip the Flask prototype peer")
    p.add_argument("--prototype", metavar="DIR", default=peerprocs.DEFAULT_PROTOTYPE,
                   help="the Flask prototype's folder, copied at run time (default: "
                        "$APIGW_PROTOTYPE, else a seed/prototype folder in a directory "
                        "beside the checkout)")
    p.add_argument("--prototype-postgres", metavar="URL", default=peerprocs.DEFAULT_PG_ADMIN,
                   help="PostgreSQL server (and a database to connect to) where the "
                        "prototype's own database is created and dropped "
                        f"(default {peerprocs.DEFAULT_PG_ADMIN})")
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
    chosen = [k.strip() for k in args.peers.split(",") if k.strip()]
    unknown = [k for k in chosen if k not in NAME]
    if unknown or not chosen:
        p.error(f"--peers: unknown {', '.join(unknown) or 'nothing'}; "
                f"choose from {', '.join(NAME)}")
    args.skipped = {}
    if args.no_workers and "apigw-w2" in chosen:
        args.skipped["apigw-w2"] = "--no-workers"
    if args.no_prototype and "prototype" in chosen:
        args.skipped["prototype"] = "--no-prototype"
    args.peers = [k for k, _ in PEERS if k in chosen and k not in args.skipped]
    return args


class Peer:
    """One thing wrk measures; `cpu_proc` is whose CPU counts per request."""

    def __init__(self, key, port, path, cpu_proc=None):
        self.key = key
        self.name = NAME[key]
        self.port = port
        self.path = path
        self.url = f"http://127.0.0.1:{port}{path}"
        self.cpu_proc = cpu_proc
        self.api_key = None


def run_wrk(peer, connections, duration_s):
    argv = procs.wrk_argv(peer.url, connections, duration_s, "report.lua",
                          headers=[f"X-API-Key: {peer.api_key}"])
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
    """One row per (peer, connections) over all rounds, with its ratios to
    the nginx proxy and to the aiohttp proxy on uvloop at the same
    concurrency (None when that peer was not measured)."""
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
                "peer": peer.name, "key": peer.key, "connections": c, "rounds": len(runs),
                "rps": requests / seconds if seconds else 0.0,
                "rps_min": min(r["rps"] for r in runs), "rps_max": max(r["rps"] for r in runs),
                "p50_ms": sum(r["p50_us"] for r in runs) / len(runs) / 1000,
                "p99_ms": sum(r["p99_us"] for r in runs) / len(runs) / 1000,
                "cpu_us_per_request": cpu, "errors": errors,
            })

    def ratio(value, ref_row, field):
        ref = ref_row[field] if ref_row else None
        return value / ref if value is not None and ref else None

    for row in rows:
        same_c = {r["peer"]: r for r in rows if r["connections"] == row["connections"]}
        row["ratio_to_nginx"] = ratio(row["rps"], same_c.get(NGINX), "rps")
        row["ratio_to_aiohttp_uvloop"] = ratio(row["rps"], same_c.get(AIOHTTP_UVLOOP), "rps")
        row["cpu_ratio_to_nginx"] = ratio(row["cpu_us_per_request"], same_c.get(NGINX),
                                          "cpu_us_per_request")
    return rows


TABLE_HEADER = ["peer", "c", "requests/s", "p50 ms", "p99 ms", "CPU µs/req", "CPU × nginx",
                "× nginx rps", "× aiohttp+uvloop rps", "errors"]


def format_table(rows):
    def num(value, fmt):
        return "—" if value is None else format(value, fmt)

    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["peer"], str(r["connections"]), f"{r['rps']:,.0f}", f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}", num(r["cpu_us_per_request"], ".0f"),
            num(r["cpu_ratio_to_nginx"], ".2f"), num(r["ratio_to_nginx"], ".3f"),
            num(r["ratio_to_aiohttp_uvloop"], ".3f"), str(r["errors"]),
        ]) + " |")
    return "\n".join(lines)


def check_peer(peer):
    status, _, body = procs.http_request(peer.port, "GET", peer.path,
                                         headers={"X-API-Key": peer.api_key})
    if status != 200 or b"bench-upstream" not in body:
        raise BenchError(f"{peer.name} answered {status} {body[:200]!r} before the run")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for tool in ("wrk", "nginx", "redis-cli"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed; bench/run installs it (Debian)")
    chosen = set(args.peers)
    if chosen & {"apigw", "apigw-w2", "prototype"} and not procs.redis_up(SHARED_REDIS_PORT):
        raise BenchError(f"needs Redis on 127.0.0.1:{SHARED_REDIS_PORT} (.ci/run starts one)")
    if "apigw-w2" in chosen and not procs.twistd_has_option("--workers"):
        args.skipped["apigw-w2"] = "`twistd apigw --help` lists no --workers"
    if "prototype" in chosen:
        problem = peerprocs.prototype_problem(args.prototype, args.prototype_postgres)
        if problem:
            args.skipped["prototype"] = problem
    for key, why in args.skipped.items():
        say(f"bench: skipping {NAME[key]}: {why}")
    args.peers = [k for k in args.peers if k not in args.skipped]
    chosen = set(args.peers)
    # Before anything starts: the peers' own virtualenv, made when missing.
    venv_stamp = peerprocs.ensure_venv(
        proxies=bool(chosen & {"aiohttp", "aiohttp-uvloop"}),
        prototype_dir=args.prototype if "prototype" in chosen else None)
    if venv_stamp.get("prototype", {}).get("relaxed_pins"):
        say("bench: the prototype runs with its requirements' pins relaxed (see "
            f"{os.path.relpath(os.path.join(peerprocs.VENV, 'install.log'))})")

    workdir = tempfile.mkdtemp(prefix="apigw-bench-")
    started = []
    redis_dbs = []
    full_path = []
    prototype = None
    try:
        upstream, upstream_port = procs.start_upstream(workdir, started)

        # key -> (process whose CPU counts, path, API key or None)
        procs_of = {}
        if "nginx" in chosen:
            proxy = procs.nginx("nginx-proxy", workdir, procs.free_port(), upstream_port)
            procs_of["nginx"] = proxy.start()
        for key in ("aiohttp", "aiohttp-uvloop"):
            if key in chosen:
                procs_of[key] = peerprocs.aiohttp_proxy(
                    key, workdir, procs.free_port(), SERVICE, upstream_port,
                    uvloop=key == "aiohttp-uvloop").start()
        if "twisted" in chosen:
            procs_of["twisted"] = peerprocs.twisted_proxy(
                "twisted", workdir, procs.free_port(), SERVICE, upstream_port).start()
        started.extend(procs_of.values())

        master_key = secrets.token_urlsafe(24)
        full_path = [k for k in ("apigw", "apigw-w2") if k in chosen]
        if full_path:
            redis_dbs.append(procs.pick_redis_db(SHARED_REDIS_PORT))
            yaml_text = procs.SERVICE_YAML.format(service=SERVICE, upstream_port=upstream_port,
                                                  limit=NEVER_REACHED)
            for key in full_path:
                env = {"DATABASE_URL": f"sqlite:///{workdir}/{key}/apigw.db",
                       "REDIS_URL": f"redis://127.0.0.1:{SHARED_REDIS_PORT}/{redis_dbs[0]}",
                       "MASTER_KEY": master_key}
                g = procs.gateway(key, workdir, procs.free_port(), yaml_text, env,
                                  workers=2 if key == "apigw-w2" else None)
                procs_of[key] = g.start()
                started.append(g)
        for key in ("apigw-noauth", "apigw-noauth-file"):
            if key not in chosen:
                continue
            # No key, no limiter (so no Redis): the proxying alone, with the
            # access records in twistd's log, or as JSON lines in a file.
            yaml_text = NOAUTH_YAML.format(service=SERVICE, upstream_port=upstream_port)
            env = {"DATABASE_URL": f"sqlite:///{workdir}/{key}/apigw.db"}
            g = procs.gateway(key, workdir, procs.free_port(), yaml_text, env,
                              access_log=key == "apigw-noauth-file")
            procs_of[key] = g.start()
            started.append(g)
        if "prototype" in chosen:
            redis_dbs.append(procs.pick_redis_db(SHARED_REDIS_PORT, exclude=redis_dbs))
            prototype = peerprocs.Prototype(args.prototype, workdir, upstream_port,
                                            SHARED_REDIS_PORT, redis_dbs[-1],
                                            args.prototype_postgres, NEVER_REACHED)
            prototype.prepare()
            procs_of["prototype"] = prototype.start()
            started.append(prototype.proc)

        for key, proc in procs_of.items():
            if key.startswith("apigw"):
                procs.wait_healthy(proc)
            elif key == "prototype":
                prototype.wait_ready()
            else:
                procs.wait_for_port(proc.port, 30, proc)

        keys = {k: procs.create_key(procs_of[k].port, master_key, "bench") for k in full_path}
        if prototype is not None:
            keys["prototype"] = prototype.create_key()
        # The others ignore the key; sending one everywhere keeps requests alike.
        any_key = keys.get("apigw") or next(iter(keys.values()), secrets.token_urlsafe(24))
        peers = []
        for key in args.peers:
            if key == "upstream":
                peer = Peer(key, upstream_port, "/")
            else:
                path = prototype.path if key == "prototype" else f"/{SERVICE}/"
                peer = Peer(key, procs_of[key].port, path, cpu_proc=procs_of[key])
            peer.api_key = keys.get(key, any_key)
            check_peer(peer)  # and caches the key in apigw
            peers.append(peer)

        say(f"bench: {len(peers)} peers, c={args.connections}, {args.rounds} round(s) of "
            f"{args.duration:g} s each; workdir {workdir}")
        for peer in peers:
            run_wrk(peer, min(args.connections), args.warmup_s)
        results = []
        for n in range(args.rounds):
            for c in args.connections:
                for peer in peers:
                    r = run_wrk(peer, c, args.duration)
                    r["round"] = n + 1
                    results.append(r)
                    say(f"  round {n + 1} c={c} {peer.name}: {r['rps']:,.0f} req/s")
        crashed = [p.name for p in peers if p.cpu_proc is not None and not p.cpu_proc.alive]
        if not upstream.alive:
            crashed.append("upstream")
        if crashed:
            raise BenchError(f"peer(s) died during the run: {', '.join(crashed)}")
        access_lines = {NAME[k]: _count_lines(os.path.join(procs_of[k].dir, "access.log"))
                        for k in full_path + [k for k in ("apigw-noauth-file",) if k in chosen]}
        versions = peerprocs.venv_versions()
    finally:
        for proc in reversed(started):
            proc.stop()
        if prototype is not None:
            prototype.cleanup()
        if redis_dbs and full_path:
            procs.redis_delete_pattern(SHARED_REDIS_PORT, redis_dbs[0], f"apigw:rl:{SERVICE}:*")
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
    for key, why in args.skipped.items():
        print(f"skipped: {NAME[key]}: {why}")
    os.makedirs(args.results_dir, exist_ok=True)
    path = os.path.join(args.results_dir, f"bench-{when:%Y%m%dT%H%M%SZ}.json")
    with open(path, "w") as f:
        json.dump({
            "date": when.isoformat(), "command": command.strip(), "rows": rows,
            "runs": results, "access_log_lines": access_lines,
            "peers": [{"key": p.key, "name": p.name, "url": p.url,
                       "argv": p.cpu_proc.argv if p.cpu_proc else None} for p in peers],
            "skipped": {NAME[k]: why for k, why in args.skipped.items()},
            "peers_venv": venv_stamp,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": sys.version.split()[0]},
            "versions": {"wrk": procs.tool_version(["wrk", "-v"]),
                         "nginx": procs.tool_version(["nginx", "-v"]),
                         "twisted": _twisted_version(),
                         "apigw_commit": _git_commit(), **versions},
        }, f, indent=2)
    print(f"raw results: {os.path.relpath(path)}")
    return 0


def _count_lines(path):
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def _twisted_version():
    import twisted
    return twisted.__version__


def _git_commit():
    out = subprocess.run(["git", "-C", procs.REPO, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    return out.stdout.strip() or None


say = procs.say


if __name__ == "__main__":
    procs.run_script(main, "bench")
