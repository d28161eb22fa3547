"""Whether a client address falls inside a list of networks (admin_allow,
metrics_allow)."""

import ipaddress

from twisted.internet.address import UNIXAddress


def allowed(address, networks):
    """True for an address (a Twisted IAddress) inside one of `networks`; a
    UNIX socket is local by construction (its file mode guards it)."""
    if isinstance(address, UNIXAddress):
        return True
    host = getattr(address, "host", None)
    if host is None:
        return False
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == n.version and ip in n for n in networks)
