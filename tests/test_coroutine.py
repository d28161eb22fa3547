"""apigw.coroutine.Run: a coroutine on Deferreds, as Deferred.fromCoroutine
would run it."""

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from apigw.coroutine import Run


def _run(coroutine):
    ended = []
    run = Run(coroutine, ended.append)
    run.start()
    return run, ended


def test_values_of_awaited_deferreds_reach_the_coroutine_and_its_result_reaches_done():
    """When the awaited Deferreds fire, later or already, the coroutine gets their values, nested coroutines included, and done gets its return value once."""
    first, second = defer.Deferred(), defer.Deferred()

    async def inner():
        return await second + 1

    async def outer():
        a = await first
        b = await inner()
        c = await defer.succeed(100)
        return a + b + c

    run, ended = _run(outer())
    assert ended == []
    first.callback(10)
    assert ended == []
    second.callback(1)
    assert ended == [112]


def test_a_failed_deferred_raises_in_the_coroutine_and_an_uncaught_one_reaches_done():
    """When an awaited Deferred fails, the coroutine can catch the exception; one it does not catch reaches done as a Failure."""
    caught, uncaught = defer.Deferred(), defer.Deferred()

    async def body():
        try:
            await caught
        except KeyError:
            pass
        await uncaught

    run, ended = _run(body())
    caught.errback(KeyError("k"))
    assert ended == []
    uncaught.errback(ValueError("v"))
    [result] = ended
    assert isinstance(result, Failure) and result.check(ValueError)
    # Handed over, not left in the Deferred to be logged as unhandled.
    assert uncaught.result is None


@pytest.mark.parametrize("cancel_before_start", [False, True])
def test_cancel_throws_cancelled_error_into_the_awaited_step(cancel_before_start):
    """When the run is cancelled while awaiting, or before it awaits anything, the awaited Deferred is cancelled and the coroutine sees CancelledError."""
    waiting = defer.Deferred()

    async def body():
        try:
            await waiting
        except defer.CancelledError:
            return "cancelled"
        return "not cancelled"

    ended = []
    run = Run(body(), ended.append)
    if cancel_before_start:
        run.cancel()
    run.start()
    run.cancel()
    assert ended == ["cancelled"]
    assert waiting.called
    run.cancel()  # once ended, nothing left to cancel
    assert ended == ["cancelled"]


def test_an_exception_before_any_await_reaches_done_at_start():
    """When the coroutine raises before awaiting anything, done gets the Failure during start()."""
    async def body():
        raise RuntimeError("at once")

    run, ended = _run(body())
    [result] = ended
    assert result.check(RuntimeError)


def test_awaiting_something_else_than_a_deferred_ends_the_run_with_a_failure():
    """When the coroutine awaits an object the run cannot resume it from, done gets a Failure instead of the run hanging."""
    class Odd:
        def __await__(self):
            yield "not a Deferred"

    async def body():
        await Odd()

    run, ended = _run(body())
    [result] = ended
    assert isinstance(result, Failure)


def test_an_error_in_done_is_logged_not_raised_to_the_caller():
    """When done itself raises, start() returns normally and the error is logged."""
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)

    def done(result):
        raise RuntimeError("in done")

    async def body():
        return 1

    try:
        Run(body(), done).start()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert any(e.get("log_failure") and e["log_failure"].check(RuntimeError) for e in events)
