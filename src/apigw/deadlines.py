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
