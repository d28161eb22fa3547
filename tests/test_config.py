"""Configuration: the seed loads, every field parses, every bad input is one clear line."""

import os
import subprocess

import attr
import pytest

from apigw.config import (
    ConfigError,
    Environment,
    load_config,
    load_environment,
    SentinelRedisURL,
    parse_config,
    parse_database_url,
    parse_redis_url,
)
from tests.helpers import REPO, TWISTD

SEED = os.path.join(REPO, "gateway_config.yaml")


def parse(text, env=None):
    return parse_config(text, "gw.yaml", env or Environment())


def test_seed_loads_unchanged():
    """When the seed gateway_config.yaml is loaded, both services get the seed's values and the defaults."""
    config = load_config(SEED, environ={}, dotenv_path=None)
    s1, s2 = config.services["service1"], config.services["service2"]
    assert s1.urls == ("http://localhost:5001",) and s1.rate_limit == 100
    assert s2.urls == ("http://localhost:5002",) and s2.rate_limit == 50
    assert config.settings.rate_period_s == 60
    assert s1.auth is True and s1.strip_prefix is True and s1.retries == 2
    assert s1.timeout_s == 5.0 and s1.max_body_bytes == 10 * 1024 * 1024
    assert config.env.database_url == "sqlite:///apigw.db"
    assert config.env.redis_url is None and config.env.master_key is None


def test_every_field_parses_and_service_fields_inherit_settings():
    """When every documented field is given, each lands in the config with its unit."""
    config = parse("""
services:
  a:
    urls: ["http://127.0.0.1:1/x/", "https://example.test"]
    rate_limit: null
    auth: false
    timeout: 1.5
    retries: 0
    retry_non_idempotent: true
    strip_prefix: false
    max_body_bytes: 5
  b:
    url: http://[::1]:8080
settings:
  rate_period: 10
  default_rate_limit: 7
  rate_limit_algorithm: sliding_window
  rate_limit_failure: closed
  timeout: 3
  retries: 4
  backoff_base: 0.1
  backoff_max: 1
  breaker_failure_threshold: 2
  breaker_recovery_time: 9
  auth_cache_ttl: 0
  shutdown_grace: 1
  max_body_bytes: 1000
  admin_allow: ["10.0.0.0/8"]
""")
    a, b = config.services["a"], config.services["b"]
    assert a.rate_limit is None and a.auth is False and a.timeout_s == 1.5
    assert a.retries == 0 and a.retry_non_idempotent and not a.strip_prefix
    assert a.max_body_bytes == 5
    assert a.targets[0].base_path == b"/x" and a.targets[0].host_header == b"127.0.0.1:1"
    assert a.targets[1].port == 443 and a.targets[1].host_header == b"example.test"
    assert b.targets[0].host_header == b"[::1]:8080"
    assert b.rate_limit == 7 and b.timeout_s == 3 and b.retries == 4
    assert b.max_body_bytes == 1000
    s = config.settings
    assert (s.rate_period_s, s.rate_limit_algorithm, s.rate_limit_failure) == (10, "sliding_window", "closed")
    assert (s.backoff_base_s, s.backoff_max_s) == (0.1, 1)
    assert (s.breaker_failure_threshold, s.breaker_recovery_time_s) == (2, 9)
    assert (s.auth_cache_ttl_s, s.shutdown_grace_s) == (0, 1)
    assert [str(n) for n in s.admin_allow] == ["10.0.0.0/8"]


def test_config_is_immutable():
    """When code tries to change a loaded config, it cannot."""
    config = parse("services:\n  a:\n    url: http://h\n")
    with pytest.raises(attr.exceptions.FrozenInstanceError):
        config.services["a"].rate_limit = 5
    with pytest.raises(TypeError):
        config.services["b"] = config.services["a"]


