"""Garbage collection for a process that serves for months.

CPython's cycle collector walks every object in its oldest generation:
all of Twisted, Klein, pydantic, prometheus_client and what the gateway
built at startup. Under load, the objects of the requests in flight at each
young collection get promoted, which set off a walk of that whole heap
about twice a second: 7% of a gateway's CPU at 50 connections, and pauses
of up to 40 ms that were its p99 latency.

So once started, the gateway collects, then freezes what survives
(gc.freeze: ignored by every later collection), and lets the young
generation grow to YOUNG_THRESHOLD objects before a collection. Requests
make almost no cyclic garbage; what they make is still collected.

What a reload replaces was frozen too, and any cycle in it would never be
collected: a while after each reload (the old config's requests are over
by then), the heap is unfrozen, collected and frozen again, once. The
requests in flight at that moment are frozen with it; they are freed as
usual when they end, since they break their own reference cycles (over
80,000 requests the collector found fewer than 3,000 objects to collect),
so at most a handful of objects per reload stay behind.
"""

import gc

# Young objects between collections (CPython's default is 700).
YOUNG_THRESHOLD = 7000


class Heap:
    """Freezes the heap once the gateway is up, and again after a reload."""

    # Long enough for requests routed on the old config to be over.
    after_reload_s = 120.0

    def __init__(self, clock, collector=gc):
        self._clock = clock
        self._gc = collector
        self._refreeze = None

    def settle(self):
        """Startup is done: collect, freeze what is left, relax the young
        generation's threshold."""
        self._gc.collect()
        self._gc.freeze()
        _, middle, oldest = self._gc.get_threshold()
        self._gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)

    def reloaded(self):
        """A reload happened: refreeze once its leftovers are garbage."""
        if self._refreeze is not None and self._refreeze.active():
            self._refreeze.cancel()
        self._refreeze = self._clock.callLater(self.after_reload_s, self._again)

    def stop(self):
        if self._refreeze is not None and self._refreeze.active():
            self._refreeze.cancel()
        self._refreeze = None

    def _again(self):
        self._refreeze = None
        self._gc.unfreeze()
        self._gc.collect()
        self._gc.freeze()
