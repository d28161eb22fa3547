"""PostgreSQL outages against a private server this test starts, stops and
restarts itself (never the shared one)."""

import shutil
import subprocess
import tempfile

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from apigw.keys import AuthFailure, Authenticator, KeyStore, KeyStoreUnavailable
from bench.procs import BenchError, PrivatePostgres, pg_bin
from keys_support import real_sleep

pytestmark = pytest.mark.slow


@pytest.fixture
def private_pg():
    if pg_bin() is None:
        pytest.skip("no PostgreSQL server binaries (initdb) on this machine")
    workdir = tempfile.mkdtemp(prefix="apigw-pg-")
    try:
        pg = PrivatePostgres(workdir)
        pg.init()
        pg.start()
    except (BenchError, subprocess.SubprocessError, OSError, LookupError) as e:
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.skip(f"cannot start a private PostgreSQL here: {e}")
    try:
        yield pg
    finally:
        pg.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


async def failure_of(d):
    try:
        result = await d
    except Exception as e:
        return e
    raise AssertionError(f"expected a failure, got {result!r}")


@pytest_twisted.ensureDeferred
async def test_outage_cached_keys_work_uncached_get_unavailable_then_recovers(private_pg):
    """When Postgres stops, cached keys still pass and others are unavailable (never 401), with no traceback logged; when it returns, all work again."""
    from twisted.logger import globalLogPublisher

    store = KeyStore(private_pg.url, reactor, query_timeout_s=5)
    await store.start()
    clock = Clock()
    auth = Authenticator(store, clock, cache_ttl_s=10)
    failures = []

    def observe(event):
        # adbapi logs through the legacy API: isError, not log_failure.
        if "log_failure" in event or event.get("isError"):
            failures.append(event.get("log_format") or event.get("why"))

    globalLogPublisher.addObserver(observe)
    try:
        hot, hot_raw = await store.create_key("hot")
        cold, cold_raw = await store.create_key("cold")
        assert (await auth.authenticate(hot_raw)).id == hot.id

        private_pg.stop()
        clock.advance(60)  # the hot entry is stale now: a refresh is attempted and fails
        assert (await auth.authenticate(hot_raw)).id == hot.id
        error = await failure_of(auth.authenticate(cold_raw))
        assert isinstance(error, KeyStoreUnavailable) and not isinstance(error, AuthFailure)
        assert isinstance(await failure_of(store.create_key("during")), KeyStoreUnavailable)
        assert isinstance(await failure_of(store.ping()), KeyStoreUnavailable)
        assert not store.ready

        private_pg.start()
        # The same store, no intervention: its pool reconnects by itself.
        assert (await auth.authenticate(cold_raw)).id == cold.id
        assert store.ready
        clock.advance(60)
        assert (await auth.authenticate(hot_raw)).id == hot.id
        assert (await store.create_key("after"))[0].owner == "after"
        # An outage is one warning line, not adbapi's "Rollback failed"
        # traceback per dead connection.
        assert failures == []
    finally:
        globalLogPublisher.removeObserver(observe)
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_store_started_during_outage_heals_by_itself(private_pg):
    """When the gateway starts while Postgres is down, the schema is made once it comes back."""
    private_pg.stop()
    store = KeyStore(private_pg.url, reactor, query_timeout_s=5)
    await store.start()  # no exception: the process keeps serving
    try:
        assert not store.ready
        assert isinstance(await failure_of(store.lookup_by_hash("0" * 64)), KeyStoreUnavailable)
        private_pg.start()
        for _ in range(100):  # first retry is due after 1 s
            if store.ready:
                break
            await real_sleep(0.05)
        assert store.ready
        record, raw = await store.create_key("late")
        assert (await Authenticator(store, Clock(), 10).authenticate(raw)).id == record.id
    finally:
        await store.stop()