@pytest.mark.parametrize("text, field, words", [
    ("services: [1\n", "line", "invalid YAML"),
    ("- a\n", "", "top level must be a mapping"),
    ("servics: {}\n", "servics", "unknown field"),
    ("services:\n  a:\n    url: http://h\n    colour: red\n", "services.a.colour", "unknown field"),
    ("settings:\n  rate_perod: 1\n", "settings.rate_perod", "unknown field"),
    ("services:\n  a:\n    url: ftp://h\n", "services.a.url", "not an http(s) URL"),
    ("services:\n  a:\n    url: 5\n", "services.a.url", "must be an http(s) URL"),
    ("services:\n  a:\n    urls: []\n", "services.a.urls", "non-empty list"),
    ("services:\n  a:\n    urls: [http://h, 'gopher://x']\n", "services.a.urls", "not an http(s)"),
    ("services:\n  a: {}\n", "services.a", "exactly one of url or urls"),
    ("services:\n  a:\n    url: http://h\n    urls: [http://h]\n", "services.a", "exactly one"),
    ("services:\n  a:\n    url: http://h\n    rate_limit: -1\n", "services.a.rate_limit", "at least 0"),
    ("services:\n  a:\n    url: http://h\n    rate_limit: '10'\n", "services.a.rate_limit", "must be an integer"),
    ("services:\n  a:\n    url: http://h\n    auth: 'no'\n", "services.a.auth", "true or false"),
    ("services:\n  a:\n    url: http://h\n    timeout: 0\n", "services.a.timeout", "positive"),
    ("services:\n  a:\n    url: http://h\n    retries: true\n", "services.a.retries", "integer"),
    ("services:\n  a b:\n    url: http://h\n", "services.a b", "[A-Za-z0-9_-]+"),
    ("services:\n  admin:\n    url: http://h\n", "services.admin", "reserved"),
    ("services:\n  a: 5\n", "services.a", "must be a mapping"),
    ("settings:\n  rate_limit_algorithm: leaky\n", "settings.rate_limit_algorithm", "one of"),
    ("settings:\n  rate_limit_failure: maybe\n", "settings.rate_limit_failure", "one of"),
    ("settings:\n  admin_allow: [not-a-cidr]\n", "settings.admin_allow", "not a CIDR"),
    ("settings:\n  admin_allow: 127.0.0.1\n", "settings.admin_allow", "list of CIDRs"),
    ("settings:\n  breaker_failure_threshold: 0\n", "settings.breaker_failure_threshold", "at least 1"),
    ("settings:\n  backoff_base: 3\n  backoff_max: 1\n", "settings.backoff_max", "not be smaller"),
    ("settings:\n  rate_period: .nan\n", "settings.rate_period", "finite"),
    ("settings: 3\n", "settings", "must be a mapping"),
])
def test_each_class_of_error_names_file_field_and_problem(text, field, words):
    """When the file is wrong, the error names the file, the field and the problem."""
    with pytest.raises(ConfigError) as caught:
        parse(text)
    message = str(caught.value)
    assert message.startswith("gw.yaml: ")
    assert caught.value.field.startswith(field)
    assert words in message
    assert "\n" not in message


