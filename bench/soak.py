"""The fault-injection soak: two gateway processes sharing a private Redis and
a private PostgreSQL under steady wrk load while the upstream, Redis and
PostgreSQL are each killed (or stopped) and brought back. Every response is
judged against what the documented behaviour (docs/operations.md) allows for the
fault in progress when it arrived.

Run it through bench/soak (see bench/README.md).
"""

import argparse
import datetime
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import procs  # noqa: E402  (a sibling module; bench/ is not a package)
from procs import BenchError  # noqa: E402

SERVICE = "soak"
NEVER_REACHED = 2_000_000_000
SMALL_LIMIT = 5
SMALL_SENDS = 12
BREAKER_RECOVERY_S = 2
UPSTREAM_TIMEOUT_S = 2
# After a fault ends, responses to requests that started during it may still
# arrive (retries with backoff, breakers waiting to half-open): how long they
# keep counting as "during" the fault.
AFTERMATH_S = 3.0
RSS_GROWTH_BOUND_KB = 20 * 1024
FD_GROWTH_BOUND = 10

GATEWAY_YAML = """\
services:
  {service}:
    url: "http://127.0.0.1:{upstream_port}"
    rate_limit: {limit}
    timeout: {timeout}
settings:
  rate_period: 60
  breaker_recovery_time: {recovery}
  auth_cache_ttl: 5
  rate_limit_failure: {limiter_failure}
"""



def allowed(limiter_failure):
    """What a response with the load's (valid, cached) key may be, per fault:
    (status, kind) pairs, kind being what soak.lua read from the error body."""
    return {
        "normal": {(200, "-")},
        "upstream down": {(200, "-"), (502, "unreachable"), (503, "breaker"), (504, "timeout")},
        # open: requests pass without a limit; closed: 503 until Redis is back.
        "redis down": {(200, "-")} | ({(503, "limiter")} if limiter_failure == "closed" else set()),
        # The key is cached: it keeps working; only uncached keys may get 503.
        "postgres down": {(200, "-")},
    }


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench/soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=60,
                   help="seconds of load, at least 45 (default 60)")
    p.add_argument("--connections", type=int, default=4,
                   help="wrk connections per gateway process (default 4)")
    p.add_argument("--limiter-failure", choices=("open", "closed"), default="open",
                   help="the gateways' settings.rate_limit_failure (default open)")
    p.add_argument("--no-workers", action="store_true",
                   help="two twistd processes even when `--workers` exists")
    p.add_argument("--results-dir", default=os.path.join(procs.BENCH, "results"))
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    if args.duration < 45:
        p.error("--duration must be at least 45 s: the faults need room")
    return args


class Timeline:
    """Wall-clock times of what the soak did, relative to the load's start."""

    def __init__(self):
        self.t0 = time.time()
        self.events = []
        self.windows = []  # (fault, start, end) in wall time

    def at(self, offset_s):
        delay = self.t0 + offset_s - time.time()
        if delay > 0:
            time.sleep(delay)

    def note(self, what, **details):
        now = time.time()
        self.events.append({"t": round(now - self.t0, 2), "event": what, **details})
        say(f"  t={now - self.t0:5.1f}s {what}"
            + (f" {json.dumps(details)}" if details else ""))
        return now

    def fault(self, name, start, end):
        self.windows.append((name, start, end + AFTERMATH_S))

    def fault_at(self, slice_start):
        """The fault(s) in progress during a 100 ms slice."""
        return [name for name, start, end in self.windows
                if slice_start < end and slice_start + 0.1 > start]


def check_limit(ports, key):
    """SMALL_SENDS requests with a fresh key of limit SMALL_LIMIT, spread over
    the gateway processes, all inside one window: exactly SMALL_LIMIT pass."""
    statuses = []
    for i in range(SMALL_SENDS):
        status, headers, _ = procs.http_request(ports[i % len(ports)], "GET", f"/{SERVICE}/",
                                                headers={"X-API-Key": key})
        if i == 0 and status == 200 and int(headers.get("ratelimit-reset", "60")) < 3:
            return None  # the window ends too soon: the caller retries in the next one
        statuses.append(status)
    admitted = statuses.count(200)
    limited = statuses.count(429)
    return {"sent": SMALL_SENDS, "limit": SMALL_LIMIT, "admitted": admitted,
            "limited": limited, "other": len(statuses) - admitted - limited,
            "exact": admitted == SMALL_LIMIT and limited == SMALL_SENDS - SMALL_LIMIT}


