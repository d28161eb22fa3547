"""Configuration: gateway_config.yaml and the environment, parsed once into
frozen values. Every problem is a ConfigError naming file, field and what is
wrong, so startup can stop with one line instead of a traceback."""

import ipaddress
import os
import re
from typing import Mapping, Optional, Tuple
from urllib.parse import urlsplit

import attr
import yaml
from dotenv import dotenv_values

MiB = 1024 * 1024
SERVICE_NAME = re.compile(r"[A-Za-z0-9_-]+\Z")
_HOST_NAME = re.compile(rb"[A-Za-z0-9._-]+\Z")
_UNSAFE_BYTES = re.compile(rb"[\x00-\x20\x7f]")


class ConfigError(Exception):
    """A configuration problem: `file: field: problem`."""

    def __init__(self, source, field, problem):
        self.source = source
        # Field names come from the file itself: a key holding a newline
        # must not split the one-line message (or forge a second log line).
        self.field = _one_line(field)
        self.problem = _one_line(problem)
        where = f"{source}: {self.field}: " if field else f"{source}: "
        super().__init__(where + self.problem)


def _one_line(text):
    """Escapes what is not printable (line breaks, controls, surrogates)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Target:
    """One upstream base URL, split once at load time."""

    url: str
    scheme: bytes
    host: bytes
    port: int
    base_path: bytes  # without trailing slash; b"" for the root
    host_header: bytes


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ServiceConfig:
    name: str
    targets: Tuple[Target, ...]
    rate_limit: Optional[int]
    auth: bool
    timeout_s: float
    retries: int
    retry_non_idempotent: bool
    strip_prefix: bool
    max_body_bytes: int
    # WebSocket upgrades proxied (apigw.websocket); False: refused with 400.
    websocket: bool = True

    @property
    def urls(self):
        return tuple(t.url for t in self.targets)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Settings:
    rate_period_s: float = 60
    default_rate_limit: Optional[int] = 100
    rate_limit_algorithm: str = "fixed_window"
    rate_limit_failure: str = "open"
    timeout_s: float = 5.0
    retries: int = 2
    backoff_base_s: float = 0.2
    backoff_max_s: float = 2.0
    breaker_failure_threshold: int = 5
    breaker_recovery_time_s: float = 30.0
    auth_cache_ttl_s: float = 10.0
    shutdown_grace_s: float = 10.0
    max_body_bytes: int = 10 * MiB
    # A WebSocket tunnel with no bytes either way for this long is closed.
    websocket_idle_timeout_s: float = 300.0
    admin_allow: Tuple[object, ...] = (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("::1/128"),
    )
    # The breaker's minimum volume: no verdict on a target from fewer
    # attempts, or a lower share of failures, within the window.
    breaker_min_requests: int = 10
    breaker_failure_ratio: float = 0.5
    breaker_window_s: float = 10.0
    # Who sees /metrics and the names in /readyz's answer.
    metrics_allow: Tuple[object, ...] = (
        ipaddress.ip_network("0.0.0.0/0"),
        ipaddress.ip_network("::/0"),
    )
    # Edge limits: the client side.
    client_header_timeout_s: float = 10.0
    client_body_timeout_s: float = 60.0
    client_send_timeout_s: float = 60.0
    keepalive_timeout_s: float = 60.0
    max_connections: Optional[int] = None  # None: what the open-files limit allows
    client_max_line_bytes: int = 8 * 1024
    client_max_headers: int = 100
    client_max_head_bytes: int = 32 * 1024
    # Edge limits: the upstream side.
    upstream_max_head_bytes: int = 64 * 1024
    upstream_max_headers: int = 100
    upstream_max_idle_per_target: int = 64
    upstream_idle_timeout_s: float = 120.0


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Environment:
    database_url: str = "sqlite:///apigw.db"
    redis_url: Optional[str] = None
    master_key: Optional[str] = None
    debug: bool = False


@attr.s(frozen=True, slots=True, auto_attribs=True)
class GatewayConfig:
    path: str
    services: Mapping[str, ServiceConfig]  # a read-only view; see _freeze
    settings: Settings
    env: Environment


# --- YAML -------------------------------------------------------------------

# field name in YAML -> (attribute, checker); the checkers raise _Bad(problem).
class _Bad(Exception):
    pass


def _int(minimum=0, nullable=False):
    def check(value):
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"must be an integer, not {_describe(value)}")
        if value < minimum:
            raise _Bad(f"must be at least {minimum}, not {value}")
        return value

    return check


def _seconds(positive=True):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad(f"must be a number of seconds, not {_describe(value)}")
        if value != value or value in (float("inf"), float("-inf")):
            raise _Bad("must be a finite number of seconds")
        if value < 0 or (positive and value == 0):
            raise _Bad(f"must be {'positive' if positive else 'zero or more'}, not {value}")
        return float(value)

    return check


def _bool(value):
    if not isinstance(value, bool):
        raise _Bad(f"must be true or false, not {_describe(value)}")
    return value


def _choice(*options):
    def check(value):
        if value not in options:
            raise _Bad(f"must be one of {', '.join(options)}, not {_describe(value)}")
        return value

    return check


def _ratio(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(f"must be a number between 0 and 1, not {_describe(value)}")
    if not 0 < value <= 1:
        raise _Bad(f"must be more than 0 and at most 1, not {value}")
    return float(value)


def _cidrs(value):
    if not isinstance(value, list):
        raise _Bad(f"must be a list of CIDRs, not {_describe(value)}")
    networks = []
    for item in value:
        if not isinstance(item, str):
            raise _Bad(f"must be a list of CIDRs; {_describe(item)} is not one")
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise _Bad(f"{item!r} is not a CIDR like 127.0.0.1/32") from None
    return tuple(networks)


def _describe(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else "a long string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


SETTINGS_FIELDS = {
    "rate_period": ("rate_period_s", _seconds()),
    "default_rate_limit": ("default_rate_limit", _int(nullable=True)),
    "rate_limit_algorithm": (
        "rate_limit_algorithm",
        _choice("fixed_window", "sliding_window"),
    ),
    "rate_limit_failure": ("rate_limit_failure", _choice("open", "closed")),
    "timeout": ("timeout_s", _seconds()),
    "retries": ("retries", _int()),
    "backoff_base": ("backoff_base_s", _seconds(positive=False)),
    "backoff_max": ("backoff_max_s", _seconds(positive=False)),
    "breaker_failure_threshold": ("breaker_failure_threshold", _int(minimum=1)),
    "breaker_recovery_time": ("breaker_recovery_time_s", _seconds()),
    "auth_cache_ttl": ("auth_cache_ttl_s", _seconds(positive=False)),
    "shutdown_grace": ("shutdown_grace_s", _seconds(positive=False)),
    "max_body_bytes": ("max_body_bytes", _int()),
    "websocket_idle_timeout": ("websocket_idle_timeout_s", _seconds()),
    "admin_allow": ("admin_allow", _cidrs),
    "breaker_min_requests": ("breaker_min_requests", _int(minimum=1)),
    "breaker_failure_ratio": ("breaker_failure_ratio", _ratio),
    "breaker_window": ("breaker_window_s", _seconds()),
    "metrics_allow": ("metrics_allow", _cidrs),
    "client_header_timeout": ("client_header_timeout_s", _seconds()),
    "client_body_timeout": ("client_body_timeout_s", _seconds()),
    "client_send_timeout": ("client_send_timeout_s", _seconds()),
    "keepalive_timeout": ("keepalive_timeout_s", _seconds()),
    "max_connections": ("max_connections", _int(minimum=1, nullable=True)),
    "client_max_line_bytes": ("client_max_line_bytes", _int(minimum=256)),
    "client_max_headers": ("client_max_headers", _int(minimum=1)),
    "client_max_head_bytes": ("client_max_head_bytes", _int(minimum=256)),
    "upstream_max_head_bytes": ("upstream_max_head_bytes", _int(minimum=256)),
    "upstream_max_headers": ("upstream_max_headers", _int(minimum=1)),
    "upstream_max_idle_per_target": ("upstream_max_idle_per_target", _int()),
    "upstream_idle_timeout": ("upstream_idle_timeout_s", _seconds()),
}

SERVICE_FIELDS = {
    "url", "urls", "rate_limit", "auth", "timeout", "retries",
    "retry_non_idempotent", "strip_prefix", "max_body_bytes", "websocket",
}


def parse_target(url):
    """Split an upstream base URL; raises _Bad unless it is http(s)."""
    if not isinstance(url, str):
        raise _Bad(f"must be an http(s) URL, not {_describe(url)}")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise _Bad(f"{url!r} is not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Bad(f"{url!r} is not an http(s) URL with a host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise _Bad(f"{url!r} must not carry a query, fragment or credentials")
    default_port = 443 if parts.scheme == "https" else 80
    if port == 0:
        raise _Bad(f"{url!r} has port 0")
    host = parts.hostname
    is_ip = _is_ip(host)
    try:
        host_bytes = host.encode("idna") if not is_ip else host.encode("ascii")
        base_path = parts.path.rstrip("/").encode("utf-8")
    except UnicodeError:
        raise _Bad(f"{url!r} has a host name or path that cannot be encoded") from None
    # Both end up verbatim in the Host header and the request line: a space
    # or control byte there would corrupt (or split) every upstream request.
    if _UNSAFE_BYTES.search(host_bytes) or not (is_ip or _HOST_NAME.match(host_bytes)):
        raise _Bad(f"{url!r} has a host name with characters no host name can hold")
    if _UNSAFE_BYTES.search(base_path):
        raise _Bad(f"{url!r} has spaces or control characters in its path "
                   "(percent-encode them)")
    shown_host = f"[{host}]" if ":" in host else host_bytes.decode("ascii")
    host_header = shown_host if port in (None, default_port) else f"{shown_host}:{port}"
    return Target(
        url=url.strip(),
        scheme=parts.scheme.encode("ascii"),
        host=host_bytes,
        port=port or default_port,
        base_path=base_path,
        host_header=host_header.encode("ascii"),
    )


def _is_ip(host):
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _parse_settings(raw, source):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, "settings", f"must be a mapping, not {_describe(raw)}")
    values = {}
    for key, value in raw.items():
        if key not in SETTINGS_FIELDS:
            raise ConfigError(source, f"settings.{key}", _unknown(key, SETTINGS_FIELDS))
        attribute, check = SETTINGS_FIELDS[key]
        try:
            values[attribute] = check(value)
        except _Bad as e:
            raise ConfigError(source, f"settings.{key}", str(e)) from None
    settings = Settings(**values)
    if settings.backoff_max_s < settings.backoff_base_s:
        raise ConfigError(
            source, "settings.backoff_max", "must not be smaller than settings.backoff_base"
        )
    return settings


def _parse_service(name, raw, settings, source):
    field = f"services.{name}"
    if not isinstance(name, str) or not SERVICE_NAME.match(name):
        raise ConfigError(source, f"services.{name}", "service names are [A-Za-z0-9_-]+")
    if name in RESERVED_NAMES:
        raise ConfigError(source, field, f"{name!r} is reserved by the gateway")
    if not isinstance(raw, dict):
        raise ConfigError(source, field, f"must be a mapping, not {_describe(raw)}")
    for key in raw:
        if key not in SERVICE_FIELDS:
            raise ConfigError(source, f"{field}.{key}", _unknown(key, SERVICE_FIELDS))
    if ("url" in raw) == ("urls" in raw):
        raise ConfigError(source, field, "needs exactly one of url or urls")

    def get(key, check, default):
        if key not in raw:
            return default
        try:
            return check(raw[key])
        except _Bad as e:
            raise ConfigError(source, f"{field}.{key}", str(e)) from None

    if "url" in raw:
        targets = (get("url", parse_target, None),)
    else:
        urls = raw["urls"]
        if not isinstance(urls, list) or not urls:
            raise ConfigError(source, f"{field}.urls", "must be a non-empty list of URLs")
        try:
            targets = tuple(parse_target(u) for u in urls)
        except _Bad as e:
            raise ConfigError(source, f"{field}.urls", str(e)) from None
    return ServiceConfig(
        name=name,
        targets=targets,
        rate_limit=get("rate_limit", _int(nullable=True), settings.default_rate_limit),
        auth=get("auth", _bool, True),
        timeout_s=get("timeout", _seconds(), settings.timeout_s),
        retries=get("retries", _int(), settings.retries),
        retry_non_idempotent=get("retry_non_idempotent", _bool, False),
        strip_prefix=get("strip_prefix", _bool, True),
        max_body_bytes=get("max_body_bytes", _int(), settings.max_body_bytes),
        websocket=get("websocket", _bool, True),
    )


# Top-level paths the gateway answers itself; a service of that name could
# never be reached.
RESERVED_NAMES = frozenset({"healthz", "readyz", "metrics", "admin"})


def _unknown(key, known):
    return f"unknown field {key!r} (known: {', '.join(sorted(known))})"


def parse_config(text, source, env):
    """Parse YAML text into a GatewayConfig. `env` is an Environment."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "YAML"
        problem = getattr(e, "problem", None) or (str(e).splitlines() or ["unreadable"])[0]
        raise ConfigError(source, where, f"invalid YAML: {problem}") from None
    except RecursionError:
        # PyYAML composes nested collections recursively.
        raise ConfigError(source, "YAML", "invalid YAML: nested too deeply") from None
    except (ValueError, TypeError, IndexError, OverflowError) as e:
        # PyYAML's constructors raise these for values that do not fit their
        # tag or pattern: `2023-13-45`, `!!int x`, an empty `!!int`.
        raise ConfigError(source, "YAML",
                          f"invalid YAML: a value does not fit its type ({e})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, "", f"the top level must be a mapping, not {_describe(raw)}")
    for key in raw:
        if key not in ("services", "settings"):
            raise ConfigError(source, str(key), _unknown(key, ("services", "settings")))
    settings = _parse_settings(raw.get("settings"), source)
    services_raw = raw.get("services")
    if services_raw is None:
        services_raw = {}
    if not isinstance(services_raw, dict):
        raise ConfigError(source, "services", f"must be a mapping, not {_describe(services_raw)}")
    services = {
        str(name): _parse_service(name, body, settings, source)
        for name, body in services_raw.items()
    }
    return GatewayConfig(path=source, services=_freeze(services), settings=settings, env=env)


def _freeze(mapping):
    from types import MappingProxyType

    return MappingProxyType(dict(mapping))


def load_config(path, environ=None, dotenv_path=".env"):
    """Read the YAML file and the environment (with .env under it)."""
    env = load_environment(os.environ if environ is None else environ, dotenv_path)
    return parse_config(_read_text(path), path, env)


def _read_text(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "is not UTF-8 text") from None


def reload_config(current):
    """Re-read current.path. The environment is kept: the key store and
    Redis connections it names are only made at startup."""
    return parse_config(_read_text(current.path), current.path, current.env)


# --- environment -------------------------------------------------------------

def load_environment(environ, dotenv_path=".env"):
    """Real environment variables win over those in .env."""
    values = {}
    if dotenv_path and os.path.isfile(dotenv_path):
        try:
            values.update(
                {k: v for k, v in dotenv_values(dotenv_path).items() if v is not None}
            )
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(dotenv_path, "", f"cannot read: {e}") from None
    values.update(environ)
    source = "environment"
    for name in ("DATABASE_URL", "REDIS_URL", "MASTER_KEY"):
        # Never echoed: these may hold a password or the master key itself.
        if not _plain_text(values.get(name) or ""):
            raise ConfigError(source, name, "must be UTF-8 text without control characters")
    database_url = values.get("DATABASE_URL") or "sqlite:///apigw.db"
    try:
        parse_database_url(database_url)
    except _Bad as e:
        raise ConfigError(source, "DATABASE_URL", str(e)) from None
    redis_url = values.get("REDIS_URL") or None
    if redis_url is not None:
        try:
            parse_redis_url(redis_url)
        except _Bad as e:
            raise ConfigError(source, "REDIS_URL", str(e)) from None
    debug_raw = (values.get("DEBUG") or "false").strip().lower()
    if debug_raw not in ("true", "false", "1", "0", "yes", "no", "on", "off", ""):
        raise ConfigError(source, "DEBUG", f"must be true or false, not {debug_raw!r}")
    return Environment(
        database_url=database_url,
        redis_url=redis_url,
        master_key=values.get("MASTER_KEY") or None,
        debug=debug_raw in ("true", "1", "yes", "on"),
    )


def _plain_text(value):
    # os.environ turns bytes that are not UTF-8 into lone surrogates, which
    # would only fail later, inside hmac or the database driver.
    try:
        value.encode("utf-8")
    except UnicodeError:
        return False
    return not re.search(r"[\x00-\x1f\x7f]", value)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class DatabaseURL:
    kind: str  # "sqlite" or "postgresql"
    path: Optional[str] = None  # sqlite file
    params: Mapping[str, object] = attr.ib(factory=dict)  # psycopg2.connect kwargs

    def describe(self):
        """Where the keys live, for the log: never the password."""
        if self.kind == "sqlite":
            return f"SQLite file {os.path.abspath(self.path)}"
        p = self.params
        hosts = _host_port_list(str(p["host"]).split(","), str(p["port"]).split(","))
        where = f"PostgreSQL at {hosts}/{p['dbname']}"
        if "target_session_attrs" in p:
            where += f" ({p['target_session_attrs']})"
        return where


def _host_port_list(hosts, ports):
    return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in zip(hosts, ports))


