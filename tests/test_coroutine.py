"""apigw.coroutine.Run: a coroutine on Deferreds, as Deferred.fromCoroutine
would run it."""

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


def test_cancel_throws_cancelled_error_into_the_awaited_step():
    """When the run is cancelled while awaiting, the awaited Deferred is cancelled and the coroutine sees CancelledError."""
    waiting = defer.Deferred()

    async def body():
        try:
            await waiting
        except defer.CancelledError:
            return "cancelled"
        return "not cancelled"

    run, ended = _run(body())
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
