"""Property tests for the config loader (issue 8, point 2): whatever the YAML
or the environment holds, the answer is a well-formed frozen config or one
clean ConfigError line, never a traceback, and a bad reload changes nothing."""

import ipaddress
import math
import re
from types import MappingProxyType
from urllib.parse import urlsplit

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from apigw.config import (
    RESERVED_NAMES, SERVICE_FIELDS, SETTINGS_FIELDS, ConfigError, Environment, GatewayConfig,
    ServiceConfig, Settings, Target, load_environment, parse_config,
)

# The profile loaded by conftest.py (200 examples; HYPOTHESIS_PROFILE=thorough
# for more); no deadline, since pytest-twisted runs every test via the reactor.
PROPERTIES = settings(deadline=None)
ENV = Environment()
NAME = re.compile(r"[A-Za-z0-9_-]+\Z")
# Bytes a Host header or request line may never carry.
UNSAFE = re.compile(rb"[\x00-\x20\x7f]")


# --- what "well formed" means ---------------------------------------------------

def is_int(value, minimum=0):
    return type(value) is int and value >= minimum


def is_seconds(value, positive=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and (value > 0 if positive else value >= 0)


def check_target(target):
    assert isinstance(target, Target)
    assert target.scheme in (b"http", b"https")
    assert isinstance(target.url, str)
    assert target.url.lower().startswith(target.scheme.decode() + "://")
    assert isinstance(target.host, bytes) and target.host and not UNSAFE.search(target.host)
    target.host.decode("ascii")
    assert is_int(target.port, 1) and target.port <= 65535
    assert isinstance(target.base_path, bytes) and not UNSAFE.search(target.base_path)
    assert target.base_path == b"" or (target.base_path.startswith(b"/")
                                       and not target.base_path.endswith(b"/"))
    assert isinstance(target.host_header, bytes) and target.host_header
    assert not UNSAFE.search(target.host_header)
    target.host_header.decode("ascii")


def check_service(name, service):
    assert isinstance(service, ServiceConfig)
    assert service.name == name and NAME.match(name) and name not in RESERVED_NAMES
    name.encode("ascii")
    assert isinstance(service.targets, tuple) and service.targets
    for target in service.targets:
        check_target(target)
    assert service.rate_limit is None or is_int(service.rate_limit)
    assert type(service.auth) is bool
    assert is_seconds(service.timeout_s)
    assert is_int(service.retries)
    assert type(service.retry_non_idempotent) is bool
    assert type(service.strip_prefix) is bool
    assert is_int(service.max_body_bytes)
    assert type(service.websocket) is bool


def check_settings(s):
    assert isinstance(s, Settings)
    assert is_seconds(s.rate_period_s)
    assert s.default_rate_limit is None or is_int(s.default_rate_limit)
    assert s.rate_limit_algorithm in ("fixed_window", "sliding_window")
    assert s.rate_limit_failure in ("open", "closed")
    assert is_seconds(s.timeout_s)
    assert is_int(s.retries)
    assert is_seconds(s.backoff_base_s, positive=False)
    assert is_seconds(s.backoff_max_s, positive=False) and s.backoff_max_s >= s.backoff_base_s
    assert is_int(s.breaker_failure_threshold, 1)
    assert is_seconds(s.breaker_recovery_time_s)
    assert is_seconds(s.auth_cache_ttl_s, positive=False)
    assert is_seconds(s.shutdown_grace_s, positive=False)
    assert is_int(s.max_body_bytes)
    for networks in (s.admin_allow, s.metrics_allow):
        assert isinstance(networks, tuple)
        assert all(isinstance(n, (ipaddress.IPv4Network, ipaddress.IPv6Network))
                   for n in networks)
    assert is_int(s.breaker_min_requests, 1)
    assert isinstance(s.breaker_failure_ratio, float) and 0 < s.breaker_failure_ratio <= 1
    for seconds_ in (s.breaker_window_s, s.client_header_timeout_s, s.client_body_timeout_s,
                     s.client_send_timeout_s, s.keepalive_timeout_s, s.upstream_idle_timeout_s):
        assert is_seconds(seconds_)
    assert s.max_connections is None or is_int(s.max_connections, 1)
    assert is_int(s.client_max_line_bytes, 256) and is_int(s.client_max_head_bytes, 256)
    assert is_int(s.upstream_max_head_bytes, 256)
    assert is_int(s.client_max_headers, 1) and is_int(s.upstream_max_headers, 1)
    assert is_int(s.upstream_max_idle_per_target)
    assert is_seconds(s.websocket_idle_timeout_s)


def check_config(config, env=ENV):
    assert isinstance(config, GatewayConfig)
    assert config.path == "gw.yaml" and config.env is env
    assert isinstance(config.services, MappingProxyType)
    for name, service in config.services.items():
        check_service(name, service)
    check_settings(config.settings)


def check_error(error, source):
    message = str(error)
    assert message.startswith(source + ": "), message
    assert len(message.splitlines()) == 1 and "\n" not in message and "\r" not in message, message
    assert "Traceback" not in message


def parse_or_error(text):
    """The config, or None after checking the error is one clean line."""
    try:
        config = parse_config(text, "gw.yaml", ENV)
    except ConfigError as e:
        check_error(e, "gw.yaml")
        return None
    check_config(config)
    return config


# --- inputs -----------------------------------------------------------------------

# Strings that look like the real thing, and strings that break things.
nasty_text = st.one_of(
    st.text(max_size=30),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=12),  # surrogates too
    st.sampled_from(["", " ", "\n", "a\nb", "x\r\ny", "\u2028", "\x85", "\x00", "é", "-1",
                     "1e400", "nan", "yes", "~", "null", "0x10", "1_000"]),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-3, 3), st.integers(2**62, 2**70),
    st.floats(), st.floats(-10, 10), nasty_text, st.binary(max_size=8), st.dates(),
)
anything = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(nasty_text, st.integers(), st.booleans(), st.none()),
                        inner, max_size=4),
    ),
    max_leaves=12,
)

