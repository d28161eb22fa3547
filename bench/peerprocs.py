"""The benchmark's other peers: their virtualenv (bench/.venv-peers), the
aiohttp and Twisted reverse proxies of bench/peers/, and the Flask prototype
apigw replaced, run from a copy under gunicorn.

None of this is a project dependency: aiohttp, uvloop, gunicorn and the
prototype's requirements live in bench/.venv-peers only, made here when
missing (bench/README.md).
"""

import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import time
import urllib.parse

import procs
from procs import BenchError

PEERS_DIR = os.path.join(procs.BENCH, "peers")
VENV = os.path.join(procs.BENCH, ".venv-peers")
VENV_PY = os.path.join(VENV, "bin", "python")
_STAMP = os.path.join(VENV, "bench-installed.json")
_LOCK = os.path.join(procs.BENCH, ".venv-peers.lock")
PROXY_PACKAGES = ["aiohttp>=3.9,<4", "uvloop>=0.19,<1"]
GUNICORN = "gunicorn>=21"
# Neither the peers nor the prototype may see these from our environment.
_STRIP_ENV = procs.GATEWAY_ENV + ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "http_proxy",
                                  "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
                                  "ALL_PROXY", "no_proxy", "NO_PROXY")
def default_prototype():
    """APIGW_PROTOTYPE, else a `seed/prototype` folder in a directory beside
    the checkout (where the project's hand-over material sits), else None."""
    named = os.environ.get("APIGW_PROTOTYPE")
    if named:
        return named
    parent = os.path.dirname(procs.REPO)
    for entry in sorted(os.listdir(parent)):
        candidate = os.path.join(parent, entry, "seed", "prototype")
        if os.path.isfile(os.path.join(candidate, "app.py")):
            return candidate
    return None


DEFAULT_PROTOTYPE = default_prototype()
DEFAULT_PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def peer_env(extra=None):
    env = {k: v for k, v in os.environ.items() if k not in _STRIP_ENV}
    env.update(extra or {})
    return env


# --- bench/.venv-peers -----------------------------------------------------------------

def _requirement_names(text):
    """The bare project names of a requirements file: its pins relaxed."""
    names = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.append(re.split(r"[\s<>=!~;\[@]", line, maxsplit=1)[0])
    return names


def _pip(args, log_path):
    with open(log_path, "a") as log:
        log.write(f"\n$ pip install {' '.join(args)}\n")
        log.flush()
        out = subprocess.run([VENV_PY, "-m", "pip", "install", "-q",
                              "--disable-pip-version-check", *args],
                             stdout=log, stderr=subprocess.STDOUT, timeout=900)
    return out.returncode == 0


def _tail(path, n=5):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:]).strip()
    except OSError:
        return ""


