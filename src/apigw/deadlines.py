"""Many deadlines, one timer.

A reactor timer per request (head deadline, idle keep-alive, a stalled
response body) costs a callLater and a cancel each time, and nearly all of
them are cancelled within the same millisecond. A Watchdog instead asks
each watched object, a few times a second, whether its deadline passed:
deadlines fire up to one `interval_s` late, which for limits counted in
seconds is nothing, and the hot path only records a timestamp.
"""

from twisted.logger import Logger

log = Logger()


class Watchdog:
    """Calls `item.check_deadline(now)` on every watched item each
    `interval_s` while anything is watched."""

    def __init__(self, clock, interval_s):
        self._clock = clock
        self.interval_s = interval_s
        self._items = set()
        self._call = None

    def watch(self, item):
        self._items.add(item)
        if self._call is None:
            self._call = self._clock.callLater(self.interval_s, self._tick)

    def forget(self, item):
        self._items.discard(item)

    def stop(self):
        self._items.clear()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _tick(self):
        self._call = None
        now = self._clock.seconds()
        for item in list(self._items):
            try:
                item.check_deadline(now)
            except Exception:
                # One broken item must not stop the others' deadlines.
                log.failure("deadline check of {item!r}", item=item)
        if self._items:
            self._call = self._clock.callLater(self.interval_s, self._tick)


class Timeouts:
    """Deferred.addTimeout for many Deferreds on one timer, on time.

    For deadlines that must fire when due (an upstream's time to answer,
    which the tests and the 504 promise to the second), not a tick late as
    the Watchdog's may: the one timer is set for the earliest deadline under
    way. As most Deferreds fire long before theirs, it is set again only
    when a new deadline comes before it, or when it fires, about once per
    timeout, instead of a callLater and a cancel per Deferred.

    `patient`: a deadline waits one more reactor turn before it cancels.
    The reactor runs due timers before it reads sockets, so after any stall
    longer than the timeout (a GC pause, a starved CPU) a plain timeout
    fires while the answer already sits unread in the socket; one turn more
    lets the next poll read it (the Redis limiter's round trip).
    """

    def __init__(self, clock, patient=False):
        self._clock = clock
        self._patient = patient
        # Deferred -> [deadline, timed out], while it has not fired.
        self._entries = {}
        self._timer = None
        self._timer_at = None

    def add(self, d, timeout_s, on_timeout):
        """Cancel `d` if it has not fired `timeout_s` from now; it then
        fails with what `on_timeout(failure, timeout_s)` returns, as
        addTimeout's onTimeoutCancel."""
        at = self._clock.seconds() + timeout_s
        entry = [at, False]
        self._entries[d] = entry
        if self._timer is None or at < self._timer_at:
            self._arm(at)
        d.addBoth(self._settled, d, entry, timeout_s, on_timeout)
        return d

    def restart(self, d, timeout_s):
        """`d`'s deadline counts `timeout_s` from now instead (what it
        waits on has only started now); nothing if it fired or expired."""
        entry = self._entries.get(d)
        if entry is not None and not entry[1]:
            entry[0] = self._clock.seconds() + timeout_s

    def _arm(self, at):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._clock.callLater(max(0.0, at - self._clock.seconds()), self._fire)

    def _fire(self):
        self._timer = None
        # The timer's own time counts as reached, whatever the rounding.
        now = max(self._clock.seconds(), self._timer_at)
        due = [(d, entry) for d, entry in self._entries.items() if entry[0] <= now]
        if due:
            if self._patient:
                self._clock.callLater(0, self._expire, due)
            else:
                self._expire(due)
        later = [entry[0] for entry in self._entries.values() if entry[0] > now]
        if later:
            self._arm(min(later))

    def _expire(self, due):
        for d, entry in due:
            if d in self._entries:  # else it fired meanwhile
                entry[1] = True
                d.cancel()

    def _settled(self, result, d, entry, timeout_s, on_timeout):
        self._entries.pop(d, None)
        if entry[1]:
            # Whatever cancelling made of it (a canceller may fail it with
            # its own error), as addTimeout does.
            return on_timeout(result, timeout_s)
        return result

    def stop(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
