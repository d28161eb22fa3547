"""How an outage of a backing store (Redis, the key database) reaches the log."""


class OutageLog:
    """A warning when `what` stops answering, then at most one reminder per
    `remind_every_s` while it stays down, and one line when it is back.

    Reconnect loops try every second or two; a line per attempt would bury
    everything else in the log during a long outage.
    """

    def __init__(self, what, clock, log, consequence=None, remind_every_s=60.0):
        self.what = what
        self._clock = clock
        self._log = log
        self._consequence = consequence
        self._remind_every_s = remind_every_s
        self._down_since = None
        self._last_said = None

    @property
    def down(self):
        return self._down_since is not None

    def failed(self, why):
        now = self._clock.seconds()
        if self._down_since is None:
            self._down_since = self._last_said = now
            if self._consequence:
                self._log.warn("{what} is unreachable ({why}); {consequence};"
                               " reconnecting in the background",
                               what=self.what, why=why, consequence=self._consequence)
            else:
                self._log.warn("{what} is unreachable ({why}); reconnecting in the background",
                               what=self.what, why=why)
        elif now - self._last_said >= self._remind_every_s:
            self._last_said = now
            self._log.warn("{what} still unreachable after {down_s:.0f}s ({why})",
                           what=self.what, why=why, down_s=now - self._down_since)

    def recovered(self):
        if self._down_since is None:
            return
        down_s = self._clock.seconds() - self._down_since
        self._down_since = self._last_said = None
        self._log.info("{what} reachable again after {down_s:.0f}s", what=self.what, down_s=down_s)