hosts = st.one_of(
    st.sampled_from(["127.0.0.1", "localhost", "[::1]", "example.com", "a_b.internal",
                     "xn--bcher-kva.example", "bücher.example", "a b", "a%00b", "a\x00b",
                     "", "[::1", "256.1.1.1", "a..b", ".", "-"]),
    st.text(max_size=10),
)
ports = st.one_of(st.just(""), st.sampled_from([":0", ":1", ":80", ":65535", ":65536",
                                               ":-1", ":x", ":"]),
                  st.integers(0, 70000).map(lambda p: f":{p}"))
paths = st.one_of(st.sampled_from(["", "/", "/api", "/api/", "/a b", "/a\tb", "/\ud800",
                                   "/é", "/%2e%2e", "/a?q=1", "/#f", "//x"]),
                  st.text(max_size=10).map(lambda t: "/" + t))
urls = st.one_of(
    st.builds(lambda s, h, p, q: f"{s}://{h}{p}{q}",
              st.sampled_from(["http", "https", "ftp", "HTTP", ""]), hosts, ports, paths),
    st.sampled_from(["http://user:pw@h/", "http://h/?q", "mailto:x", "//h/"]),
    anything,
)
seconds = st.one_of(st.integers(-2, 100), st.floats(), st.sampled_from([0, 0.0, -0.0, 1e-300]),
                    anything)
counts = st.one_of(st.integers(-2, 2**40), st.none(), st.booleans(), st.floats(-2, 2), anything)
cidrs = st.one_of(
    st.lists(st.one_of(st.sampled_from(["127.0.0.1/32", "::1/128", "10.0.0.0/8", "10.0.0.1/8",
                                        "1.2.3.4/33", "fe80::1%eth0/64", "x", "", " ::1 "]),
                       anything), max_size=3),
    anything,
)
SETTINGS_VALUES = {
    "rate_period": seconds, "default_rate_limit": counts,
    "rate_limit_algorithm": st.one_of(st.sampled_from(["fixed_window", "sliding_window",
                                                       "token_bucket"]), anything),
    "rate_limit_failure": st.one_of(st.sampled_from(["open", "closed", "Open"]), anything),
    "timeout": seconds, "retries": counts, "backoff_base": seconds, "backoff_max": seconds,
    "breaker_failure_threshold": counts, "breaker_recovery_time": seconds,
    "auth_cache_ttl": seconds, "shutdown_grace": seconds, "max_body_bytes": counts,
    "admin_allow": cidrs, "metrics_allow": cidrs,
    "breaker_min_requests": counts, "breaker_failure_ratio": st.one_of(st.floats(-1, 2), anything),
    "breaker_window": seconds,
    "client_header_timeout": seconds, "client_body_timeout": seconds,
    "client_send_timeout": seconds, "keepalive_timeout": seconds, "max_connections": counts,
    "client_max_line_bytes": counts, "client_max_headers": counts,
    "client_max_head_bytes": counts, "upstream_max_head_bytes": counts,
    "upstream_max_headers": counts, "upstream_max_idle_per_target": counts,
    "upstream_idle_timeout": seconds,
    "websocket_idle_timeout": seconds,
}
assert set(SETTINGS_VALUES) == set(SETTINGS_FIELDS)
SERVICE_VALUES = {
    "url": urls, "urls": st.one_of(st.lists(urls, max_size=3), anything),
    "rate_limit": counts, "auth": st.one_of(st.booleans(), anything),
    "timeout": seconds, "retries": counts,
    "retry_non_idempotent": st.one_of(st.booleans(), anything),
    "strip_prefix": st.one_of(st.booleans(), anything), "max_body_bytes": counts,
    "websocket": st.one_of(st.booleans(), anything),
}
assert set(SERVICE_VALUES) == SERVICE_FIELDS


