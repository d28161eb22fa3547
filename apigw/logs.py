"""The access log: one structured record per request through twisted.logger.

Without --access-log the records join twistd's own log. With a path (or
`-` for stdout) they go to a Logger of their own whose only observer writes
each record as one line of pure JSON, so log shippers need no parsing.
"""

import json
import re
import sys

from twisted.logger import Logger

from apigw.keys import KEY_MARK

ACCESS_FIELDS = (
    "request_id", "method", "path", "service", "status", "latency_ms",
    "upstream_latency_ms", "attempts", "client_ip", "consumer", "bytes_sent",
)

_FORMAT = "{access[method]} {access[path]} -> {access[status]} ({access[latency_ms]} ms)"

# An API key wherever a client put it (a query string, a path segment).
_KEY_SHAPED = re.compile(re.escape(KEY_MARK) + r"[A-Za-z0-9_-]{43,}")


def redact(text):
    """`text` with anything shaped like an API key masked (SPEC section 6)."""
    if KEY_MARK not in text:
        return text
    return _KEY_SHAPED.sub(KEY_MARK + "<redacted>", text)


class AccessLog:
    def __init__(self, destination=None):
        self._destination = destination
        self._file = None
        if destination is None:
            self._log = Logger(namespace="apigw.access")
        else:
            self._log = Logger(namespace="apigw.access", observer=self._write)

    def start(self):
        if self._destination == "-":
            self._file = sys.stdout
        elif self._destination is not None:
            # Line-buffered: a crash loses at most the line being written.
            self._file = open(self._destination, "a", buffering=1, encoding="utf-8")

    def stop(self):
        if self._file is not None and self._file is not sys.stdout:
            self._file.close()
        self._file = None

    def record(self, access):
        # The path is the client's: a key sent as ?api_key=... must not be
        # written down. The upstream still gets the URL as sent (SPEC 4).
        path = access.get("path")
        if path and KEY_MARK in path:
            access = dict(access, path=redact(path))
        self._log.info(_FORMAT, access=access)

    def _write(self, event):
        if self._file is not None:
            self._file.write(json.dumps(event["access"], separators=(",", ":")) + "\n")
