"""Running a request's coroutine on Deferreds, with less bookkeeping.

Deferred.fromCoroutine wraps a coroutine in a Deferred and resumes it
through inlineCallbacks: a copy of the context, a status object and a
Deferred of its own per coroutine, and a context switch per resumption.
The request path starts one coroutine per request and resumes it a few
times, so that bookkeeping costs about as much as the stages themselves.

Run does the same job for a coroutine that awaits only Deferreds (or other
coroutines that do): it resumes the coroutine with each Deferred's result
or failure, hands the end result (a value or a Failure) to one callable,
and cancelling it cancels the Deferred being awaited, which throws
CancelledError into the coroutine as Deferred.fromCoroutine would.
"""

from twisted.python.failure import Failure


class Run:
    """Drives `coroutine` from start(); calls `done(value or Failure)` once."""

    __slots__ = ("_coroutine", "_done", "_waiting")

    def __init__(self, coroutine, done):
        self._coroutine = coroutine
        self._done = done
        self._waiting = None

    def start(self):
        self._advance(None)

    def cancel(self):
        waiting = self._waiting
        if waiting is not None:
            waiting.cancel()

    def _advance(self, result):
        try:
            if isinstance(result, Failure):
                # Raised where the Deferred was awaited (as inlineCallbacks
                # does: the Deferred cannot raise it itself from inside its
                # own callback).
                awaited = result.throwExceptionIntoGenerator(self._coroutine)
            else:
                awaited = self._coroutine.send(result)
        except StopIteration as end:
            self._end(end.value)
            return
        except BaseException:
            self._end(Failure())
            return
        # A Deferred that has not fired yet (awaiting one that has does not
        # yield at all).
        self._waiting = awaited
        awaited.addBoth(self._resume)

    def _resume(self, result):
        self._waiting = None
        self._advance(result)
        # The result went into the coroutine: the Deferred keeps none, so an
        # unhandled failure is not reported twice.
        return None

    def _end(self, result):
        self._coroutine = None
        done, self._done = self._done, None
        done(result)
