"""The access log: one structured record per request.

Without --access-log the records join twistd's own log through
twisted.logger. With a path (or `-` for stdout) each record is one line of
pure JSON in that file, so log shippers need no parsing.
"""

import json
import re
import sys
import time
from json.encoder import encode_basestring_ascii

from twisted.logger import Logger, LogLevel

from apigw.keys import KEY_MARK

ACCESS_FIELDS = (
    "request_id", "method", "path", "service", "status", "latency_ms",
    "upstream_latency_ms", "attempts", "client_ip", "consumer", "bytes_sent", "bytes_received",
    "duration_ms", "error",
)

_ENCODER = json.JSONEncoder(separators=(",", ":"))
_string = encode_basestring_ascii

# The line twistd's log shows, built here: formatting four nested fields
# ("{access[method]}"...) through twisted.logger costs three times as much.
_FORMAT = "{access_text}"

# An API key wherever a client put it (a query string, a path segment).
_KEY_SHAPED = re.compile(re.escape(KEY_MARK) + r"[A-Za-z0-9_-]{43,}")


# The usual record, as the encoder writes it: Accounting's fields in its
# order, strings escaped by json's own C function, numbers by their repr.
_LINE = ('{"request_id":%s,"method":%s,"path":%s,"service":%s,"status":%d,"latency_ms":%r,'
         '"upstream_latency_ms":%s,"attempts":%d,"client_ip":%s,"consumer":%s,"bytes_sent":%d,'
         '"bytes_received":%d,"duration_ms":%s,"error":%s}')
_FIELD_LIST = list(ACCESS_FIELDS)
# Finite floats only: the encoder writes NaN and Infinity its own way.
_HUGE = 1.8e308


def json_line(access):
    """`access` as _ENCODER.encode() writes it. The usual record (the
    fields of ACCESS_FIELDS in that order, of the types Accounting gives
    them) is filled into a template: half the encoder's time, which was 4%
    of a request's. Any other record goes through the encoder."""
    if list(access) != _FIELD_LIST:
        return _ENCODER.encode(access)
    (request_id, method, path, service, status, latency, upstream, attempts, client_ip,
     consumer, sent, received, duration, error) = access.values()
    if not (request_id.__class__ is str and method.__class__ is str
            and path.__class__ is str and service.__class__ is str
            and client_ip.__class__ is str and status.__class__ is int
            and attempts.__class__ is int and sent.__class__ is int
            and received.__class__ is int
            and latency.__class__ is float and -_HUGE < latency < _HUGE
            and (upstream is None or (upstream.__class__ is float and -_HUGE < upstream < _HUGE))
            and (duration is None or (duration.__class__ is float and -_HUGE < duration < _HUGE))
            and (consumer is None or consumer.__class__ is str)
            and (error is None or error.__class__ is str)):
        return _ENCODER.encode(access)
    return _LINE % (
        _string(request_id), _string(method), _string(path), _string(service), status, latency,
        "null" if upstream is None else repr(upstream), attempts, _string(client_ip),
        "null" if consumer is None else _string(consumer), sent, received,
        "null" if duration is None else repr(duration),
        "null" if error is None else _string(error))


def redact(text):
    """`text` with anything shaped like an API key masked."""
    if KEY_MARK not in text:
        return text
    return _KEY_SHAPED.sub(KEY_MARK + "<redacted>", text)


class AccessLog:
    """Access records: to twistd's log, or as JSON lines to a file.

    With a file and a clock, lines are written together at most
    `flush_interval_s` after the first of them (at once when `max_pending`
    pile up), not one write(2) per request: a write per reactor turn still
    cost 4 µs a request at 10 connections. stop() writes the rest; a
    process killed outright loses at most that interval's records.
    """

    flush_interval_s = 0.1
    # A burst this large is written at once rather than held.
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
            # The event Logger.info() would emit, without its check that
            # the level is a LogLevel (a walk over all of them, per record).
            log = self._log
            log.observer({
                "access": access,
                "access_text": "%s %s -> %s (%s ms)" % (
                    access.get("method"), access.get("path"), access.get("status"),
                    access.get("latency_ms")),
                "log_logger": log, "log_level": LogLevel.info, "log_namespace": log.namespace,
                "log_source": None, "log_format": _FORMAT, "log_time": time.time(),
            })
        else:
            self._write(access)

    def _write(self, access):
        if self._file is None:
            return
        self._pending.append(json_line(access))
        if self._clock is None or len(self._pending) >= self.max_pending:
            self._flush()
        elif self._flush_call is None:
            self._flush_call = self._clock.callLater(self.flush_interval_s, self._flush)

    def _flush(self):
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if self._pending and self._file is not None:
            lines, self._pending = self._pending, []
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()
