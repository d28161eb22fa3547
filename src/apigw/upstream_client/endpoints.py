"""Where a target's connections come from: scheme, host and port to an
endpoint, TLS included."""

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.error import SchemeNotSupported

__all__ = ["EndpointMaker"]


class EndpointMaker:
    """Called as `maker(scheme, host, port)`; the TLS policy (browser-like
    verification unless given) is made on first use."""

    def __init__(self, reactor, tls_policy=None):
        self._reactor = reactor
        self._tls_policy = tls_policy

    def __call__(self, scheme, host, port):
        if scheme != b"http" and scheme != b"https":
            raise SchemeNotSupported(f"Unsupported scheme: {scheme!r}")
        # An IP literal needs no resolution and no Happy Eyeballs: with
        # HostnameEndpoint a refused connect was only reported after its
        # 0.3 s attempt delay, on every attempt to a dead target.
        text = host.decode("ascii")
        if isIPAddress(text):
            endpoint = TCP4ClientEndpoint(self._reactor, text, port)
        elif isIPv6Address(text):
            endpoint = TCP6ClientEndpoint(self._reactor, text, port)
        else:
            endpoint = HostnameEndpoint(self._reactor, host, port)
        if scheme == b"https":
            if self._tls_policy is None:
                self._tls_policy = BrowserLikePolicyForHTTPS()
            endpoint = wrapClientTLS(self._tls_policy.creatorForNetloc(host, port), endpoint)
        return endpoint