# Query parameters of a PostgreSQL URL handed on to libpq. Anything else is
# refused here: libpq would only refuse it at the first connection, after
# startup, as an outage.
_LIBPQ_PARAMETERS = {
    "target_session_attrs": ("any", "read-write", "read-only", "primary", "standby",
                             "prefer-standby"),
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "connect_timeout": None,
    "application_name": None,
    "sslrootcert": None,
    "sslcert": None,
    "sslkey": None,
    "keepalives": None,
    "keepalives_idle": None,
    "keepalives_interval": None,
    "keepalives_count": None,
}


def _split_userinfo(netloc):
    from urllib.parse import unquote

    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        return None, None, netloc
    user, colon, password = userinfo.partition(":")
    return unquote(user) or None, unquote(password) if colon else None, hosts


def _split_hosts(text, default_port):
    """`h1:p1,[::1]:p2,h3` -> [(host, port)]: libpq's multi-host form."""
    found = []
    for item in text.split(","):
        match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\w*))?|([^:\[\]]+)(?::(\w*))?", item)
        if match is None:
            raise _Bad(f"host {item!r} is not host or host:port")
        host = match.group(1) or match.group(3)
        port_text = match.group(2) if match.group(1) else match.group(4)
        if not _HOST_NAME.match(host.encode("utf-8", "replace")) and not match.group(1):
            raise _Bad(f"host {host!r} is not a host name or address")
        if port_text in (None, ""):
            port = default_port
        elif port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536:
            port = int(port_text)
        else:
            raise _Bad(f"is not a valid URL (port {port_text!r} of {host} is not a number"
                       " from 1 to 65535)")
        found.append((host, port))
    return found


