"""What the benchmark and the soak start, watch and stop: nginx, `twistd
apigw`, a private Redis and a private PostgreSQL, and wrk.

These are orchestration scripts, not gateway code: they block (subprocess,
sleep, http.client) because there is no reactor here. Everything listens on
127.0.0.1, and every process is stopped through the PID (and its process
group) this module got when it started it.
"""

import glob
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
SRC = os.path.join(REPO, "src")
# The twistd next to the Python running us: bench/run and bench/soak use .venv.
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
# A gateway must not read these from our environment: each run sets its own.
# One limited service on the bench's upstream: apigw's full path and the
# Flask prototype read the same file format.
SERVICE_YAML = """\
services:
  {service}:
    url: "http://127.0.0.1:{upstream_port}"
    rate_limit: {limit}
settings:
  rate_period: 60
"""

GATEWAY_ENV = ("DATABASE_URL", "REDIS_URL", "MASTER_KEY", "DEBUG")


def project_env(env=None):
    """Our environment for a twistd of this checkout: its src/ first on
    PYTHONPATH, so that a worktree run with another checkout's .venv (whose
    editable install points there) still runs this checkout's apigw."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([SRC] + [p for p in env.get("PYTHONPATH", "")
                                                  .split(os.pathsep) if p])
    return env


class BenchError(Exception):
    """A setup step failed; the message says which and why."""


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for_port(port, timeout_s, proc=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive:
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode}; see {proc.log_path}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"nothing listened on 127.0.0.1:{port} within {timeout_s}s")


class Proc:
    """A child in a session of its own, so that stopping it reaches the
    workers it forked (nginx, twistd --workers) and nothing else."""

    def __init__(self, name, argv, log_path, cwd=None, env=None):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        self.env = env
        self.popen = None

    def start(self):
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self

    @property
    def pid(self):
        return self.popen.pid

    @property
    def alive(self):
        return self.popen is not None and self.popen.poll() is None

    def send(self, signum):
        # Only while the leader is unreaped: its PID is then still ours.
        if self.alive:
            os.killpg(self.popen.pid, signum)

    def stop(self, signum=signal.SIGTERM, timeout_s=15.0):
        """The exit status, after SIGKILL if `signum` was not enough."""
        if self.popen is None:
            return None
        if self.alive:
            self.send(signum)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.send(signal.SIGKILL)
                self.popen.wait(timeout=10)
        return self.popen.returncode

    def kill(self):
        """Crash it: SIGKILL to the whole group, at once."""
        return self.stop(signal.SIGKILL, timeout_s=10)

    def tree(self):
        return tree_pids(self.pid) if self.alive else []


# --- /proc ----------------------------------------------------------------------

def tree_pids(pid):
    """pid and all its descendants alive now."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for children in glob.glob(f"/proc/{p}/task/*/children"):
            try:
                with open(children) as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                pass
    return found


def _stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    # comm may hold spaces and parentheses: the fields start after the last ')'.
    return data[data.rindex(")") + 2:].split()


def cpu_seconds(pids):
    """utime + stime of these processes, in seconds (ticks of 1/CLK_TCK)."""
    ticks = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue  # exited in between
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def rss_kb(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_KB


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def footprint(pids):
    """{pid: {"rss_kb", "fds"}} for the processes still alive."""
    out = {}
    for pid in pids:
        try:
            out[pid] = {"rss_kb": rss_kb(pid), "fds": fd_count(pid)}
        except OSError:
            pass
    return out


# --- HTTP -------------------------------------------------------------------------

def http_request(port, method, path, headers=None, body=None, timeout_s=10.0):
    """(status, {lower-case header: value}, body) over a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        all_headers = dict(headers or {})
        if payload is not None:
            all_headers["Content-Type"] = "application/json"
        conn.request(method, path, body=payload, headers=all_headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


def create_key(port, master_key, owner, rate_limit=None):
    """A raw API key made through the admin API, as an operator would."""
    body = {"owner": owner}
    if rate_limit is not None:
        body["rate_limit"] = rate_limit
    status, _, data = http_request(port, "POST", "/admin/keys",
                                   headers={"X-Master-Key": master_key}, body=body)
    if status != 201:
        raise BenchError(f"POST /admin/keys on :{port} answered {status}: {data[:200]!r}")
    return json.loads(data)["api_key"]


# --- nginx --------------------------------------------------------------------------

_NGINX_MAIN = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
{body}
}}
"""

# The fast upstream: a small JSON body, never the bottleneck. The soak's
# echoes the request ID so each response can be matched to its request.
_UPSTREAM = """\
  server {{
    listen 127.0.0.1:{port};
    location / {{
      default_type application/json;
      return 200 '{{"ok":true,"from":"bench-upstream"{extra}}}';
    }}
  }}"""

_PROXY = """\
  upstream backend {{
    server 127.0.0.1:{upstream_port};
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}"""


def start_upstream(workdir, started):
    """The bench's nginx upstream on a free port, answering: (process, port). The
    process joins `started`, for the caller's cleanup."""
    port = free_port()
    upstream = nginx("upstream", workdir, port).start()
    started.append(upstream)
    wait_for_port(port, 15, upstream)
    return upstream, port


def nginx(name, workdir, port, upstream_port=None, echo_request_id=False):
    """An nginx of our own (prefix, config, pid file, logs in workdir); 1 worker."""
    d = os.path.join(workdir, name)
    os.makedirs(d, exist_ok=True)
    if upstream_port is None:
        extra = ',"rid":"$http_x_request_id"' if echo_request_id else ""
        body = _UPSTREAM.format(port=port, extra=extra)
    else:
        body = _PROXY.format(port=port, upstream_port=upstream_port)
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(_NGINX_MAIN.format(dir=d, body=body))
    # -e: without it nginx opens the system error log before reading ours.
    argv = [shutil.which("nginx") or "nginx", "-p", d, "-c", conf,
            "-e", os.path.join(d, "error.log")]
    proc = Proc(name, argv, os.path.join(d, "stdout.log"))
    proc.port = port
    return proc


# --- the gateway ---------------------------------------------------------------------

def twistd_has_option(option):
    out = subprocess.run([TWISTD, "apigw", "--help"], capture_output=True, text=True,
                         timeout=60, env=project_env())
    return option in out.stdout


def gateway(name, workdir, port, config_yaml, env, workers=None, access_log=True):
    """`twistd -n apigw` with its own directory (config, SQLite, logs) as cwd,
    so no .env of the checkout is read; the JSON access log goes to
    access.log there unless `access_log` is false."""
    d = os.path.join(workdir, name)
    os.makedirs(d, exist_ok=True)
    config = os.path.join(d, "gateway.yaml")
    with open(config, "w") as f:
        f.write(config_yaml)
    full_env = project_env({k: v for k, v in os.environ.items() if k not in GATEWAY_ENV})
    full_env.update(env)
    argv = [TWISTD, "-n", "--pidfile=", "--logfile", os.path.join(d, "twistd.log"),
            "apigw", "--config", config, "--port", f"tcp:{port}:interface=127.0.0.1"]
    if access_log:
        argv += ["--access-log", os.path.join(d, "access.log")]
    if workers:
        argv += ["--workers", str(workers)]
    proc = Proc(name, argv, os.path.join(d, "stdout.log"), cwd=d, env=full_env)
    proc.port = port
    proc.dir = d
    return proc


def wait_healthy(proc, timeout_s=30.0):
    wait_for_port(proc.port, timeout_s, proc)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if http_request(proc.port, "GET", "/healthz", timeout_s=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"{proc.name} on :{proc.port} never answered /healthz")


def log_problems(path):
    """Log events of a twistd log that carry a traceback or say something
    went wrong unexpectedly: {first line + exception line: count}."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return {}
    problems = {}
    # twistd writes one event per line; a traceback continues on tab-indented lines.
    for event in re.split(r"\n(?=\S)", text):
        lines = [line for line in event.splitlines() if line.strip()]
        if not lines:
            continue
        if not any(w in event for w in ("Traceback", "Unhandled", "#critical]")):
            continue
        head = re.sub(r"^\S+ \[[^\]]*\] ", "", lines[0])
        last = lines[-1].strip() if len(lines) > 1 else ""
        key = f"{head} -> {last}" if last else head
        problems[key] = problems.get(key, 0) + 1
    return problems


# --- Redis ---------------------------------------------------------------------------

def redis_cli(port, *args, db=0, timeout_s=10):
    out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), "-n", str(db),
                          *map(str, args)], capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise BenchError(f"redis-cli {' '.join(map(str, args))}: {out.stderr.strip()}")
    return out.stdout.strip()


def redis_up(port):
    try:
        return redis_cli(port, "PING", timeout_s=3) == "PONG"
    except (BenchError, OSError, subprocess.SubprocessError):
        return False


def pick_redis_db(port, exclude=()):
    """An empty database index on a shared Redis (1..15, random order)."""
    candidates = [db for db in range(1, 16) if db not in exclude]
    secrets.SystemRandom().shuffle(candidates)
    for db in candidates:
        if redis_cli(port, "DBSIZE", db=db) == "0":
            return db
    raise BenchError(f"no empty database index on the Redis at 127.0.0.1:{port}")


def redis_delete_pattern(port, db, pattern):
    keys = redis_cli(port, "--scan", "--pattern", pattern, db=db).split()
    for start in range(0, len(keys), 500):
        redis_cli(port, "DEL", *keys[start:start + 500], db=db)
    return len(keys)


def private_redis(workdir, port):
    """No persistence: a restart loses every counter, as a crash would."""
    d = os.path.join(workdir, "redis")
    os.makedirs(d, exist_ok=True)
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", d, "--daemonize", "no"]
    proc = Proc("redis", argv, os.path.join(d, "redis.log"))
    proc.port = port
    return proc


# --- PostgreSQL ------------------------------------------------------------------------

def pg_bin():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


class PrivatePostgres:
    """initdb into a directory of ours and pg_ctl on a free loopback port, run
    as the postgres user when we are root (the soak and
    tests/test_keys_outage.py both use it). pg_ctl daemonizes the server: we
    stop it with pg_ctl on our own data directory, never by name."""

    def __init__(self, workdir):
        self.bin = pg_bin()
        if self.bin is None:
            raise BenchError("no PostgreSQL server binaries (initdb); install postgresql")
        self.base = os.path.join(workdir, "pg")
        os.makedirs(self.base)
        self.data = os.path.join(self.base, "data")
        self.port = free_port()
        self.prefix = []
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root.
            os.chmod(workdir, 0o755)
            shutil.chown(self.base, user="postgres")
            self.prefix = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args):
        out = subprocess.run(self.prefix + list(args), timeout=60,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if out.returncode != 0:
            raise BenchError(f"{os.path.basename(args[0])} failed: {out.stdout.strip()[-500:]}")

    def init(self):
        self._run(os.path.join(self.bin, "initdb"), "-D", self.data, "-A", "trust",
                  "-U", "postgres", "-E", "UTF8", "--no-sync")

    def start(self):
        options = f"-p {self.port} -k {self.base} -h 127.0.0.1 -F"
        self._run(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-o", options,
                  "-l", os.path.join(self.base, "log"), "-w", "-t", "30", "start")

    def stop(self, mode="fast"):
        self._run(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-m", mode, "-w",
                  "-t", "30", "stop")

    def running(self):
        return os.path.exists(os.path.join(self.data, "postmaster.pid"))

    @property
    def url(self):
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def cleanup(self):
        if self.running():
            try:
                self.stop("immediate")
            except BenchError:
                pass


# --- wrk ---------------------------------------------------------------------------------

def wrk_argv(url, connections, duration_s, script, headers=(), timeout_s=None,
             script_args=()):
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{int(duration_s)}s", "--latency",
            "-s", os.path.join(BENCH, script)]
    if timeout_s is not None:
        argv += ["--timeout", f"{timeout_s:g}s"]
    for header in headers:
        argv += ["-H", header]
    return argv + [url] + (["--", *script_args] if script_args else [])


def tool_version(argv):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else None


def exit_cleanly_on_sigterm():
    """SIGTERM (a test's timeout, Ctrl-C's cousin) still runs the finally
    blocks that stop what we started."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def say(text):
    print(text, file=sys.stderr, flush=True)


def run_script(main, name):
    """Entry point of bench.py and soak.py: what they started is stopped on
    SIGTERM too, and a failed setup step is one line, exit status 1."""
    exit_cleanly_on_sigterm()
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"{name}: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
