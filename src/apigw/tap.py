"""`twistd apigw`: options and makeService. Parsing and wiring only."""

import os
import sys

from twisted.internet.endpoints import serverFromString
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
        ["workers", None, "1",
         "Processes serving requests on one shared socket ('auto': one per CPU core)."],
    ]

    def postOptions(self):
        for name in ("port", "admin-port"):
            value = self[name]
            if value is not None and not value.strip():
                raise usage.UsageError(f"--{name} must not be empty")
        self["workers"] = _workers(self["workers"])


def _workers(value):
    if value == "auto":
        return os.cpu_count() or 1
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise usage.UsageError(f"--workers must be a whole number >= 1 or 'auto', not {value!r}")
    return count


def _refuse(message):
    # makeService runs before twistd's logging starts: one line, exit 1.
    sys.stderr.write(f"apigw: {message}\n")
    raise SystemExit(1)


def check_endpoint(reactor, option, description):
    """Parse an endpoint description now, so a typo is one line before
    anything starts; binding it is left to the service."""
    try:
        return serverFromString(reactor, description)
    except Exception as e:  # unknown type, bad syntax, unreadable TLS key...
        why = str(e) or type(e).__name__
        _refuse(f"--{option} {description!r}: {why}{endpoint_hint(description)}")


def endpoint_hint(description):
    """How to write the usual slips (a bare port, host:port) as endpoints."""
    host, _, port = description.rpartition(":")
    if description.isdigit():
        return f" (a port alone is written tcp:{description})"
    if port.isdigit() and host and ":" not in host:
        return f" (host:port is written tcp:{port}:interface={host})"
    return ""


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    try:
        config = load_config(options["config"], environ=os.environ)
    except ConfigError as e:
        _refuse(str(e))
    if options["workers"] > 1:
        from apigw.workers import make_supervisor

        return _root(options, reactor, make_supervisor(options, config, reactor))
    for option in ("port", "admin-port"):
        if options[option] is not None:
            check_endpoint(reactor, option, options[option])
    from apigw._twisted_compat import dispatch_without_log_context
    from apigw.heap import Heap
    from apigw.service import GatewayService
    from apigw.signals import stop_once_on_sigterm

    # twistd installs its SIGTERM handler as the reactor starts; ours
    # replaces it then.
    reactor.callWhenRunning(stop_once_on_sigterm, reactor)
    reactor.callWhenRunning(dispatch_without_log_context, reactor)
    return _root(options, reactor, GatewayService(
        config,
        port=options["port"],
        admin_port=options["admin-port"],
        access_log=options["access-log"],
        reactor=reactor,
        heap=Heap(reactor),
    ))


def _root(options, reactor, service):
    """`service` under the root twistd runs, once nothing is left to refuse:
    the observer for twistd's log opens its file and takes SIGUSR1."""
    from apigw.twistd_log import LoggingRoot, observer_for

    # twistd's own options (--logfile, --nodaemon) are the parent's.
    root = LoggingRoot(observer_for(getattr(options, "parent", None), reactor))
    service.setServiceParent(root)
    return root
