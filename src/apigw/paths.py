"""The upstream path for a request, and the checks that keep it inside its
service.

Routing is by the first raw path segment. Everything after it, query
included, is forwarded byte for byte: twisted.web's postpath is decoded per
segment (so %2F would be lost), hence the raw request URI is used.
"""

import re
from urllib.parse import unquote_to_bytes

from apigw.errors import GatewayError

_CONTROL_BYTES = re.compile(rb"[\x00-\x20\x7f]")


def forwarded_path(uri, service):
    """The upstream path and query for a raw request URI, or GatewayError 400.

    Dot-segments (plain or %2e-encoded, and with %2f or backslash as
    separators, since upstreams may decode those) that would climb above the
    service's root are refused: the request could otherwise reach another
    route of the upstream or of the gateway.
    """
    if _CONTROL_BYTES.search(uri):
        # twisted.web lets DEL (0x7f) through; no upstream request line may
        # carry it, and neither may our log lines.
        raise GatewayError(400, "the request target contains control characters")
    path, sep, query = uri.partition(b"?")
    # path is b"/<raw service segment>[/rest]"
    slash = path.find(b"/", 1)
    rest = b"" if slash == -1 else path[slash:]
    if not _stays_inside(rest):
        raise GatewayError(400, "the path climbs out of the service with dot-segments")
    if service.strip_prefix:
        upstream = rest or b"/"
    else:
        upstream = b"/" + service.name.encode("ascii") + rest
    return upstream + sep + query


# Spellings of "." and "/" that some upstream decodes to them: overlong
# UTF-8 (Java's old decoders, some proxies) and full-width forms (servers
# that normalise Unicode, NFKC).
_DOT_LOOKALIKES = (b"\xc0\xae", b"\xe0\x80\xae", b"\xef\xbc\x8e")
_SLASH_LOOKALIKES = (b"\xc0\xaf", b"\xe0\x80\xaf", b"\xef\xbc\x8f", b"\\")


def _stays_inside(rest):
    # find(), not `in`: CPython 3.11's bytes `in` bytes raises and clears a
    # TypeError inside (it tries an int first), on every request.
    if rest.find(b".") < 0 and rest.find(b"%") < 0 and rest.find(b";") < 0:
        return True
    # Decoded until stable: an upstream that decodes once more must not
    # find a dot-segment we missed (%252e%252e).
    decoded = rest
    for _ in range(3):
        again = unquote_to_bytes(decoded)
        if again == decoded:
            break
        decoded = again
    if b"\x00" in decoded:
        # No path needs a NUL; C-based upstreams end the string there
        # ("..%00" is "..").
        return False
    for lookalike in _DOT_LOOKALIKES:
        decoded = decoded.replace(lookalike, b".")
    for lookalike in _SLASH_LOOKALIKES:
        decoded = decoded.replace(lookalike, b"/")
    depth = 0
    for segment in decoded.split(b"/"):
        # Path parameters: Tomcat and Jetty read "..;x" as "..".
        segment = segment.split(b";", 1)[0]
        if segment == b"..":
            depth -= 1
            if depth < 0:
                return False
        elif segment not in (b"", b"."):
            depth += 1
    return True
