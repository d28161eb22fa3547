"""The `apigw` console script, run as an installed command in a subprocess,
against a temporary SQLite file and a private PostgreSQL database."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from apigw import __version__
from apigw.admin import created_key_json
from apigw.config import ConfigError, load_config, parse_config
from apigw.keys import KeyRecord
from keys_support import database_url, pg_database  # noqa: F401 (fixtures)
from tests.helpers import REPO, TWISTD, assert_no_secrets, register_secret

pytestmark = pytest.mark.slow

APIGW = os.path.join(os.path.dirname(sys.executable), "apigw")
SEED = os.path.join(REPO, "gateway_config.yaml")
GATEWAY_ENV = ("DATABASE_URL", "REDIS_URL", "MASTER_KEY", "DEBUG")


def apigw(*args, cwd, env=None):
    full = {k: v for k, v in os.environ.items() if k not in GATEWAY_ENV}
    full.update(env or {})
    result = subprocess.run([APIGW, *args], cwd=cwd, env=full, capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def one_line_error(result):
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("apigw: "), result.stderr
    assert result.stdout == ""
    return lines[0]


# --- version and init ---------------------------------------------------------------

def test_version_prints_the_package_version(tmp_path):
    """When `apigw version` runs, it prints apigw and the package's __version__."""
    result = apigw("version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"apigw {__version__}"


def test_init_writes_a_valid_starter_and_never_overwrites(tmp_path):
    """When `apigw init` runs twice, the first writes a config that loads, the second refuses."""
    first = apigw("init", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    written = (tmp_path / "gateway_config.yaml").read_text()
    config = load_config(str(tmp_path / "gateway_config.yaml"), environ={}, dotenv_path=None)
    assert set(config.services) == {"service1", "service2"}

    (tmp_path / "gateway_config.yaml").write_text(written + "# edited\n")
    again = apigw("init", cwd=tmp_path)
    assert "already exists" in one_line_error(again)
    assert (tmp_path / "gateway_config.yaml").read_text() == written + "# edited\n"

    other = apigw("init", "conf/gw.yaml", cwd=tmp_path)
    assert "cannot write" in one_line_error(other)


# --- check ----------------------------------------------------------------------------

def test_check_prints_every_default_and_round_trips(tmp_path):
    """When `apigw check` reads the seed file, its services and settings load back as the same config."""
    result = apigw("check", "--config", SEED, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    environment = printed.pop("environment")
    assert environment == {"DATABASE_URL": "sqlite:///apigw.db", "REDIS_URL": None,
                           "MASTER_KEY": None, "DEBUG": False}
    original = load_config(SEED, environ={}, dotenv_path=None)
    again = parse_config(yaml.safe_dump(printed), "printed", original.env)
    assert dict(again.services) == dict(original.services)
    assert again.settings == original.settings
    assert printed["services"]["service1"]["timeout"] == 5.0
    assert printed["settings"]["admin_allow"] == ["127.0.0.1/32", "::1/128"]


def test_check_masks_secrets_from_env_and_dotenv(tmp_path):
    """When the master key and URL passwords are set, check shows them masked and reads .env."""
    master = register_secret("hunter2-master")
    (tmp_path / ".env").write_text(f"MASTER_KEY={master}\nDEBUG=true\n")
    result = apigw("check", "--config", SEED, cwd=tmp_path, env={
        "DATABASE_URL": "postgresql://gw:db-pass-123@db.example:5432/gw",
        "REDIS_URL": "redis://:redis-pass-456@127.0.0.1:6379/2",
    })
    assert result.returncode == 0, result.stderr
    environment = yaml.safe_load(result.stdout)["environment"]
    assert environment == {
        "DATABASE_URL": "postgresql://gw:***@db.example:5432/gw",
        "REDIS_URL": "redis://:***@127.0.0.1:6379/2",
        "MASTER_KEY": "***",
        "DEBUG": True,
    }
    for secret in ("db-pass-123", "redis-pass-456"):
        assert secret not in result.stdout + result.stderr
    assert_no_secrets(result.stdout + result.stderr)


@pytest.mark.parametrize("yaml_text, env", [
    ("services:\n  a:\n    url: ftp://nowhere\n", {}),
    ("services:\n  a:\n    url: http://x\n    colour: blue\n", {}),
    ("settings: [1\n", {}),
    ("services: {}\n", {"DATABASE_URL": "oracle://x"}),
])
def test_check_fails_with_twistds_one_line(tmp_path, yaml_text, env):
    """When the config or environment is bad, check prints twistd's one-line message and exits 1."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    line = one_line_error(apigw("check", "--config", str(path), cwd=tmp_path, env=env))
    with pytest.raises(ConfigError) as raised:
        load_config(str(path), environ=env, dotenv_path=None)
    assert line == f"apigw: {raised.value}"
    twistd = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "apigw", "--config", str(path),
         "--port", "tcp:0:interface=127.0.0.1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**{k: v for k, v in os.environ.items() if k not in GATEWAY_ENV}, **env})
    assert twistd.stderr.strip() == line


def test_check_of_a_missing_file_names_it(tmp_path):
    """When the config file does not exist, check says so in one line."""
    assert "nope.yaml: cannot read" in one_line_error(
        apigw("check", "--config", "nope.yaml", cwd=tmp_path))


# --- keys -----------------------------------------------------------------------------

def _keys(database_url, *args, cwd):
    return apigw("keys", *args, "--config", SEED, cwd=cwd, env={"DATABASE_URL": database_url})


def test_keys_create_list_revoke(tmp_path, database_url):  # noqa: F811
    """When a key is created, listed and revoked, each answer is the admin API's JSON."""
    created = _keys(database_url, "create", "--owner", "billing", "--services", "service1,service2",
                    "--expires-in", "3600", "--rate-limit", "7", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    shape = created_key_json(KeyRecord("i", "o", "p", None, None, 0.0, None, None), "k", 0.0)
    assert set(key) == set(shape)
    assert key["owner"] == "billing" and key["services"] == ["service1", "service2"]
    assert key["rate_limit"] == 7 and key["expires_at"] is not None
    assert key["api_key"].startswith(key["prefix"]) and key["api_key"].startswith("agw_")
    assert_no_secrets(created.stderr)

    listed = _keys(database_url, "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    keys = json.loads(listed.stdout)["keys"]
    assert [k["id"] for k in keys] == [key["id"]]
    assert keys[0]["active"] is True and keys[0]["revoked_at"] is None
    assert key["api_key"] not in listed.stdout

    revoked = _keys(database_url, "revoke", key["id"], cwd=tmp_path)
    assert revoked.returncode == 0, revoked.stderr
    record = json.loads(revoked.stdout)
    assert record["id"] == key["id"] and record["active"] is False
    assert record["revoked_at"] is not None

    listed = json.loads(_keys(database_url, "list", cwd=tmp_path).stdout)["keys"]
    assert listed[0]["active"] is False


def test_keys_revoke_unknown_id_is_one_line(tmp_path, database_url):  # noqa: F811
    """When the id to revoke does not exist, the command exits 1 with one line."""
    line = one_line_error(_keys(database_url, "revoke", "0123abcd", cwd=tmp_path))
    assert line == "apigw: no API key has the id '0123abcd'"


@pytest.mark.parametrize("args, message", [
    (["--services", "nope"], "no service named 'nope' is configured"),
    (["--rate-limit", "0"], "rate_limit must be a positive integer"),
    (["--expires-in", "-5"], "expires_in must be more than 0"),
])
def test_keys_create_refuses_what_the_admin_api_refuses(tmp_path, args, message):
    """When a create argument is invalid, the admin API's sentence comes back, exit 1."""
    url = f"sqlite:///{tmp_path}/keys.db"
    line = one_line_error(_keys(url, "create", "--owner", "x", *args, cwd=tmp_path))
    assert message in line
    assert not (tmp_path / "keys.db").exists()


def test_keys_with_the_database_down_is_one_line(tmp_path):
    """When DATABASE_URL points at nothing, keys list exits 1 naming the key store."""
    line = one_line_error(_keys("postgresql://postgres@127.0.0.1:9/none", "list", cwd=tmp_path))
    assert line.startswith("apigw: the key store is unavailable")
