"""Circuit breaker per upstream target: a state machine on an injected clock.

No I/O here: callers ask `allow_request()` before contacting the target and
report each attempt's outcome. Metrics and logging hook in through
`on_transition` (see `breaker_observer`).
"""

import math
from collections import deque

from twisted.logger import Logger

from apigw.metrics import BREAKER_STATES

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class CircuitBreaker:
    """closed -> open after `failure_threshold` consecutive failures, once
    the last `window_s` seconds also held at least `min_requests` attempts
    of which at least `failure_ratio` failed (so a handful of slow requests
    cannot shut a target for everyone); a timer moves open -> half_open
    after `recovery_time_s`; half_open lets exactly one probe through, whose
    success closes and whose failure reopens."""

    log = Logger()

    def __init__(self, failure_threshold, recovery_time_s, clock, on_transition=None,
                 min_requests=1, failure_ratio=0.0, window_s=10.0):
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        # Public and mutable so a config reload can retune a breaker it keeps.
        self.failure_threshold = failure_threshold
        self.recovery_time_s = recovery_time_s
        self.min_requests = min_requests
        self.failure_ratio = failure_ratio
        self.window_s = window_s
        self._clock = clock
        self._on_transition = on_transition
        self.state = CLOSED
        self._failures = 0
        # While closed: (when, failed) of the attempts in the window, oldest
        # first, and how many of them failed.
        self._window = deque()
        self._window_failures = 0
        self._timer = None
        self._half_open_at = None
        self._probe_out = False

    def allow_request(self):
        """True when the caller may contact the target now.

        In half_open, True is handed out once; the caller then owes exactly
        one record_success/record_failure/record_cancelled.
        """
        if self.state == CLOSED:
            return True
        if self.state == HALF_OPEN and not self._probe_out:
            self._probe_out = True
            return True
        return False

    def record_success(self):
        if self.state == CLOSED:
            self._failures = 0
            self._count(False)
        elif self.state == HALF_OPEN and self._probe_out:
            self._probe_out = False
            self._failures = 0
            self._transition(CLOSED)
        # While open, a late answer to a request let through before opening
        # says little about the target now; the recovery timer decides.

    def record_failure(self):
        if self.state == CLOSED:
            self._failures += 1
            attempts = self._count(True)
            if self._failures >= self.failure_threshold and attempts >= self.min_requests \
                    and self._window_failures >= self.failure_ratio * attempts:
                self._open()
        elif self.state == HALF_OPEN and self._probe_out:
            self._probe_out = False
            self._open()

    def record_cancelled(self):
        """The attempt ended without a verdict (e.g. the client went away).

        Not a failure of the target; in half_open it frees the probe slot so
        the breaker does not stay shut waiting for a report that never comes.
        """
        if self.state == HALF_OPEN:
            self._probe_out = False

    def retry_after_s(self):
        """Whole seconds a refused client should wait (at least 1)."""
        if self.state == OPEN and self._half_open_at is not None:
            remaining = self._half_open_at - self._clock.seconds()
            return max(1, math.ceil(remaining))
        if self.state == HALF_OPEN:
            # The probe is in flight; its verdict comes within one timeout.
            return 1
        return 0

    def stop(self):
        """Cancel the pending recovery timer (service shutdown, target removed)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _count(self, failed):
        """Add an attempt to the window; returns how many it holds."""
        now = self._clock.seconds()
        window = self._window
        window.append((now, failed))
        self._window_failures += failed
        horizon = now - self.window_s
        while window[0][0] < horizon:
            self._window_failures -= window.popleft()[1]
        return len(window)

    def _open(self):
        self._failures = 0
        self._window.clear()
        self._window_failures = 0
        self.stop()
        self._half_open_at = self._clock.seconds() + self.recovery_time_s
        self._timer = self._clock.callLater(self.recovery_time_s, self._half_open)
        self._transition(OPEN)

    def _half_open(self):
        self._timer = None
        self._half_open_at = None
        self._probe_out = False
        self._transition(HALF_OPEN)

    def _transition(self, new):
        old, self.state = self.state, new
        if self._on_transition is None:
            return
        try:
            self._on_transition(old, new)
        except Exception:
            # An observer bug must not corrupt the state machine.
            self.log.failure("circuit breaker observer failed on {old} -> {new}", old=old, new=new)


def breaker_observer(metrics, service, target, log):
    """An on_transition hook: sets gateway_circuit_breaker_state{service,target}
    and logs each transition once. Sets the gauge to closed right away so the
    series exists before the first transition."""
    gauge = metrics.breaker_state.labels(service, target) if metrics is not None else None
    if gauge is not None:
        gauge.set(BREAKER_STATES[CLOSED])

    def on_transition(old, new):
        if gauge is not None:
            gauge.set(BREAKER_STATES[new])
        emit = log.warn if new == OPEN else log.info
        emit(
            "circuit breaker for {service} target {target}: {old} -> {new}",
            service=service, target=target, old=old, new=new,
        )

    return on_transition
