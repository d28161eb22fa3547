"""The places where apigw leans on Twisted beyond its documented API.

Each function here names what it relies on; tests/test_twisted_compat.py
pins that behaviour, so a Twisted upgrade that changes it fails there, by
name, instead of somewhere in the request path.
"""

import signal


def start_response(request, code, phrase, header_lines, chunked):
    """Write a response's status line and headers, pre-encoded, on a
    twisted.web Request, leaving it as its own first write() would.

    `header_lines` is a list of b"Name: value\\r\\n" lines. Relies on
    http.Request's first write() being the only reader of `startedWriting`
    and on later writes framing the body by `chunked` (and finish() writing
    the last chunk): so the head of a proxied answer skips the Headers
    object twisted.web would build, fill and serialise again.
    """
    request.code = code
    request.code_message = phrase
    request.startedWriting = 1
    request.chunked = 1 if chunked else 0
    request.channel.writeSequence(
        [request.clientproto, b" %d " % code, phrase, b"\r\n", *header_lines, b"\r\n"]
    )


def clear_exit_signal(reactor, signum=signal.SIGTERM):
    """Forget that `signum` stopped the reactor, so twistd exits 0.

    twistd re-raises the signal that stopped the reactor (the reactor's
    private `_exitSignal`); there is no public way to say a shutdown went
    as planned.
    """
    if getattr(reactor, "_exitSignal", None) == signum:
        reactor._exitSignal = None