def parse_database_url(url):
    """sqlite:///relative.db, sqlite:////abs.db or postgresql://u:p@h:5432/db,
    the last with libpq's list of hosts (h1:5432,h2:5432) and parameters
    (?target_session_attrs=read-write)."""
    try:
        parts = urlsplit(url)
    except ValueError as e:
        # Not the URL itself: it may carry a password.
        raise _Bad(f"is not a valid URL ({e})") from None
    if parts.scheme == "sqlite":
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if parts.netloc or not path:
            raise _Bad("a SQLite URL looks like sqlite:///apigw.db")
        return DatabaseURL(kind="sqlite", path=path)
    if parts.scheme in ("postgres", "postgresql"):
        from urllib.parse import parse_qsl, unquote

        dbname = parts.path.lstrip("/")
        user, password, hosts_text = _split_userinfo(parts.netloc)
        if not hosts_text or not dbname:
            raise _Bad("a PostgreSQL URL looks like postgresql://user:pass@host:5432/db")
        hosts = _split_hosts(hosts_text, 5432)
        params = {"dbname": unquote(dbname)}
        if len(hosts) == 1:
            params["host"], params["port"] = hosts[0]
        else:
            # libpq's keyword form of a host list: it tries them in order
            # and, with target_session_attrs, keeps the one that fits.
            params["host"] = ",".join(h for h, _ in hosts)
            params["port"] = ",".join(str(p) for _, p in hosts)
        if user:
            params["user"] = user
        if password:
            params["password"] = password
        try:
            query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True) \
                if parts.query else []
        except ValueError:
            raise _Bad("the query is not name=value pairs joined by &") from None
        for name, value in query:
            if name not in _LIBPQ_PARAMETERS:
                known = ", ".join(sorted(_LIBPQ_PARAMETERS))
                raise _Bad(f"parameter {name!r} is not one of {known}")
            allowed = _LIBPQ_PARAMETERS[name]
            if allowed is not None and value not in allowed:
                raise _Bad(f"{name} {value!r} is not one of {', '.join(allowed)}")
            params[name] = value
        return DatabaseURL(kind="postgresql", params=params)
    raise _Bad(f"scheme {parts.scheme or '(none)'!r} is not sqlite or postgresql")


