"""The access log: one structured record per request.

Without --access-log the records join twistd's own log through
twisted.logger. With a path (or `-` for stdout) each record is one line of
pure JSON in that file, so log shippers need no parsing.
"""

import json
import re
import sys

from twisted.logger import Logger

from apigw.keys import KEY_MARK

ACCESS_FIELDS = (
    "request_id", "method", "path", "service", "status", "latency_ms",
    "upstream_latency_ms", "attempts", "client_ip", "consumer", "bytes_sent", "bytes_received",
    "duration_ms", "error",
)

_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _line_encoder():
    """A function encoding one access record exactly as _ENCODER.encode().

    encode() builds a new C encoder for every call (and a closure, and two
    Python calls around it), about a fifth of what a record costs to
    encode: the encoder is built once and kept instead. It is json.encoder's own
    C accelerator (c_make_encoder), called as JSONEncoder.iterencode()
    calls it; without it, or if it does not encode a probe record as
    _ENCODER does, records go through _ENCODER.encode() as before.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return _ENCODER.encode
    try:
        # No circular-reference check: records are flat.
        made = make(None, _ENCODER.default, json.encoder.encode_basestring_ascii, None,
                    _ENCODER.key_separator, _ENCODER.item_separator, False, False, True)
        probe = {"s": 'a"\\\u00e9\n\u2028', "i": -3, "f": 0.1, "big": 1e300, "n": None,
                 "t": True, "x": False, "l": [1, "2"]}
        if "".join(made(probe, 0)) != _ENCODER.encode(probe):
            return _ENCODER.encode
    except Exception:
        return _ENCODER.encode
    join = "".join

    def encode(access):
        return join(made(access, 0))

    return encode


_encode_line = _line_encoder()

_FORMAT = "{access[method]} {access[path]} -> {access[status]} ({access[latency_ms]} ms)"

# An API key wherever a client put it (a query string, a path segment).
_KEY_SHAPED = re.compile(re.escape(KEY_MARK) + r"[A-Za-z0-9_-]{43,}")


def redact(text):
    """`text` with anything shaped like an API key masked."""
    if KEY_MARK not in text:
        return text
    return _KEY_SHAPED.sub(KEY_MARK + "<redacted>", text)


class AccessLog:
    """Access records: to twistd's log, or as JSON lines to a file.

    With a file and a clock, the lines of one reactor turn go out in one
    write at the end of it, instead of one write(2) per request; the file
    is flushed before the turn's responses are even sent.
    """

    # A burst this large is written at once rather than held for the turn.
    max_pending = 256

    def __init__(self, destination=None, clock=None):
        self._destination = destination
        self._clock = clock
        self._file = None
        self._pending = []
        self._flush_call = None
        self._log = Logger(namespace="apigw.access")

    def start(self):
        if self._destination == "-":
            self._file = sys.stdout
        elif self._destination is not None:
            self._file = open(self._destination, "a", encoding="utf-8")

    def stop(self):
        self._flush()
        if self._file is not None and self._file is not sys.stdout:
            self._file.close()
        self._file = None

    def record(self, access):
        # The path is the client's: a key sent as ?api_key=... must not be
        # written down. The upstream still gets the URL as sent.
        path = access.get("path")
        if path and KEY_MARK in path:
            access = dict(access, path=redact(path))
        if self._destination is None:
            self._log.info(_FORMAT, access=access)
        else:
            self._write(access)

    def _write(self, access):
        if self._file is None:
            return
        self._pending.append(_encode_line(access))
        if self._clock is None or len(self._pending) >= self.max_pending:
            self._flush()
        elif self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self._flush)

    def _flush(self):
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if self._pending and self._file is not None:
            lines, self._pending = self._pending, []
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()
