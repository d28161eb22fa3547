"""The access log file: one JSON object per line, as json.dumps writes it."""

import json
import math
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from apigw.logs import ACCESS_FIELDS, AccessLog

_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.fixed_dictionaries({field: _VALUES for field in ACCESS_FIELDS}),
                min_size=1, max_size=5))
def test_each_record_is_the_line_json_dumps_makes(records):
    """When records of any values are written to the file, each is one line, byte for byte what json.dumps(separators=(",", ":")) makes of it."""
    # A fixed path: the log masks key-shaped text in it.
    records = [dict(record, path="/x") for record in records]
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/access.log"
        access = AccessLog(path)
        access.start()
        for record in records:
            access.record(record)
        access.stop()
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    assert lines.pop() == ""
    assert lines == [json.dumps(record, separators=(",", ":")) for record in records]
    for line, record in zip(lines, records):
        loaded = json.loads(line)
        assert list(loaded) == list(record)
        for field, value in record.items():
            if not (isinstance(value, float) and math.isnan(value)):
                assert loaded[field] == value


def test_lines_wait_for_the_flush_interval_or_a_full_batch_or_stop(tmp_path):
    """With a clock, records reach the file together flush_interval_s after the first, at once when max_pending pile up, and on stop()."""
    from twisted.internet import task

    clock = task.Clock()
    path = tmp_path / "access.log"
    access = AccessLog(str(path), clock)
    access.start()
    try:
        access.record({"path": "/a"})
        access.record({"path": "/b"})
        clock.advance(access.flush_interval_s * 0.99)
        assert path.read_text() == ""
        clock.advance(access.flush_interval_s * 0.01)
        assert path.read_text() == '{"path":"/a"}\n{"path":"/b"}\n'
        for n in range(access.max_pending):
            access.record({"n": n})
        assert len(path.read_text().splitlines()) == 2 + access.max_pending
        assert not clock.getDelayedCalls()
        access.record({"path": "/last"})
    finally:
        access.stop()
    assert path.read_text().endswith('{"path":"/last"}\n')
    assert not clock.getDelayedCalls()


_FLOATS = st.floats(allow_nan=True, allow_infinity=True)
_ACCOUNTED = st.fixed_dictionaries({
    "request_id": st.text(), "method": st.text(), "path": st.text(), "service": st.text(),
    "status": st.integers(), "latency_ms": _FLOATS, "upstream_latency_ms": st.none() | _FLOATS,
    "attempts": st.integers(), "client_ip": st.text(), "consumer": st.none() | st.text(),
    "bytes_sent": st.integers(), "bytes_received": st.integers(),
    "duration_ms": st.none() | _FLOATS, "error": st.none() | st.text(),
})


@settings(max_examples=500, deadline=None)
@given(_ACCOUNTED | st.fixed_dictionaries({field: _VALUES for field in ACCESS_FIELDS}))
def test_the_usual_records_template_writes_what_json_dumps_does(record):
    """Records shaped as Accounting makes them (any text, any int, any float including NaN and infinities, None where allowed) and records of any values come out as json.dumps writes them."""
    from apigw.logs import json_line

    assert json_line(record) == json.dumps(record, separators=(",", ":"))
    assert json_line(dict(reversed(record.items()))) == \
        json.dumps(dict(reversed(record.items())), separators=(",", ":"))


def test_an_accounted_record_takes_the_template():
    """A record of the usual shape is not handed to the encoder."""
    from unittest import mock

    from apigw import logs

    record = dict(zip(ACCESS_FIELDS, (
        "5f0c", "GET", "/bench/\u00e9\"", "bench", 200, 1.25, None, 1, "127.0.0.1", "bench",
        612, 0, None, "cut\nshort")))
    with mock.patch.object(logs, "_ENCODER") as encoder:
        line = logs.json_line(record)
    assert not encoder.encode.called
    assert line == json.dumps(record, separators=(",", ":"))