def test_unreadable_file_is_a_config_error(tmp_path):
    """When the file is missing or not UTF-8, the error says so with its path."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        load_config(str(missing), environ={}, dotenv_path=None)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(binary), environ={}, dotenv_path=None)


@pytest.mark.parametrize("name, value, words", [
    ("DATABASE_URL", "mysql://h/db", "not sqlite or postgresql"),
    ("DATABASE_URL", "postgresql://h", "looks like"),
    ("DATABASE_URL", "postgresql://h:notaport/db", "not a valid URL"),
    ("REDIS_URL", "http://h", "redis://"),
    ("REDIS_URL", "redis://h/abc", "not a number"),
    ("DATABASE_URL", "postgresql://h1:5432,h2:x/db", "not a number from 1 to 65535"),
    ("DATABASE_URL", "postgresql://h1,/db", "is not host or host:port"),
    ("DATABASE_URL", "postgresql://h/db?target_session_attrs=rw", "not one of any, read-write"),
    ("DATABASE_URL", "postgresql://h/db?pool=3", "parameter 'pool' is not one of"),
    ("REDIS_URL", "redis+sentinel://s1:26379", "looks like redis+sentinel://"),
    ("REDIS_URL", "redis+sentinel://s1:26379,s2:99999/mymaster", "not a number from 1"),
    ("REDIS_URL", "redis+sentinel://s1/mymaster/x", "not a number"),
    ("DEBUG", "perhaps", "true or false"),
])
def test_bad_environment_names_the_variable(name, value, words):
    """When an environment variable is malformed, the error names it."""
    with pytest.raises(ConfigError) as caught:
        load_environment({name: value}, dotenv_path=None)
    assert str(caught.value).startswith(f"environment: {name}: ")
    assert words in str(caught.value)


def test_multi_host_database_url_becomes_libpq_host_and_port_lists():
    """When DATABASE_URL lists several hosts, libpq gets them in order with the parameters."""
    url = parse_database_url(
        "postgresql://app:s%40cret@db1:5433,[::1],db3/keys?target_session_attrs=read-write")
    assert url.params == {
        "host": "db1,::1,db3", "port": "5433,5432,5432", "dbname": "keys", "user": "app",
        "password": "s@cret", "target_session_attrs": "read-write",
    }
    assert url.describe() == "PostgreSQL at db1:5433,[::1]:5432,db3:5432/keys (read-write)"
    assert "s@cret" not in url.describe()
    one = parse_database_url("postgres://u@db:6000/k?sslmode=require")
    assert one.params == {"host": "db", "port": 6000, "dbname": "k", "user": "u",
                          "sslmode": "require"}


def test_sentinel_redis_url_names_the_sentinels_the_master_and_the_db():
    """When REDIS_URL is redis+sentinel://, it parses into sentinels (default port 26379), name and db."""
    url = parse_redis_url("redis+sentinel://:pw@s1:26380,s2,[::1]:26381/mymaster/3")
    assert url == SentinelRedisURL(
        sentinels=(("s1", 26380), ("s2", 26379), ("::1", 26381)), master_name="mymaster",
        db=3, password="pw")
    assert "pw" not in url.describe() and "mymaster" in url.describe()
    assert parse_redis_url("redis+sentinel://s1/m").db == 0
    assert parse_redis_url("redis://h").port == 6379


def test_dotenv_is_read_and_real_environment_wins(tmp_path):
    """When .env and the real environment both set a variable, the real one wins."""
    dotenv = tmp_path / ".env"
    dotenv.write_text("MASTER_KEY=from-dotenv\nREDIS_URL=redis://127.0.0.1:6379/3\nDEBUG=true\n")
    env = load_environment({"MASTER_KEY": "from-env"}, dotenv_path=str(dotenv))
    assert env.master_key == "from-env"
    assert env.redis_url == "redis://127.0.0.1:6379/3"
    assert env.debug is True


def _twistd(args, cwd, env=None):
    full = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    full.update(env or {})
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", "apigw", *args], cwd=cwd, env=full,
        capture_output=True, text=True, timeout=60,
    )


def test_twistd_refuses_bad_config_with_one_line(tmp_path):
    """When twistd apigw starts with a bad file, it exits non-zero with one line and no traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  a:\n    url: ftp://nowhere\n")
    result = _twistd(["--config", str(bad), "--port", "tcp:0:interface=127.0.0.1"], tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"apigw: {bad}: services.a.url: 'ftp://nowhere' is not an http(s) URL with a host"]
    assert "Traceback" not in result.stdout + result.stderr


def test_twistd_refuses_bad_environment_with_one_line(tmp_path):
    """When DATABASE_URL cannot be parsed, twistd apigw exits non-zero naming it."""
    result = _twistd(["--config", SEED], tmp_path, env={"DATABASE_URL": "oracle://x"})
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "apigw: environment: DATABASE_URL: scheme 'oracle' is not sqlite or postgresql"
    ]