def ensure_venv(proxies, prototype_dir):
    """bench/.venv-peers with what the chosen peers need, installed once
    (a stamp remembers what): `proxies` -> aiohttp and uvloop;
    `prototype_dir` -> its requirements.txt plus gunicorn, pinned as it
    says, or by bare names when the pins do not install here.
    Returns the stamp: {"proxies": [...], "prototype": {...}}."""
    if not (proxies or prototype_dir):
        return {}
    with open(_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once build it once
        stamp = _read_stamp()
        if not os.path.exists(VENV_PY):
            procs.say(f"bench: creating {os.path.relpath(VENV)} (the peers' own virtualenv)")
            subprocess.run([sys.executable, "-m", "venv", "--clear", VENV], check=True,
                           timeout=300, capture_output=True)
            stamp = {}
        log_path = os.path.join(VENV, "install.log")
        if proxies and stamp.get("proxies") != PROXY_PACKAGES:
            procs.say(f"bench: installing {', '.join(PROXY_PACKAGES)} into "
                      f"{os.path.relpath(VENV)}")
            if not _pip(PROXY_PACKAGES, log_path):
                raise BenchError(f"could not install {PROXY_PACKAGES} into {VENV}:\n"
                                 f"{_tail(log_path)}\n(--peers without the aiohttp "
                                 f"peers runs without them)")
            stamp["proxies"] = PROXY_PACKAGES
            _write_stamp(stamp)
        if prototype_dir:
            with open(os.path.join(prototype_dir, "requirements.txt")) as f:
                requirements = f.read()
            digest = hashlib.sha256((requirements + GUNICORN).encode()).hexdigest()
            if stamp.get("prototype", {}).get("sha256") != digest:
                procs.say(f"bench: installing the prototype's requirements.txt and "
                          f"gunicorn into {os.path.relpath(VENV)}")
                relaxed = False
                requirements_file = os.path.join(VENV, "prototype-requirements.txt")
                with open(requirements_file, "w") as f:
                    f.write(requirements)
                if not _pip(["-r", requirements_file, GUNICORN], log_path):
                    names = _requirement_names(requirements)
                    procs.say("bench: the prototype's pinned requirements do not install "
                              f"here; installing the bare names {' '.join(names)}")
                    relaxed = True
                    if not _pip([*names, GUNICORN], log_path):
                        raise BenchError(f"could not install the prototype's requirements "
                                         f"into {VENV}:\n{_tail(log_path)}\n"
                                         f"(--no-prototype runs without it)")
                stamp["prototype"] = {"sha256": digest, "relaxed_pins": relaxed}
                _write_stamp(stamp)
        return stamp


def _read_stamp():
    try:
        with open(_STAMP) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_stamp(stamp):
    with open(_STAMP, "w") as f:
        json.dump(stamp, f, indent=2)


def venv_versions():
    """{distribution: version} of what the peers use from bench/.venv-peers."""
    if not os.path.exists(VENV_PY):
        return {}
    code = ("import importlib.metadata as m, json\n"
            "out = {}\n"
            "for d in ('aiohttp', 'uvloop', 'gunicorn', 'Flask', 'SQLAlchemy', 'requests',"
            " 'redis', 'psycopg2-binary'):\n"
            "    try: out[d] = m.version(d)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))\n")
    out = subprocess.run([VENV_PY, "-c", code], capture_output=True, text=True, timeout=60)
    try:
        return json.loads(out.stdout)
    except ValueError:
        return {}


# --- the proxies of bench/peers/ ---------------------------------------------------------

def _server(name, workdir, port, argv, env, cwd=None):
    d = os.path.join(workdir, name)
    os.makedirs(d, exist_ok=True)
    proc = procs.Proc(name, argv, os.path.join(d, "stdout.log"), cwd=cwd or d, env=env)
    proc.port = port
    proc.dir = d
    return proc


def aiohttp_proxy(name, workdir, port, service, upstream_port, uvloop):
    argv = [VENV_PY, os.path.join(PEERS_DIR, "aiohttp_proxy.py"), "--port", str(port),
            "--service", service, "--upstream", f"http://127.0.0.1:{upstream_port}"]
    return _server(name, workdir, port, argv + (["--uvloop"] if uvloop else []), peer_env())


def twisted_proxy(name, workdir, port, service, upstream_port):
    # The project's .venv (Twisted), the Python running the bench.
    argv = [sys.executable, os.path.join(PEERS_DIR, "twisted_proxy.py"), "--port", str(port),
            "--service", service, "--upstream-port", str(upstream_port)]
    return _server(name, workdir, port, argv, peer_env())


def wait_answering(proc, path, timeout_s=30.0):
    """Until `path` answers anything below 500 (the port alone is not enough
    for gunicorn, whose master listens before its workers are ready)."""
    procs.wait_for_port(proc.port, timeout_s, proc)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive:
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode}; "
                             f"see {proc.log_path}")
        try:
            if procs.http_request(proc.port, "GET", path, timeout_s=2)[0] < 500:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"{proc.name} on :{proc.port} never answered {path}")


# --- the Flask prototype -------------------------------------------------------------------

# Its middleware applies the rate limit to /service1 and /service2 only (the
# names are in its code): the bench's service is service1, so that it pays
# its Redis round trip like apigw's full path.
PROTOTYPE_SERVICE = "service1"



def prototype_problem(prototype_dir, pg_admin_url):
    """Why the prototype peer cannot run here, or None."""
    if prototype_dir is None:
        return "no Flask prototype found (set APIGW_PROTOTYPE or --prototype DIR)"
    if not os.path.isfile(os.path.join(prototype_dir, "app.py")) or not os.path.isfile(
            os.path.join(prototype_dir, "requirements.txt")):
        return f"no Flask prototype (app.py, requirements.txt) in {prototype_dir} (--prototype DIR)"
    try:
        import psycopg2
        psycopg2.connect(pg_admin_url, connect_timeout=3).close()
    except Exception as e:  # noqa: BLE001 - any reason is a reason to skip
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"PostgreSQL at {_hide_password(pg_admin_url)} is not reachable: {first}"
    return None


def _hide_password(url):
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return url


