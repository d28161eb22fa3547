"""`twistd apigw`: options and makeService. Parsing and wiring only."""

import os
import sys

from twisted.python import usage

from apigw.config import ConfigError, load_config


class Options(usage.Options):
    optParameters = [
        ["config", "c", "gateway_config.yaml", "The gateway YAML configuration file."],
        ["port", "p", "tcp:8000", "Endpoint description of the public listener."],
        ["admin-port", None, None,
         "Endpoint for the admin API; when given, /admin is served ONLY there."],
        ["access-log", None, None,
         "Write one JSON object per request to this file ('-' for stdout)."],
    ]

    def postOptions(self):
        for name in ("port", "admin-port"):
            value = self[name]
            if value is not None and not value.strip():
                raise usage.UsageError(f"--{name} must not be empty")


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    try:
        config = load_config(options["config"], environ=os.environ)
    except ConfigError as e:
        # makeService runs before twistd's logging starts: one line, exit 1.
        sys.stderr.write(f"apigw: {e}\n")
        raise SystemExit(1)
    from apigw.service import GatewayService

    return GatewayService(
        config,
        port=options["port"],
        admin_port=options["admin-port"],
        access_log=options["access-log"],
        reactor=reactor,
    )
