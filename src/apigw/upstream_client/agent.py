"""An IAgent over the pool, for callers that have only a URI (the bench's
client micro-benchmark, the tests); the gateway itself hands the pool
parsed targets."""

from twisted.internet import defer
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgent
from zope.interface import implementer

from apigw.config import Target
from apigw.upstream_client.pool import ConnectionPool

__all__ = ["FastAgent"]

_DEFAULT_PORTS = {b"http": 80, b"https": 443}
_MAX_PREFIXES = 1024


@implementer(IAgent)
class FastAgent:
    """IAgent sending each request over a pooled keep-alive connection.

    Each distinct b"scheme://authority" is parsed once into a Target;
    spellings of one scheme, host and port give equal Targets, so they share
    connections.
    """

    def __init__(self, reactor, pool=None):
        self.pool = pool if pool is not None else ConnectionPool(reactor)
        self._targets = {}

    def target_for(self, prefix):
        """The Target for b"scheme://authority"."""
        target = self._targets.get(prefix)
        if target is None:
            target = _parse_prefix(prefix)
            if len(self._targets) >= _MAX_PREFIXES:
                self._targets.clear()
            self._targets[prefix] = target
        return target

    def request(self, method, uri, headers=None, bodyProducer=None):
        start = uri.find(b"://")
        slash = uri.find(b"/", start + 3) if start >= 0 else -1
        if slash < 0:
            prefix, path = uri, b"/"
            query = uri.find(b"?", start + 3) if start >= 0 else -1
            if query >= 0:
                prefix, path = uri[:query], b"/" + uri[query:]
        else:
            prefix, path = uri[:slash], uri[slash:]
        target = self._targets.get(prefix)
        if target is None:
            try:
                target = self.target_for(prefix)
            except Exception:
                return defer.fail()
        return self.pool.request(target, method, path, headers, bodyProducer)


def _parse_prefix(prefix):
    scheme, sep, authority = prefix.partition(b"://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS:
        raise SchemeNotSupported(f"Unsupported scheme: {scheme!r}")
    authority = authority.rpartition(b"@")[2]
    if authority.startswith(b"["):
        host, _, rest = authority[1:].partition(b"]")
        port = rest[1:] if rest.startswith(b":") else b""
    else:
        host, _, port = authority.partition(b":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"bad authority in {prefix!r}")
    port = int(port) if port else _DEFAULT_PORTS[scheme]
    bracketed = b"[" + host + b"]" if b":" in host else host
    host_header = bracketed if port == _DEFAULT_PORTS[scheme] else b"%b:%d" % (bracketed, port)
    return Target(
        url=(scheme + b"://" + host_header).decode("latin-1"),
        scheme=scheme, host=host, port=port, base_path=b"", host_header=host_header,
    )
