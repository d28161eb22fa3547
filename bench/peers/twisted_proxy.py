"""Twisted's stock reverse proxy: twisted.web.proxy.ReverseProxyResource
mounted at /<service> on a plain twisted.web.server.Site.

    python twisted_proxy.py --port P --service S --upstream-port U

Stock behaviour kept (HTTP/1.0-style `Connection: close` to the upstream, so
one new upstream connection per request); only the per-request logging is
off, as for every peer: no access log, and the per-connection
"Starting factory" lines of ProxyClientFactory are silenced. Runs with the
project's .venv (Twisted).
"""

import argparse
import sys

from twisted.internet import reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web import proxy, resource, server


class QuietSite(server.Site):
    def log(self, request):
        pass  # access log off


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--service", required=True)
    p.add_argument("--upstream-port", type=int, required=True)
    args = p.parse_args()
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    # getChild makes plain ReverseProxyResources, so the class attribute it is.
    proxy.ProxyClientFactory.noisy = False
    target = proxy.ReverseProxyResource("127.0.0.1", args.upstream_port, b"")
    root = resource.Resource()
    root.putChild(args.service.encode(), target)
    site = QuietSite(root)
    site.noisy = False
    reactor.listenTCP(args.port, site, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
