"""
The seed's two demo upstreams, so the quickstart works on a fresh machine.

    python -m apigw.demo                 # service1 on :5001, service2 on :5002
    apigw-demo-backends --port1 0        # 0 picks a free port; the line printed says which
    python -m apigw.demo --write-config demo.yaml   # and a gateway config for them

`--write-config` writes the seed's gateway_config.yaml with the ports the
upstreams actually got, once both listen: `make demo` waits for that file,
so a port already in use stops it before a gateway starts.

`GET /test` answers like the seed's services; every other request gets an
echo of what arrived (method, raw path and query, headers, body size), which
shows what the gateway forwards: X-Forwarded-*, X-Request-ID, no X-API-Key.
"""

import argparse
import json
import os
import sys

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.web.resource import Resource
from twisted.web.server import Site

DEFAULT_PORTS = {"service1": 5001, "service2": 5002}


class DemoBackend(Resource):
    """One demo service: a greeting on `GET /test`, an echo elsewhere."""

    isLeaf = True

    def __init__(self, name):
        super().__init__()
        self._name = name

    def render(self, request):
        request.setHeader(b"content-type", b"application/json")
        if request.method == b"GET" and request.path == b"/test":
            answer = {"service": self._name, "message": f"Hello from {self._name}"}
        else:
            answer = self._echo(request)
        return json.dumps(answer).encode() + b"\n"

    def _echo(self, request):
        path, _, query = request.uri.partition(b"?")
        return {
            "service": self._name,
            "method": request.method.decode("latin-1"),
            "path": path.decode("latin-1"),
            "query": query.decode("latin-1"),
            "headers": {
                name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
                for name, values in request.requestHeaders.getAllRawHeaders()
            },
            "body_length": len(request.content.read()),
        }


class _QuietSite(Site):
    # The gateway's access log already tells the demo user what happened;
    # twisted.web's own access lines would double every request.
    noisy = False

    def log(self, request):
        pass


async def start_backends(reactor, ports, interface="127.0.0.1"):
    """Listen with one demo service per name in `ports`; return {name: IListeningPort}."""
    listening = {}
    try:
        for name, port in ports.items():
            endpoint = TCP4ServerEndpoint(reactor, port, interface=interface)
            listening[name] = await endpoint.listen(_QuietSite(DemoBackend(name)))
    except BaseException:
        for port in listening.values():
            await maybeDeferred(port.stopListening)
        raise
    return listening


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="apigw-demo-backends",
        description="Start the demo upstreams service1 and service2 of gateway_config.yaml.",
    )
    parser.add_argument("--port1", type=int, default=DEFAULT_PORTS["service1"],
                        help="port of service1 (default %(default)s; 0 = any free port)")
    parser.add_argument("--port2", type=int, default=DEFAULT_PORTS["service2"],
                        help="port of service2 (default %(default)s; 0 = any free port)")
    parser.add_argument("--interface", default="127.0.0.1",
                        help="address to listen on (default %(default)s)")
    parser.add_argument("--write-config", metavar="PATH",
                        help="once listening, write a gateway config for these upstreams here")
    return parser.parse_args(argv)


def demo_config(urls):
    """The seed's gateway_config.yaml, pointing at the demo upstreams as they listen."""
    return (
        "services:\n"
        f"  service1:\n    url: \"{urls['service1']}\"\n    rate_limit: 100\n"
        f"  service2:\n    url: \"{urls['service2']}\"\n    rate_limit: 50\n"
        "settings:\n  rate_period: 60\n"
    )


def _write_atomically(path, text):
    # Whoever waits for the file must never read half of it.
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        f.write(text)
    os.replace(partial, path)


async def _serve(reactor, options):
    ports = {"service1": options.port1, "service2": options.port2}
    try:
        listening = await start_backends(reactor, ports, options.interface)
    except CannotListenError as e:
        # One line, not a traceback: usually a demo already running.
        print(f"apigw-demo-backends: cannot listen on {e.interface}:{e.port}: {e.socketError}",
              file=sys.stderr, flush=True)
        raise SystemExit(1)
    urls = {}
    for name, port in listening.items():
        host = port.getHost()
        urls[name] = f"http://{host.host}:{host.port}"
        print(f"{name} listening on {urls[name]}", flush=True)
    if options.write_config:
        _write_atomically(options.write_config, demo_config(urls))
    # Runs until SIGINT/SIGTERM: react() stops the reactor and exits 0.
    await Deferred()


def main(argv=None):
    options = _parse_args(sys.argv[1:] if argv is None else argv)
    from twisted.internet import task

    # Only problems reach the terminal; the ready lines above are printed.
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr),
                              [LogLevelFilterPredicate(LogLevel.warn)])],
        redirectStandardIO=False,
    )
    task.react(lambda reactor: Deferred.fromCoroutine(_serve(reactor, options)))


if __name__ == "__main__":
    main()