@attr.s(frozen=True, slots=True, auto_attribs=True)
class RedisURL:
    host: str
    port: int
    db: int
    password: Optional[str]

    def describe(self):
        """Where the counters live, for the log: never the password."""
        return f"Redis at {self.host}:{self.port}/{self.db}"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class SentinelRedisURL:
    """redis+sentinel://: the master of `master_name`, as the sentinels say."""

    sentinels: Tuple[Tuple[str, int], ...]
    master_name: str
    db: int
    password: Optional[str]  # the Redis servers'; the sentinels are asked without

    def describe(self):
        """Where the counters live, for the log: never the password."""
        where = _host_port_list([h for h, _ in self.sentinels],
                                [p for _, p in self.sentinels])
        return f"Redis master {self.master_name!r}/{self.db} through Sentinel at {where}"


def _redis_db(text):
    db_text = text or "0"
    # str.isdigit() also accepts digits int() refuses, such as "²".
    if not (db_text.isascii() and db_text.isdigit()):
        raise _Bad(f"database {db_text!r} is not a number")
    return int(db_text)


def parse_redis_url(url):
    """redis://[:password@]host[:port][/db], a RedisURL, or
    redis+sentinel://[:password@]host[:port][,host[:port]...]/name[/db], a
    SentinelRedisURL."""
    try:
        parts = urlsplit(url)
    except ValueError as e:
        # Not the URL itself: it may carry a password.
        raise _Bad(f"is not a valid URL ({e})") from None
    if parts.scheme == "redis+sentinel":
        from urllib.parse import unquote

        _, password, hosts_text = _split_userinfo(parts.netloc)
        name, _, db_text = parts.path.lstrip("/").partition("/")
        if not hosts_text or not name or "/" in db_text:
            raise _Bad("a Sentinel URL looks like"
                       " redis+sentinel://host:26379,host2:26379/mymaster/0")
        return SentinelRedisURL(
            sentinels=tuple(_split_hosts(hosts_text, 26379)), master_name=unquote(name),
            db=_redis_db(db_text), password=password,
        )
    try:
        port = parts.port
    except ValueError as e:
        raise _Bad(f"is not a valid URL ({e})") from None
    if parts.scheme != "redis" or not parts.hostname:
        raise _Bad("a Redis URL looks like redis://host:6379/0"
                   " (or redis+sentinel://host:26379/mymaster/0)")
    return RedisURL(
        host=parts.hostname, port=port or 6379, db=_redis_db(parts.path.lstrip("/")),
        password=parts.password,
    )
