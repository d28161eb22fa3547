from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.logger import Logger

from apigw.breaker import CircuitBreaker, breaker_observer
from apigw.metrics import Metrics


def make(threshold=3, recovery_s=30):
    clock = Clock()
    transitions = []
    breaker = CircuitBreaker(
        failure_threshold=threshold,
        recovery_time_s=recovery_s,
        clock=clock,
        on_transition=lambda old, new: transitions.append((old, new)),
    )
    return breaker, clock, transitions


def open_breaker(breaker):
    for _ in range(breaker.failure_threshold):
        breaker.record_failure()
    assert breaker.state == "open"


def test_stays_closed_below_threshold():
    """When failures stay below the threshold, requests are still allowed."""
    breaker, _, transitions = make(threshold=3)
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "closed"
    assert breaker.allow_request()
    assert transitions == []


def test_opens_at_threshold_and_refuses():
    """When consecutive failures reach the threshold, it opens and refuses requests."""
    breaker, _, transitions = make(threshold=3)
    open_breaker(breaker)
    assert not breaker.allow_request()
    assert transitions == [("closed", "open")]


def test_success_resets_consecutive_count():
    """When a success comes between failures, the count starts over."""
    breaker, _, _ = make(threshold=3)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "closed"
    breaker.record_failure()
    assert breaker.state == "open"


def test_half_opens_after_recovery_time():
    """When the recovery time passes, the timer moves it to half_open, not earlier."""
    breaker, clock, transitions = make(recovery_s=30)
    open_breaker(breaker)
    clock.advance(29.9)
    assert breaker.state == "open"
    clock.advance(0.1)
    assert breaker.state == "half_open"
    assert transitions == [("closed", "open"), ("open", "half_open")]


def test_half_open_allows_exactly_one_probe():
    """When half_open, the first caller gets the probe and concurrent callers are refused."""
    breaker, clock, _ = make()
    open_breaker(breaker)
    clock.advance(30)
    assert [breaker.allow_request() for _ in range(4)] == [True, False, False, False]


def test_probe_success_closes():
    """When the probe succeeds, the breaker closes and allows everyone."""
    breaker, clock, transitions = make()
    open_breaker(breaker)
    clock.advance(30)
    assert breaker.allow_request()
    breaker.record_success()
    assert breaker.state == "closed"
    assert breaker.allow_request() and breaker.allow_request()
    assert transitions[-1] == ("half_open", "closed")


def test_probe_failure_reopens_with_new_timer():
    """When the probe fails, it opens again and half-opens after another full recovery time."""
    breaker, clock, transitions = make(recovery_s=30)
    open_breaker(breaker)
    clock.advance(30)
    assert breaker.allow_request()
    clock.advance(5)
    breaker.record_failure()
    assert breaker.state == "open"
    assert breaker.retry_after_s() == 30
    clock.advance(29)
    assert breaker.state == "open"
    clock.advance(1)
    assert breaker.state == "half_open"
    assert transitions == [
        ("closed", "open"), ("open", "half_open"), ("half_open", "open"), ("open", "half_open"),
    ]


def test_cancelled_probe_frees_the_slot():
    """When the probe is cancelled without a verdict, a new probe may go through."""
    breaker, clock, transitions = make()
    open_breaker(breaker)
    clock.advance(30)
    assert breaker.allow_request()
    assert not breaker.allow_request()
    breaker.record_cancelled()
    assert breaker.state == "half_open"
    assert breaker.allow_request()
    assert transitions == [("closed", "open"), ("open", "half_open")]


def test_cancelled_when_closed_is_not_a_failure():
    """When closed, a cancelled attempt does not count toward the threshold."""
    breaker, _, _ = make(threshold=1)
    breaker.record_cancelled()
    assert breaker.state == "closed"


def test_late_results_while_open_are_ignored():
    """When results of requests sent before opening arrive while open, the state and timer stay."""
    breaker, clock, transitions = make(recovery_s=30)
    open_breaker(breaker)
    clock.advance(10)
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == "open"
    assert breaker.retry_after_s() == 20
    assert transitions == [("closed", "open")]


def test_non_probe_results_in_half_open_are_ignored():
    """When half_open and no probe is out, a stray result neither closes nor reopens it."""
    breaker, clock, _ = make()
    open_breaker(breaker)
    clock.advance(30)
    breaker.record_success()
    assert breaker.state == "half_open"
    breaker.record_failure()
    assert breaker.state == "half_open"
    assert breaker.allow_request()


