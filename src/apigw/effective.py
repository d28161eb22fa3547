"""The configuration in force, as `apigw check` prints it.

Every field appears with its value, defaults filled in, so the `services`
and `settings` parts are themselves a valid configuration file meaning the
same thing. The environment follows with its secrets masked: the output is
meant to be pasted into tickets and chat.
"""

from urllib.parse import urlsplit, urlunsplit

import yaml

from apigw.config import SERVICE_FIELDS, SETTINGS_FIELDS

MASK = "***"


def effective_config(config):
    return {
        "services": {name: _service(s) for name, s in config.services.items()},
        "settings": {field: _plain(getattr(config.settings, attribute))
                     for field, (attribute, _) in SETTINGS_FIELDS.items()},
        "environment": {
            "DATABASE_URL": mask_url(config.env.database_url),
            "REDIS_URL": mask_url(config.env.redis_url),
            "MASTER_KEY": MASK if config.env.master_key else None,
            "DEBUG": config.env.debug,
        },
    }


def effective_config_yaml(config):
    header = (f"# {config.path}: valid. The configuration in force, every default filled in;\n"
              "# `environment` is read from the environment and .env, secrets masked.\n")
    return header + yaml.safe_dump(effective_config(config), sort_keys=False,
                                   default_flow_style=False, allow_unicode=True)


def _service(service):
    urls = list(service.urls)
    out = {"url": urls[0]} if len(urls) == 1 else {"urls": urls}
    for field in sorted(SERVICE_FIELDS - {"url", "urls"}):
        # The YAML name, or the same with its unit: timeout -> timeout_s.
        attribute = field if hasattr(service, field) else f"{field}_s"
        out[field] = _plain(getattr(service, attribute))
    return out


def _plain(value):
    """What YAML can write and the config loader reads back as `value`."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)  # ip_network


def mask_url(url):
    """`url` with its password, if any, replaced by ***."""
    if not url:
        return url
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{hostport}"))
