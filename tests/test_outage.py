"""Outages of Redis and the key database: a warning, rare reminders, one line back."""

from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure

from apigw.outage import OutageLog
from apigw.ratelimit import _QuietRetries


def _logged():
    publisher = LogPublisher()
    events = EventLoggingObserver()
    publisher.addObserver(events)
    return Logger(observer=publisher), events


def test_outage_warns_once_then_reminds_at_most_every_60s():
    """When failures go on, there is one warning, then one reminder per 60 s, then one line when it is back."""
    clock = Clock()
    log, events = _logged()
    outage = OutageLog("Redis at h:6379/0", clock, log, consequence="limits follow the policy")
    for _ in range(130):  # a retry every half second for 65 s
        outage.failed("connection refused")
        clock.advance(0.5)
    assert [e["log_level"] for e in events] == [LogLevel.warn, LogLevel.warn]
    assert events[0]["consequence"] == "limits follow the policy"
    assert events[1]["down_s"] == 60
    outage.recovered()
    outage.recovered()
    assert len(events) == 3 and events[2]["log_level"] == LogLevel.info
    outage.failed("again")
    assert len(events) == 4 and events[3]["log_level"] == LogLevel.warn


class _FlakyEndpoint:
    """Refuses `failures` connects, then connects; counts attempts."""

    def __init__(self, failures):
        self.failures = failures
        self.attempts = 0
        self.pending = []

    def connect(self, factory):
        self.attempts += 1
        if self.attempts <= self.failures:
            return defer.fail(Failure(ConnectionRefusedError()))
        d = defer.Deferred()
        self.pending.append(d)
        return d


def test_quiet_retries_connect_once_it_can_and_report_the_outage_once():
    """When connects are refused, the endpoint retries with backoff, warns once, and fires once connected."""
    clock = Clock()
    log, events = _logged()
    outage = OutageLog("Redis", clock, log)
    inner = _FlakyEndpoint(failures=5)
    connected = _QuietRetries(inner, clock, outage).connect(object())
    for _ in range(20):
        clock.advance(2)
    assert inner.attempts == 6
    assert not connected.called
    protocol = object()
    inner.pending[0].callback(protocol)
    assert connected.result is protocol
    assert [e["log_level"] for e in events] == [LogLevel.warn, LogLevel.info]


def test_quiet_retries_stop_when_cancelled():
    """When the caller cancels (ClientService stopping), no further attempt is made."""
    clock = Clock()
    log, _ = _logged()
    inner = _FlakyEndpoint(failures=1000)
    connected = _QuietRetries(inner, clock, OutageLog("Redis", clock, log)).connect(object())
    clock.advance(1)
    connected.addErrback(lambda f: f.trap(defer.CancelledError))
    connected.cancel()
    attempts = inner.attempts
    clock.advance(60)
    assert inner.attempts == attempts
    assert not clock.getDelayedCalls()