def test_each_transition_reported_once():
    """When many failures pile up after opening, the open transition is reported only once."""
    breaker, _, transitions = make(threshold=2)
    for _ in range(10):
        breaker.record_failure()
    assert transitions == [("closed", "open")]


def test_retry_after_counts_down_in_whole_seconds():
    """When open, retry_after_s is the ceiling of the time left, at least 1."""
    breaker, clock, _ = make(recovery_s=30)
    open_breaker(breaker)
    assert breaker.retry_after_s() == 30
    clock.advance(0.5)
    assert breaker.retry_after_s() == 30
    clock.advance(28.6)
    assert breaker.retry_after_s() == 1
    clock.advance(0.85)
    assert breaker.state == "open"
    assert breaker.retry_after_s() == 1


def test_stop_cancels_recovery_timer():
    """When stopped while open, no timer is left pending and it never half-opens."""
    breaker, clock, _ = make()
    open_breaker(breaker)
    assert len(clock.getDelayedCalls()) == 1
    breaker.stop()
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert breaker.state == "open"


def test_observer_error_does_not_break_the_machine():
    """When the transition hook raises, the state still changes and the error is logged."""
    clock = Clock()

    def broken(old, new):
        raise RuntimeError("boom")

    breaker = CircuitBreaker(1, 5, clock, on_transition=broken)
    events = []
    breaker.log = Logger(observer=events.append)
    breaker.record_failure()
    assert breaker.state == "open"
    clock.advance(5)
    assert breaker.state == "half_open"
    assert breaker.allow_request()
    failures = [e["log_failure"] for e in events if "log_failure" in e]
    assert [f.type for f in failures] == [RuntimeError, RuntimeError]


def test_observer_sets_gauge_and_logs_each_transition():
    """When hooked to metrics, the gauge follows the state (0/1/2) and each change logs once."""
    metrics = Metrics(CollectorRegistry())
    events = []
    log = Logger(observer=events.append)
    clock = Clock()
    breaker = CircuitBreaker(
        1, 10, clock, on_transition=breaker_observer(metrics, "svc", "http://127.0.0.1:1", log)
    )

    def gauge():
        return metrics.registry.get_sample_value(
            "gateway_circuit_breaker_state", {"service": "svc", "target": "http://127.0.0.1:1"}
        )

    assert gauge() == 0
    breaker.record_failure()
    assert gauge() == 1
    clock.advance(10)
    assert gauge() == 2
    breaker.allow_request()
    breaker.record_success()
    assert gauge() == 0
    states = [(e["old"], e["new"]) for e in events]
    assert states == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert all(e["service"] == "svc" for e in events)


def test_a_handful_of_failures_cannot_open_it_below_the_minimum_volume():
    """When fewer attempts than min_requests fail within the window, the breaker stays closed; with enough volume and failure ratio it opens."""
    clock = Clock()
    breaker = CircuitBreaker(5, 30, clock, min_requests=10, failure_ratio=0.5, window_s=10)
    for _ in range(5):
        breaker.record_failure()  # five slow requests of one client
    assert breaker.state == "closed"
    for _ in range(4):
        breaker.record_success()
    for _ in range(5):
        breaker.record_failure()
    # 14 attempts, 10 failed, the last 5 in a row.
    assert breaker.state == "open"


def test_old_attempts_leave_the_window():
    """When the volume was reached only by attempts older than the window, failures do not open the breaker."""
    clock = Clock()
    breaker = CircuitBreaker(2, 30, clock, min_requests=4, failure_ratio=0.5, window_s=10)
    for _ in range(3):
        breaker.record_success()
    clock.advance(11)
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "closed"  # 2 attempts in the window, below 4
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "open"


def test_a_low_failure_ratio_does_not_open_it():
    """When failures are a small share of the attempts in the window, consecutive failures alone do not open the breaker."""
    clock = Clock()
    breaker = CircuitBreaker(3, 30, clock, min_requests=5, failure_ratio=0.5, window_s=10)
    for _ in range(20):
        breaker.record_success()
    for _ in range(3):
        breaker.record_failure()
    assert breaker.state == "closed"  # 3 of 23