class Prototype:
    """The prototype copied into workdir, its .env and gateway_config.yaml
    written there, a PostgreSQL database of its own on the shared server
    (created here, dropped by cleanup()), a Redis database index of its own,
    its tables made by one process before `gunicorn -w 2 app:app` starts
    (the README's two workers otherwise race on CREATE TABLE)."""

    name = "Flask prototype (gunicorn -w 2)"

    def __init__(self, src, workdir, upstream_port, redis_port, redis_db, pg_admin_url,
                 rate_limit):
        self.src = src
        self.dir = os.path.join(workdir, "prototype")
        self.app_dir = os.path.join(self.dir, "app")
        self.port = procs.free_port()
        self.upstream_port = upstream_port
        self.redis_port = redis_port
        self.redis_db = redis_db
        self.pg_admin_url = pg_admin_url
        self.rate_limit = rate_limit
        self.database = f"apigw_bench_proto_{secrets.token_hex(4)}"
        self.master_key = secrets.token_urlsafe(24)
        self.path = f"/{PROTOTYPE_SERVICE}/"
        self.proc = None
        self.api_key = None
        self._db_created = False

    def _admin(self, sql):
        import psycopg2
        conn = psycopg2.connect(self.pg_admin_url, connect_timeout=5)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    @property
    def database_url(self):
        parts = urllib.parse.urlsplit(self.pg_admin_url)
        return urllib.parse.urlunsplit(parts._replace(path=f"/{self.database}"))

    def prepare(self):
        os.makedirs(self.dir, exist_ok=True)
        shutil.copytree(self.src, self.app_dir, copy_function=shutil.copyfile,
                        ignore=shutil.ignore_patterns(".env", ".git", "venv", ".venv",
                                                      "__pycache__", "*.pyc"))
        for d, _, _ in os.walk(self.app_dir):  # the source may be read-only
            os.chmod(d, os.stat(d).st_mode | stat.S_IWUSR)
        with open(os.path.join(self.app_dir, "gateway_config.yaml"), "w") as f:
            f.write(procs.SERVICE_YAML.format(service=PROTOTYPE_SERVICE,
                                              upstream_port=self.upstream_port,
                                              limit=self.rate_limit))
        with open(os.path.join(self.app_dir, ".env"), "w") as f:
            f.write(f"DEBUG=false\nDATABASE_URL={self.database_url}\n"
                    f"MASTER_KEY={self.master_key}\n"
                    f"REDIS_URL=redis://127.0.0.1:{self.redis_port}/{self.redis_db}\n")
        self._admin(f'CREATE DATABASE "{self.database}"')
        self._db_created = True
        # One process makes the tables (create_app's db.create_all).
        out = subprocess.run([VENV_PY, "-c", "import app"], cwd=self.app_dir, env=peer_env(),
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise BenchError(f"the prototype did not start: {out.stderr.strip()[-800:]}")
        return self

    def start(self):
        argv = [VENV_PY, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{self.port}"]
        help_text = subprocess.run([VENV_PY, "-m", "gunicorn", "--help"], capture_output=True,
                                   text=True, timeout=60, env=peer_env()).stdout
        if "--no-control-socket" in help_text:
            # gunicorn >= 24 otherwise opens a control socket in ~/.gunicorn.
            argv.append("--no-control-socket")
        argv.append("app:app")
        self.proc = procs.Proc(self.name, argv, os.path.join(self.dir, "gunicorn.log"),
                               cwd=self.app_dir, env=peer_env())
        self.proc.port = self.port
        self.proc.start()
        return self.proc

    def wait_ready(self):
        wait_answering(self.proc, "/healthz")

    def create_key(self):
        """A key the way its README says: POST /admin/generate_key."""
        status, _, data = procs.http_request(self.port, "POST", "/admin/generate_key",
                                             headers={"X-Master-Key": self.master_key},
                                             body={"owner": "bench"})
        if status != 200:
            raise BenchError(f"the prototype's /admin/generate_key answered {status}: "
                             f"{data[:200]!r}")
        self.api_key = json.loads(data)["api_key"]
        return self.api_key

    def cleanup(self):
        """After the process stopped: its Redis counters and its database."""
        if self.api_key:
            try:
                procs.redis_delete_pattern(self.redis_port, self.redis_db,
                                           f"rate:{self.api_key}:*")
            except BenchError as e:
                procs.say(f"bench: could not delete the prototype's Redis keys: {e}")
        if self._db_created:
            try:
                self._admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
                self._db_created = False
            except Exception as e:  # noqa: BLE001 - report, go on cleaning up
                procs.say(f"bench: could not drop the prototype's database "
                          f"{self.database}: {e}")
