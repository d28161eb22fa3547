"""JSON errors and request IDs: one shape for every error the gateway makes."""

import json
import random
import re

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

_SAFE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}\Z")


class GatewayError(Exception):
    """Raised on the request path to answer with a JSON error."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = tuple(headers)


# Version 4 and RFC 4122 variant bits of a UUID, as an int mask.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


# Statuses twisted.web has no phrase for ("429 Unknown Status" otherwise).
_PHRASES = {429: b"Too Many Requests", 431: b"Request Header Fields Too Large"}


def new_request_id(getrandbits=random.getrandbits):
    """A UUID4 in hex. Correlation IDs need uniqueness, not secrecy, so the
    fast PRNG serves; uuid.uuid4() costs a getrandom syscall per request."""
    return "%032x" % ((getrandbits(128) & _UUID4_CLEAR) | _UUID4_SET)


def request_id_for(request):
    """Keep an incoming X-Request-ID only when it is short and plain."""
    incoming = request.requestHeaders.getRawHeaders(b"x-request-id")
    if incoming and _SAFE_REQUEST_ID.match(incoming[0]):
        return incoming[0].decode("ascii")
    return new_request_id()


def error_body(message, request_id):
    return json.dumps({"error": message, "request_id": request_id}).encode("utf-8")


def error_response(request, status, message, headers=(), request_id=None):
    """Write a JSON error and finish the request; returns the body bytes.

    Safe to call after the client went away: nothing is written then.
    """
    if request_id is None:
        request_id = getattr(request, "request_id", None) or request_id_for(request)
    body = error_body(message, request_id)
    if getattr(request, "client_gone", False) or request.finished:
        return body
    request.setResponseCode(status, _PHRASES.get(status))
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"x-request-id", [request_id.encode("ascii")])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    for name, value in headers:
        request.responseHeaders.setRawHeaders(name, [value])
    request.write(body)
    request.finish()
    return body


class GetOnly(Resource):
    """GET-only leaf whose other methods get the gateway's JSON 405, not
    twisted.web's HTML page."""

    isLeaf = True

    def render(self, request):
        if request.method in (b"GET", b"HEAD"):
            return super().render(request)
        error_response(request, 405, "only GET is allowed here",
                       headers=[(b"allow", b"GET, HEAD")])
        return NOT_DONE_YET
