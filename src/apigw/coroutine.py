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

from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class Run:
    """Drives `coroutine` from start(); calls `done(value or Failure)` once."""

    __slots__ = ("_coroutine", "_done", "_waiting", "_cancel_next")

    def __init__(self, coroutine, done):
        self._coroutine = coroutine
        self._done = done
        self._waiting = None
        # Cancelled while not awaiting (before start, or while running): the
        # next await is cancelled as soon as it is made.
        self._cancel_next = False

    def start(self):
        self._advance(None)

    def cancel(self):
        waiting = self._waiting
        if waiting is not None:
            waiting.cancel()
        elif self._coroutine is not None:
            self._cancel_next = True

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
        try:
            awaited.addBoth(self._resume)
        except Exception:
            # Not a Deferred: nothing would ever resume the coroutine.
            self._waiting = None
            self._coroutine.close()
            self._end(Failure())
            return
        if self._cancel_next and self._waiting is awaited:
            self._cancel_next = False
            awaited.cancel()

    def _resume(self, result):
        self._waiting = None
        self._advance(result)
        # The result went into the coroutine: the Deferred keeps none, so an
        # unhandled failure is not reported twice.
        return None

    def _end(self, result):
        self._coroutine = None
        done, self._done = self._done, None
        try:
            done(result)
        except Exception:
            # Kept here, as a Deferred would keep it: not the caller's
            # (a connection's dataReceived) to be dropped for.
            log.failure("after a request's journey")