def some_of(values, extra_keys=None):
    """A mapping with any subset of the real fields, sometimes an unknown one."""
    chosen = st.fixed_dictionaries({}, optional=values)
    if extra_keys is None:
        return chosen
    return st.builds(lambda c, extra: {**c, **extra}, chosen,
                     st.dictionaries(extra_keys, anything, max_size=1))


service_names = st.one_of(
    st.sampled_from(["service1", "a-b_C9", "admin", "metrics", "healthz", "readyz", "a b",
                     "a/b", "é", "x\ny", ""]),
    st.from_regex(NAME, fullmatch=True), nasty_text, st.integers(),
)
near_valid = st.fixed_dictionaries({}, optional={
    "services": st.one_of(
        st.dictionaries(service_names, st.one_of(some_of(SERVICE_VALUES, nasty_text), anything),
                        max_size=3),
        anything,
    ),
    "settings": st.one_of(some_of(SETTINGS_VALUES, nasty_text), anything),
}).map(lambda d: d if d else None)
structures = st.one_of(near_valid, anything, st.dictionaries(nasty_text, anything, max_size=2))


def dump(structure):
    """YAML for a structure, or None if PyYAML cannot write it."""
    try:
        return yaml.safe_dump(structure, allow_unicode=True, default_flow_style=False)
    except (yaml.YAMLError, UnicodeError):
        return None


yaml_lines = st.lists(
    st.tuples(st.sampled_from(["", "  ", "    ", "\t"]),
              st.one_of(st.sampled_from(sorted(SETTINGS_FIELDS | dict.fromkeys(SERVICE_FIELDS)
                                               | {"services": 0, "settings": 0})),
                        nasty_text),
              st.sampled_from([":", ": ", ":\n", " - ", ""]),
              st.one_of(nasty_text, st.sampled_from(["[", "]", "{", "&a", "*a", "!!int x",
                                                     "!!python/object:os.system", "'", '"',
                                                     "|", ">", "%YAML 1.1", "---", "..."]))),
    max_size=8,
).map(lambda lines: "\n".join(f"{i}{k}{sep}{v}" for i, k, sep, v in lines))


# --- parse_config -----------------------------------------------------------------

@PROPERTIES
@given(structures)
def test_any_structure_gives_a_valid_config_or_one_error_line(structure):
    """When any YAML-able structure is loaded, the result is a well-formed config or a one-line ConfigError naming gw.yaml."""
    text = dump(structure)
    if text is None:
        return
    parse_or_error(text)


@PROPERTIES
@given(st.one_of(st.text(), yaml_lines, st.binary(), st.text().map(lambda t: t.encode("utf-16"))))
@example('services:\n  "a\\nb": {url: "http://x"}')
@example('"top\\nlevel": 1')
@example('settings:\n  "x\\u2028y": 1')
@example('services:\n  s: {url: "http://h/\\ud800"}')
@example('services:\n  s: {url: "http://a b/"}')
@example('services:\n  s: {url: "http://h:0/"}')
@example('services:\n  s: {url: "http://h/a\\tb"}')
@example("[" * 3000)
@example("a: " + "[" * 3000)
@example("&a [*a]")
@example("0: !!int")
@example("0: !!int ;")
@example("day: 2023-13-45")
def test_any_text_gives_a_valid_config_or_one_error_line(text):
    """When the file holds any text or bytes at all, the result is a well-formed config or a one-line ConfigError."""
    parse_or_error(text)


def test_near_valid_inputs_are_mostly_accepted():
    """When near-valid structures are generated, a fair share parse, so the property above checks valid configs too."""
    outcomes = []

    @settings(PROPERTIES, max_examples=150, database=None)
    @given(st.fixed_dictionaries({"services": st.dictionaries(
        st.from_regex(NAME, fullmatch=True).filter(lambda n: n not in RESERVED_NAMES),
        st.fixed_dictionaries({"url": st.sampled_from(["http://127.0.0.1:5001", "https://h/x"])},
                              optional={k: v for k, v in SERVICE_VALUES.items()
                                        if k not in ("url", "urls")}),
        max_size=2)}, optional={"settings": some_of(SETTINGS_VALUES)}))
    def collect(structure):
        outcomes.append(parse_or_error(dump(structure)) is not None)

    collect()
    assert 0 < outcomes.count(True) < len(outcomes)


# --- load_environment -------------------------------------------------------------