def limit_check(ports, keys, timeline, label):
    for _ in range(2):
        result = check_limit(ports, keys.pop())
        if result is not None:
            timeline.note(f"rate limit check ({label})", **result)
            return result
        time.sleep(3.5)
    raise BenchError("could not fit the rate limit check in one window")


def probe(ports, key, per_port):
    """Statuses for `key`, several per port: workers sharing a port each get a chance."""
    return [procs.http_request(p, "GET", f"/{SERVICE}/", headers={"X-API-Key": key},
                               timeout_s=15)[0] for p in ports for _ in range(per_port)]


def wait_ready(ports, timeout_s, in_a_row=8):
    """Seconds until every gateway's /readyz said 200, or None.

    Workers share a port and each probe reaches one of them, chosen by the
    kernel: only a run of ready answers says that all of them are."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if all(procs.http_request(p, "GET", "/readyz", timeout_s=5)[0] == 200
                   for p in ports for _ in range(in_a_row)):
                return round(time.monotonic() - start, 2)
        except OSError:
            pass
        time.sleep(0.1)
    return None


def parse_wrk(path):
    summary, slices = None, []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if parts[:1] == ["SOAK_SUMMARY"]:
                names = ("requests", "duration_us", "connect", "read", "write", "status",
                         "timeout", "max_latency_us")
                summary = dict(zip(names, map(int, parts[1:])))
            elif parts[:1] == ["SOAK"]:
                slices.append((int(parts[1]), int(parts[2]), parts[3], int(parts[4])))
    if summary is None:
        raise BenchError(f"wrk left no summary in {path}")
    return summary, slices


def judge(slices, timeline, allowed_by_fault):
    """Counts by status and the responses the contract does not allow."""
    by_status, violations = {}, {}
    for slice_id, status, kind, count in slices:
        key = f"{status} {kind}" if kind != "-" else str(status)
        by_status[key] = by_status.get(key, 0) + count
        start = slice_id / 10
        faults = timeline.fault_at(start) or ["normal"]
        if any((status, kind) in allowed_by_fault[f] for f in faults):
            continue
        v = violations.setdefault((" + ".join(faults), status, kind),
                                  {"count": 0, "first_s": None, "last_s": None})
        v["count"] += count
        offset = round(start - timeline.t0, 1)
        v["first_s"] = offset if v["first_s"] is None else min(v["first_s"], offset)
        v["last_s"] = offset if v["last_s"] is None else max(v["last_s"], offset)
    return by_status, [{"during": k[0], "status": k[1], "kind": k[2], **v}
                       for k, v in sorted(violations.items(), key=lambda kv: kv[1]["first_s"])]


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for tool in ("wrk", "nginx", "redis-server", "redis-cli", "runuser"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed; bench/soak installs it (Debian)")
    workers = not args.no_workers and procs.twistd_has_option("--workers")
    workdir = tempfile.mkdtemp(prefix="apigw-soak-")
    started, pg, report = [], None, {}
    try:
        say(f"soak: {args.duration} s, workdir {workdir}")
        pg = procs.PrivatePostgres(workdir)
        pg.init()
        pg.start()
        redis_port = procs.free_port()
        redis = procs.private_redis(workdir, redis_port).start()
        started.append(redis)
        upstream_port = procs.free_port()
        upstream = procs.nginx("upstream", workdir, upstream_port,
                               echo_request_id=True).start()
        started.append(upstream)
        procs.wait_for_port(redis.port, 15, redis)
        procs.wait_for_port(upstream.port, 15, upstream)

        master_key = secrets.token_urlsafe(24)
        env = {"DATABASE_URL": pg.url, "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
               "MASTER_KEY": master_key}
        yaml_text = GATEWAY_YAML.format(
            service=SERVICE, upstream_port=upstream_port, limit=NEVER_REACHED,
            timeout=UPSTREAM_TIMEOUT_S, recovery=BREAKER_RECOVERY_S,
            limiter_failure=args.limiter_failure)
        if workers:
            layout = [("gateway", 2)]
        else:
            layout = [("gateway-1", None), ("gateway-2", None)]
        gateways = []
        for name, n in layout:
            g = procs.gateway(name, workdir, procs.free_port(), yaml_text, env, workers=n)
            started.append(g.start())
            gateways.append(g)
        for g in gateways:
            procs.wait_healthy(g)
        ports = [g.port for g in gateways]
        if wait_ready(ports, 30) is None:
            raise BenchError("the gateways never became ready (database and Redis)")

        load_key = procs.create_key(ports[0], master_key, "soak-load")
        cold_key = procs.create_key(ports[0], master_key, "soak-cold")  # never used before
        small_keys = [procs.create_key(ports[0], master_key, f"soak-small-{i}", SMALL_LIMIT)
                      for i in range(6)]
        for p in ports:
            status = procs.http_request(p, "GET", f"/{SERVICE}/",
                                        headers={"X-API-Key": load_key})[0]
            if status != 200:
                raise BenchError(f"the gateway on :{p} answered {status} before the soak")
        pids_start = {g.name: g.tree() for g in gateways}
        before = {g.name: procs.footprint(g.tree()) for g in gateways}

        wrks = []
        for g in gateways:
            path = os.path.join(workdir, f"wrk-{g.name}.out")
            argv = procs.wrk_argv(f"http://127.0.0.1:{g.port}/{SERVICE}/",
                                  args.connections * (2 if workers else 1), args.duration,
                                  "soak.lua", headers=[f"X-API-Key: {load_key}"],
                                  timeout_s=15, script_args=[g.name])
            with open(path, "w") as out:
                wrks.append((path, subprocess.Popen(argv, stdout=out,
                                                    stderr=subprocess.STDOUT)))
        timeline = Timeline()
        report = run_faults(args.duration, timeline, gateways, ports, upstream, redis, pg,
                            small_keys, cold_key)
        warm = report.pop("warm")
        for _, w in wrks:
            w.wait(timeout=args.duration + 60)
        timeline.note("load finished")
        time.sleep(2)  # let connections the load left close

        wrk_summaries, slices, logged = [], [], {}
        for (path, _), g in zip(wrks, gateways):
            summary, s = parse_wrk(path)
            wrk_summaries.append(summary)
            slices.extend(s)
            logged[g.name] = {"wrk_responses": summary["requests"],
                              "access_log_records": load_records(g)}
        by_status, violations = judge(slices, timeline, allowed(args.limiter_failure))
        crashes = [g.name for g in gateways if not g.alive]
        pids_end = {g.name: g.tree() for g in gateways}
        end = {g.name: procs.footprint(g.tree()) for g in gateways}
        exit_codes = {}
        for g in gateways:
            exit_codes[g.name] = g.stop()
        report.update({
            "duration_s": args.duration,
            "gateways": {g.name: {"port": g.port, "workers": dict(layout)[g.name] or 1}
                         for g in gateways},
            "responses": sum(s["requests"] for s in wrk_summaries),
            "socket_errors": {k: sum(s[k] for s in wrk_summaries)
                              for k in ("connect", "read", "write", "timeout")},
            "max_latency_ms": max(s["max_latency_us"] for s in wrk_summaries) / 1000,
            "by_status": dict(sorted(by_status.items())),
            "access_log": logged,
            "connections_per_gateway": args.connections * (2 if workers else 1),
            "violations": violations,
            "crashes": crashes,
            "process_changes": {n: sorted(set(pids_start[n]) ^ set(pids_end[n]))
                                for n in pids_start},
            "exit_codes_on_sigterm": exit_codes,
            "footprint": {n: {"before_load": before[n], "warm": warm[n], "end": end[n]}
                          for n in before},
            "log_problems": {g.name: procs.log_problems(os.path.join(g.dir, "twistd.log"))
                             for g in gateways},
            "limiter_failures_outside_redis_outage": {
                g.name: limiter_failures_outside(g, timeline) for g in gateways},
            "limiter_failure_policy": args.limiter_failure,
            "load_started_at": datetime.datetime.fromtimestamp(
                timeline.t0, datetime.timezone.utc).isoformat(),
            "events": timeline.events,
        })
        report["verdict"] = verdict(report)
    finally:
        for proc in reversed(started):
            proc.stop()
        if pg is not None:
            pg.cleanup()
        if args.keep:
            say(f"soak: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    when = datetime.datetime.now(datetime.timezone.utc)
    report["date"] = when.isoformat()
    print_report(report)
    os.makedirs(args.results_dir, exist_ok=True)
    path = os.path.join(args.results_dir, f"soak-{when:%Y%m%dT%H%M%SZ}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"raw report: {os.path.relpath(path)}")
    return 0 if not report["verdict"] else 1


def run_faults(duration_s, timeline, gateways, ports, upstream, redis, pg, small_keys,
               cold_key):
    """The fault schedule, scaled to the duration (60 s: upstream down at 8 s,
    Redis at 22 s, PostgreSQL at 34 s)."""
    scale = duration_s / 60
    out = {"limit_checks": {}, "cold_key": {}}

    timeline.at(4 * scale)
    out["limit_checks"]["before faults"] = limit_check(ports, small_keys, timeline, "before faults")
    timeline.at(6 * scale)
    out["warm"] = {g.name: procs.footprint(g.tree()) for g in gateways}

    timeline.at(8 * scale)
    start = timeline.note("upstream killed (SIGKILL)")
    upstream.kill()
    timeline.at(8 * scale + 5)
    upstream.start()
    procs.wait_for_port(upstream.port, 15, upstream)
    end = timeline.note("upstream restarted")
    timeline.fault("upstream down", start, end + BREAKER_RECOVERY_S + UPSTREAM_TIMEOUT_S)

    timeline.at(22 * scale)
    start = timeline.note("redis killed (SIGKILL)")
    redis.kill()
    timeline.at(22 * scale + 4)
    redis.start()
    procs.wait_for_port(redis.port, 15, redis)
    timeline.note("redis restarted")
    ready_after = wait_ready(ports, 20)
    end = timeline.note("every gateway ready again", seconds=ready_after)
    timeline.fault("redis down", start, end)
    if ready_after is None:
        out["limit_checks"]["after redis restart"] = {"exact": False,
                                                      "why": "the limiter never reconnected"}
    else:
        out["limit_checks"]["after redis restart"] = limit_check(
            ports, small_keys, timeline, "after redis restart")

    timeline.at(34 * scale)
    start = timeline.note("postgres stopped (pg_ctl -m fast)")
    pg.stop("fast")
    timeline.at(34 * scale + 3)
    per_port = 1 if len(ports) > 1 else 4
    out["cold_key"]["during outage"] = probe(ports, cold_key, per_port)
    timeline.note("uncached key during the outage", statuses=out["cold_key"]["during outage"])
    timeline.at(34 * scale + 7)
    pg.start()
    timeline.note("postgres started")
    deadline = time.monotonic() + 20
    statuses = probe(ports, cold_key, per_port)
    while set(statuses) != {200} and time.monotonic() < deadline:
        time.sleep(0.2)
        statuses = probe(ports, cold_key, per_port)
    out["cold_key"]["after outage"] = statuses
    end = timeline.note("uncached key after the outage", statuses=statuses)
    timeline.fault("postgres down", start, end)
    return out


def limiter_failures_outside(gateway, timeline):
    """The gateway's "rate limiter unavailable" reports (one per failure
    streak, 1 s resolution) at times Redis was not down: each streak is at
    least one request let through uncounted (open) or refused with 503 (closed)."""
    redis = [(start, end) for name, start, end in timeline.windows if name == "redis down"]
    found = []
    with open(os.path.join(gateway.dir, "twistd.log"), errors="replace") as f:
        for line in f:
            if "rate limiter unavailable" not in line:
                continue
            when = datetime.datetime.strptime(line.split(" ", 1)[0], "%Y-%m-%dT%H:%M:%S%z")
            second = when.timestamp()
            if any(second + 1 > start - 1 and second < end for start, end in redis):
                continue
            found.append({"t": round(second - timeline.t0), "line": line.split("] ", 1)[-1].strip()})
    return found


def load_records(gateway):
    """Access-log records of the load (its request IDs carry the gateway's name)."""
    count = 0
    with open(os.path.join(gateway.dir, "access.log")) as f:
        for line in f:
            if json.loads(line).get("request_id", "").startswith(gateway.name + "-"):
                count += 1
    return count


def verdict(report):
    """What failed, in words; empty when the soak ran clean."""
    problems = []
    if report["violations"]:
        problems.append(f"{sum(v['count'] for v in report['violations'])} response(s) "
                        "the contract does not allow")
    if any(report["socket_errors"].values()):
        problems.append(f"socket errors {report['socket_errors']}")
    if report["crashes"]:
        problems.append(f"crashed: {report['crashes']}")
    if any(report["process_changes"].values()):
        problems.append(f"processes replaced: {report['process_changes']}")
    if any(code != 0 for code in report["exit_codes_on_sigterm"].values()):
        problems.append(f"SIGTERM exit codes {report['exit_codes_on_sigterm']}")
    for label, check in report["limit_checks"].items():
        if not check.get("exact"):
            problems.append(f"rate limit not exact {label}: {check}")
    cold = report["cold_key"]
    if any(s != 503 for s in cold.get("during outage", [])):
        problems.append(f"uncached key during the Postgres outage got {cold['during outage']}"
                        " (contract: 503)")
    if any(s != 200 for s in cold.get("after outage", [])):
        problems.append(f"uncached key after the Postgres outage got {cold['after outage']}")
    for name, fp in report["footprint"].items():
        # Against the warm point, 6 s into the load: before the load a worker
        # may still be starting (its pools not open yet).
        for pid, warm in fp["warm"].items():
            end = fp["end"].get(pid)
            if end is None:
                continue
            if end["rss_kb"] - warm["rss_kb"] > RSS_GROWTH_BOUND_KB:
                problems.append(f"{name} pid {pid} RSS grew {warm['rss_kb']} -> {end['rss_kb']} kB")
            if end["fds"] - warm["fds"] > FD_GROWTH_BOUND:
                problems.append(f"{name} pid {pid} fds grew {warm['fds']} -> {end['fds']}")
    for name, counts in report["access_log"].items():
        # Requests in flight when wrk stopped are logged but never counted by wrk.
        missing = counts["wrk_responses"] - counts["access_log_records"]
        if not -report["connections_per_gateway"] <= missing <= 0:
            problems.append(f"{name}: {counts['wrk_responses']} responses but "
                            f"{counts['access_log_records']} access-log records")
    if any(report["log_problems"].values()):
        problems.append("tracebacks or unhandled errors in the gateway logs")
    spurious = sum(len(v) for v in report["limiter_failures_outside_redis_outage"].values())
    if spurious:
        problems.append(f"{spurious} rate limiter failure streak(s) while Redis was up")
    return problems


def print_report(r):
    print()
    print(f"apigw soak, {r['date'][:16]} UTC, {r['duration_s']} s of load, "
          f"rate_limit_failure: {r['limiter_failure_policy']}, gateways: "
          + ", ".join(f"{n} (:{g['port']}, {g['workers']} process(es))"
                      for n, g in r["gateways"].items()))
    print("timeline:")
    for e in r["events"]:
        details = {k: v for k, v in e.items() if k not in ("t", "event")}
        print(f"  {e['t']:6.1f} s  {e['event']}" + (f"  {details}" if details else ""))
    print(f"responses: {r['responses']}  socket errors: {r['socket_errors']}  "
          f"max latency: {r['max_latency_ms']:.0f} ms")
    print("by status: " + ", ".join(f"{k}: {v}" for k, v in r["by_status"].items()))
    print("responses outside the contract:" + ("" if r["violations"] else " none"))
    for v in r["violations"]:
        print(f"  {v['count']} x {v['status']} ({v['kind']}) during {v['during']}, "
              f"t={v['first_s']}..{v['last_s']} s")
    print(f"crashes: {len(r['crashes'])} {r['crashes'] or ''}  processes replaced: "
          f"{sum(len(v) for v in r['process_changes'].values())}  "
          f"exit codes on SIGTERM: {r['exit_codes_on_sigterm']}")
    print("rate limit exactness:")
    for label, c in r["limit_checks"].items():
        print(f"  {label}: {c}")
    print(f"uncached key: {r['cold_key']}")
    print("footprint (RSS kB / open fds): before load -> warm (6 s) -> end")
    for name, fp in r["footprint"].items():
        for pid in fp["before_load"]:
            cells = [fp[k].get(pid) for k in ("before_load", "warm", "end")]
            print(f"  {name} pid {pid}: " + " -> ".join(
                f"{c['rss_kb']} / {c['fds']}" if c else "gone" for c in cells))
    print("access log: " + ", ".join(
        f"{n}: {c['access_log_records']} records for {c['wrk_responses']} responses"
        for n, c in r["access_log"].items()))
    print("tracebacks/unhandled errors in the gateway logs:"
          + ("" if any(r["log_problems"].values()) else " none"))
    for name, problems in r["log_problems"].items():
        for what, count in problems.items():
            print(f"  {name}: {count} x {what}")
    print("rate limiter failures while Redis was up:"
          + ("" if any(r["limiter_failures_outside_redis_outage"].values()) else " none"))
    for name, failures in r["limiter_failures_outside_redis_outage"].items():
        for failure in failures:
            print(f"  {name} t={failure['t']} s: {failure['line']}")
    print("verdict: " + ("CLEAN" if not r["verdict"] else "PROBLEMS"))
    for p in r["verdict"]:
        print(f"  - {p}")


say = procs.say


if __name__ == "__main__":
    procs.run_script(main, "soak")