env_values = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=10),
    st.sampled_from([
        "", "sqlite:///apigw.db", "sqlite:////tmp/x.db", "sqlite://", "sqlite:///a\x00b",
        "postgresql://u:hunter2@h:5432/db", "postgres://h/db", "postgresql://u:hunter2@h:x/db",
        "postgresql://[::1/db", "postgresql://h/", "mysql://h/db", "redis://h:6379/0",
        "redis://:hunter2@h:99999/0", "redis://h/²", "redis://h/x", "redis://h/1/2", "redis://",
        "true", "FALSE", " on ", "maybe", "1", "x\ny", "\u2028", "hunter2-master",
    ]),
)
environments = st.dictionaries(
    st.one_of(st.sampled_from(["DATABASE_URL", "REDIS_URL", "MASTER_KEY", "DEBUG", "PATH"]),
              st.text(max_size=8)),
    env_values, max_size=5,
)


def secrets_in(environ):
    """URL passwords and master keys holding the marker "hunter2" (so that no
    fixed wording can contain them by chance), unless another variable repeats
    them: then an error quoting that other variable is fair."""
    found = {"MASTER_KEY": environ.get("MASTER_KEY") or ""}
    for name in ("DATABASE_URL", "REDIS_URL"):
        try:
            found[name] = urlsplit(environ.get(name) or "").password or ""
        except ValueError:
            found[name] = (environ.get(name) or "").rpartition("@")[0].rpartition(":")[2]
    return [secret for name, secret in found.items()
            if "hunter2" in secret and not any(secret in k or (k != name and secret in v)
                                            for k, v in environ.items())]


@PROPERTIES
@given(environments)
@example({"REDIS_URL": "redis://h/²"})
@example({"MASTER_KEY": "\udcff"})
@example({"DATABASE_URL": "sqlite:///a\x00b.db"})
@example({"DATABASE_URL": "postgresql://u:hunter2@h:x/db"})
@example({"REDIS_URL": "redis://:hunter2@h:99999/0"})
def test_any_environment_gives_a_valid_environment_or_one_error_line(environ):
    """When the environment holds anything, load_environment returns well-formed values or one ConfigError line naming the environment."""
    try:
        env = load_environment(environ, dotenv_path=None)
    except ConfigError as e:
        check_error(e, "environment")
        for secret in secrets_in(environ):
            assert secret not in str(e), "a password or the master key was repeated"
        return
    assert isinstance(env, Environment)
    assert isinstance(env.database_url, str)
    assert env.database_url.startswith(("sqlite:", "postgres:", "postgresql:"))
    assert env.redis_url is None or env.redis_url.startswith("redis://")
    assert env.master_key is None or (isinstance(env.master_key, str) and env.master_key)
    for value in (env.database_url, env.redis_url, env.master_key):
        if value is not None:
            value.encode("utf-8")  # what the key store, Redis and hmac will need
            assert "\x00" not in value
    assert type(env.debug) is bool


# --- reload ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reloadable(tmp_path_factory):
    from apigw.service import GatewayService

    path = tmp_path_factory.mktemp("reload") / "gw.yaml"
    original = "services:\n  svc:\n    url: http://127.0.0.1:9\n    auth: false\n"
    path.write_text(original)
    env = Environment(database_url=f"sqlite:///{path.parent}/gw.db")
    config = parse_config(original, str(path), env)
    # Never started: nothing listens or connects, reload only reads the file.
    service = GatewayService(config, port="tcp:0:interface=127.0.0.1",
                             reactor=MemoryReactorClock(), clock=Clock())
    return service, path


@PROPERTIES
@given(st.one_of(structures.map(dump).filter(lambda t: t is not None), yaml_lines, st.binary()))
@example(b"\xff\xfe not utf-8")
@example("services:\n  svc:\n    url: ftp://x\n")
def test_reload_is_all_or_nothing(reloadable, text):
    """When the file is replaced by anything and reloaded, either the whole new config is live or the old config object is kept untouched."""
    service, path = reloadable
    before = (service.config, service.root.routes, service.site.body_limit)
    errors_before = service.metrics.registry.get_sample_value(
        "gateway_config_reloads_total", {"result": "error"}) or 0
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        names = service.reload()
    except ConfigError as e:
        check_error(e, str(path))
        assert (service.config, service.root.routes, service.site.body_limit) == before
        assert service.config is before[0] and service.root.routes is before[1]
        errors = service.metrics.registry.get_sample_value(
            "gateway_config_reloads_total", {"result": "error"})
        assert errors == errors_before + 1
        return
    assert names == sorted(service.config.services)
    assert service.config is not before[0] and service.config.env is before[0].env
    assert sorted(k.decode() for k in service.root.routes) == names
    for name, service_config in service.config.services.items():
        check_service(name, service_config)
        assert service.root.routes[name.encode()].service == service_config
