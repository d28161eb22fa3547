"""The key store on SQLite and PostgreSQL, and the cached authenticator."""

import glob
import sqlite3

import psycopg2
import pytest_twisted
from twisted.enterprise import adbapi
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from apigw.config import parse_database_url
from apigw.keys import (
    KEY_SHAPE, SCHEMA_VERSION, AuthFailure, Authenticator, KeyStore, KeyStoreUnavailable,
    SchemaTooNew, _QuietConnection, hash_key,
)
from keys_support import (  # noqa: F401 (fixtures)
    T0, clock, database_url, make_authenticator, pg_database, store,
)


async def failure_of(d):
    try:
        result = await d
    except Exception as e:
        return e
    raise AssertionError(f"expected a failure, got {result!r}")


def dump_database(url):
    """Every value of every column of every table, as text."""
    parsed = parse_database_url(url)
    if parsed.kind == "sqlite":
        conn = sqlite3.connect(parsed.path)
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        rows = {t: conn.execute(f'SELECT * FROM "{t}"').fetchall() for t in tables}
    else:
        conn = psycopg2.connect(**parsed.params)
        cur = conn.cursor()
        cur.execute("SELECT table_name FROM information_schema.tables"
                    " WHERE table_schema = 'public'")
        tables = [r[0] for r in cur.fetchall()]
        rows = {}
        for t in tables:
            cur.execute(f'SELECT * FROM "{t}"')
            rows[t] = cur.fetchall()
    conn.close()
    return "\n".join(f"{t}: {row!r}" for t, table_rows in rows.items() for row in table_rows)


# --- store --------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_create_list_get_revoke(store, clock):
    """When a key is created, listed, fetched and revoked, each view agrees."""
    record, raw = await store.create_key("alice", ["service1"], 3600, 7)
    assert KEY_SHAPE.match(raw)
    assert record.owner == "alice" and record.services == ("service1",)
    assert record.rate_limit == 7 and record.expires_at == T0 + 3600
    assert raw.startswith(record.prefix) and len(record.prefix) < len(raw) // 3

    clock.advance(1)
    other, _ = await store.create_key("bob")
    assert other.services is None and other.expires_at is None and other.rate_limit is None
    assert [r.id for r in await store.list_keys()] == [record.id, other.id]

    assert await store.get_key(record.id) == record
    assert await store.get_key("nope") is None
    assert await store.lookup_by_hash(hash_key(raw)) == record

    clock.advance(4)
    assert await store.revoke_key(record.id) is True
    assert await store.revoke_key(record.id) is True  # idempotent
    assert await store.revoke_key("nope") is False
    revoked = await store.get_key(record.id)
    assert revoked.revoked_at == T0 + 5 and not revoked.active_at(clock.seconds())
    assert (await store.get_key(other.id)).revoked_at is None


@pytest_twisted.ensureDeferred
async def test_keys_are_unique_and_long(store):
    """When many keys are made, each is distinct and carries at least 256 bits."""
    raws = [(await store.create_key("x"))[1] for _ in range(20)]
    assert len(set(raws)) == 20
    assert all(len(r) - len("agw_") >= 43 for r in raws)  # 43 base64 chars = 256 bits


@pytest_twisted.ensureDeferred
async def test_database_never_holds_the_raw_key(store, database_url, tmp_path):
    """When keys are stored, no column of any table (nor the SQLite files) holds a raw key."""
    raws = [(await store.create_key(f"owner{i}", ["a"], 60, 5))[1] for i in range(3)]
    dump = dump_database(database_url)
    assert hash_key(raws[0]) in dump  # the dump does see the rows
    for raw in raws:
        assert raw not in dump
        assert raw[len("agw_") + 8:] not in dump  # nor the secret part beyond the prefix
    if database_url.startswith("sqlite"):
        for path in glob.glob(f"{tmp_path}/keys.db*"):
            data = open(path, "rb").read()
            assert not any(raw.encode() in data for raw in raws), path


@pytest_twisted.ensureDeferred
async def test_keys_survive_a_restart(store, database_url, clock):
    """When the store is stopped and a new one opened on the same database, keys are there."""
    record, raw = await store.create_key("carol", ["service2"])
    await store.stop()
    again = KeyStore(database_url, reactor, clock=clock)
    await again.start()
    try:
        assert await again.lookup_by_hash(hash_key(raw)) == record
    finally:
        await again.stop()


@pytest_twisted.ensureDeferred
async def test_schema_version_is_recorded_and_newer_is_refused(store, database_url, clock):
    """When the schema is newer than this code knows, start() fails instead of guessing."""
    assert f"apigw_schema: (1, {SCHEMA_VERSION})" in dump_database(database_url)
    await store.stop()
    parsed = parse_database_url(database_url)
    if parsed.kind == "sqlite":
        conn = sqlite3.connect(parsed.path)
    else:
        conn = psycopg2.connect(**parsed.params)
    conn.cursor().execute("UPDATE apigw_schema SET version = 99")
    conn.commit()
    conn.close()
    newer = KeyStore(database_url, reactor, clock=clock)
    error = await failure_of(newer.start())
    await newer.stop()
    assert isinstance(error, SchemaTooNew)


@pytest_twisted.ensureDeferred
async def test_old_schema_is_migrated(tmp_path, clock):
    """When the database is at schema version 1, start() brings it to the current version."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    from apigw.keys import MIGRATIONS

    conn.execute("CREATE TABLE apigw_schema (id INTEGER PRIMARY KEY, version INTEGER)")
    conn.execute("INSERT INTO apigw_schema VALUES (1, 1)")
    for statement in MIGRATIONS[1]:
        conn.execute(statement)
    conn.commit()
    s = KeyStore(f"sqlite:///{path}", reactor, clock=clock)
    await s.start()
    await s.create_key("after-migration")
    await s.stop()
    assert conn.execute("SELECT version FROM apigw_schema").fetchone() == (SCHEMA_VERSION,)
    indexes = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")]
    assert "api_keys_created" in indexes
    conn.close()


@pytest_twisted.ensureDeferred
async def test_unreadable_sqlite_is_unavailable(tmp_path, clock):
    """When the SQLite file cannot be opened, calls fail with KeyStoreUnavailable, not a crash."""
    s = KeyStore(f"sqlite:///{tmp_path}/missing-dir/keys.db", reactor, clock=clock)
    await s.start()  # does not raise: the schema is retried in the background
    assert not s.ready
    assert isinstance(await failure_of(s.lookup_by_hash("0" * 64)), KeyStoreUnavailable)
    assert isinstance(await failure_of(s.ping()), KeyStoreUnavailable)
    await s.stop()


# --- the quiet connection over adbapi -----------------------------------------

def _sqlite_pool(tmp_path):
    # cp_reconnect off: a dead connection left in the pool fails the next
    # interaction instead of being replaced behind the test's back.
    pool = adbapi.ConnectionPool(
        "sqlite3", str(tmp_path / "q.db"), check_same_thread=False,
        cp_min=1, cp_max=1, cp_reconnect=False, cp_reactor=reactor, cp_noisy=False,
    )
    pool.connectionFactory = _QuietConnection
    pool.start()
    return pool


def _fail_after(statement, close=False):
    def interaction(txn):
        txn.execute(statement)
        if close:
            txn.connection.close()  # the DB-API connection under the cursor
        raise RuntimeError("the interaction fails")
    return interaction


@pytest_twisted.ensureDeferred
async def test_quiet_connection_rolls_back_the_connection_the_interaction_used(tmp_path):
    """When an interaction fails, its work is rolled back on its own connection,
    which the pool keeps."""
    pool = _sqlite_pool(tmp_path)
    try:
        await pool.runOperation("CREATE TABLE t (x INTEGER)")
        used = await pool.runInteraction(lambda txn: txn.connection)
        await failure_of(pool.runInteraction(_fail_after("INSERT INTO t VALUES (1)")))
        assert await pool.runQuery("SELECT count(*) FROM t") == [(0,)]
        assert await pool.runInteraction(lambda txn: txn.connection) is used
    finally:
        pool.close()


@pytest_twisted.ensureDeferred
async def test_quiet_connection_drops_a_dead_connection_without_a_traceback(tmp_path):
    """When the connection of a failed interaction cannot roll back, it is
    dropped with nothing logged, and the next interaction gets a new one."""
    pool = _sqlite_pool(tmp_path)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        dead = await pool.runInteraction(lambda txn: txn.connection)
        error = await failure_of(pool.runInteraction(_fail_after("SELECT 1", close=True)))
        assert isinstance(error, RuntimeError)  # the interaction's own error
        assert await pool.runQuery("SELECT 1") == [(1,)]
        assert await pool.runInteraction(lambda txn: txn.connection) is not dead
    finally:
        globalLogPublisher.removeObserver(events.append)
        pool.close()
    assert not [e for e in events if e.get("log_failure") or e.get("isError")]


# --- authenticator over a real store -------------------------------------------

@pytest_twisted.ensureDeferred
async def test_concurrent_lookups_of_a_fresh_key_share_one_query(store, clock):
    """When 200 requests bring the same uncached key at once, the database sees one lookup."""
    record, raw = await store.create_key("dave")
    auth, counting = make_authenticator(store, clock)
    results = await defer.gatherResults(
        [auth.authenticate(raw) for _ in range(200)], consumeErrors=True)
    assert counting.lookups == 1
    assert all(r == record for r in results)


@pytest_twisted.ensureDeferred
async def test_hot_key_costs_no_lookup_until_ttl(store, clock):
    """When a key is cached, it costs no lookup until cache_ttl passes, then one."""
    _, raw = await store.create_key("erin")
    auth, counting = make_authenticator(store, clock, cache_ttl_s=10)
    for _ in range(50):
        await auth.authenticate(raw)
    assert counting.lookups == 1
    clock.advance(9.9)
    await auth.authenticate(raw)
    assert counting.lookups == 1
    clock.advance(0.2)
    await auth.authenticate(raw)
    assert counting.lookups == 2


@pytest_twisted.ensureDeferred
async def test_unknown_keys_are_cached_briefly(store, clock):
    """When an unknown key repeats, it is looked up once per negative TTL."""
    auth, counting = make_authenticator(store, clock, negative_ttl_s=2)
    unknown = "agw_" + "A" * 43
    for _ in range(20):
        assert (await failure_of(auth.authenticate(unknown))).reason == "invalid"
    assert counting.lookups == 1
    clock.advance(2.5)
    await failure_of(auth.authenticate(unknown))
    assert counting.lookups == 2


@pytest_twisted.ensureDeferred
async def test_missing_and_malformed_keys_cost_nothing(store, clock):
    """When the key is absent or not shaped like ours, no lookup happens."""
    auth, counting = make_authenticator(store, clock)
    assert (await failure_of(auth.authenticate(None))).reason == "missing"
    assert (await failure_of(auth.authenticate(b""))).reason == "missing"
    for bad in (b"supersecret", "agw_short", b"\xff" * 50, "agw_" + "!" * 43):
        assert (await failure_of(auth.authenticate(bad))).reason == "invalid"
    assert counting.lookups == 0


@pytest_twisted.ensureDeferred
async def test_a_key_sent_as_bytes_or_text_is_one_cache_entry(store, clock):
    """When the same key comes as header bytes and as text, one lookup serves both, either way round."""
    for first, second in ((bytes, str), (str, bytes)):
        record, raw = await store.create_key("grace")
        auth, counting = make_authenticator(store, clock, cache_ttl_s=1000)
        forms = {bytes: raw.encode("ascii"), str: raw}
        assert (await auth.authenticate(forms[first])).id == record.id
        assert (await auth.authenticate(forms[second])).id == record.id
        assert counting.lookups == 1


@pytest_twisted.ensureDeferred
async def test_expiry_is_checked_on_every_cache_hit(store, clock):
    """When a cached key passes its expiry, the next request is refused as expired."""
    _, raw = await store.create_key("frank", expires_in_s=60)
    auth, counting = make_authenticator(store, clock, cache_ttl_s=1000)
    await auth.authenticate(raw)
    clock.advance(61)
    error = await failure_of(auth.authenticate(raw))
    assert isinstance(error, AuthFailure) and error.reason == "expired" and error.status == 401
    assert counting.lookups == 1


@pytest_twisted.ensureDeferred
async def test_revocation_takes_effect_at_once_with_invalidate(store, clock):
    """When a key is revoked and invalidated, the next request is refused as revoked."""
    record, raw = await store.create_key("grace")
    auth, _ = make_authenticator(store, clock, cache_ttl_s=1000)
    await auth.authenticate(raw)
    await store.revoke_key(record.id)
    auth.invalidate(record.id)
    assert (await failure_of(auth.authenticate(raw))).reason == "revoked"


@pytest_twisted.ensureDeferred
async def test_revocation_elsewhere_takes_effect_within_ttl(store, clock):
    """When another process revokes a key, this cache honours it once cache_ttl passes."""
    record, raw = await store.create_key("heidi")
    auth, _ = make_authenticator(store, clock, cache_ttl_s=10)
    await auth.authenticate(raw)
    await store.revoke_key(record.id)  # no invalidate: as if done by another process
    await auth.authenticate(raw)  # still cached
    clock.advance(10)
    assert (await failure_of(auth.authenticate(raw))).reason == "revoked"


@pytest_twisted.ensureDeferred
async def test_service_restriction(store, clock):
    """When a key names services, other services are forbidden (403), its own allowed."""
    record, raw = await store.create_key("ivan", ["service1"])
    auth, _ = make_authenticator(store, clock)
    assert await auth.authenticate(raw, "service1") == record
    error = await failure_of(auth.authenticate(raw, "service2"))
    assert error.reason == "forbidden" and error.status == 403


# --- authenticator over fake stores (failure paths) -----------------------------

class FakeStore:
    def __init__(self, records=None):
        self.records = dict(records or {})
        self.down = False
        self.lookups = 0
        self.pending = []

    def lookup_by_hash(self, key_hash):
        self.lookups += 1
        if self.down:
            return defer.fail(KeyStoreUnavailable("connection refused"))
        return defer.succeed(self.records.get(key_hash))


def fake_record(key_id="k1", owner="o"):
    from apigw.keys import KeyRecord

    return KeyRecord(id=key_id, owner=owner, prefix="agw_xxxxxxxx", services=None,
                     rate_limit=None, created_at=T0, expires_at=None, revoked_at=None)


RAW = "agw_" + "B" * 43


def test_stale_entry_serves_while_store_is_down():
    """When the database is down, a key whose cache entry went stale still works."""
    clock = Clock()
    store = FakeStore({hash_key(RAW): fake_record()})
    auth = Authenticator(store, clock, cache_ttl_s=10)
    assert auth.authenticate(RAW).result.owner == "o"
    store.down = True
    clock.advance(60)
    assert auth.authenticate(RAW).result.owner == "o"
    assert store.lookups == 2  # it did try the database


def test_uncached_key_while_store_is_down_is_unavailable():
    """When the database is down and the key is not cached, every waiter gets KeyStoreUnavailable."""
    store = FakeStore()
    store.down = True
    auth = Authenticator(store, Clock(), cache_ttl_s=10)
    failures = []
    for _ in range(3):
        auth.authenticate(RAW).addErrback(failures.append)
    assert len(failures) == 3
    assert all(f.check(KeyStoreUnavailable) for f in failures)


def test_coalesced_lookup_fans_out_to_every_waiter():
    """When many requests wait on one slow lookup, they all get its answer from one query."""
    pending = defer.Deferred()

    class SlowStore:
        lookups = 0

        def lookup_by_hash(self, key_hash):
            SlowStore.lookups += 1
            return pending

    auth = Authenticator(SlowStore(), Clock(), cache_ttl_s=10)
    ds = [auth.authenticate(RAW) for _ in range(200)]
    assert not any(d.called for d in ds)
    pending.callback(fake_record())
    assert SlowStore.lookups == 1
    assert all(d.result.id == "k1" for d in ds)


def test_cache_is_bounded_and_bad_keys_do_not_evict_good_ones():
    """When more keys arrive than max_entries, the oldest are evicted; unknown keys have their own room."""
    clock = Clock()
    raws = [f"agw_{i:043d}" for i in range(4)]
    store = FakeStore({hash_key(r): fake_record(str(i)) for i, r in enumerate(raws)})
    auth = Authenticator(store, clock, cache_ttl_s=100, max_entries=3)
    for r in raws[:3]:
        auth.authenticate(r)
    refused = []
    for i in range(10):  # a flood of unknown keys
        auth.authenticate(f"agw_{'Z' * 40}{i:03d}").addErrback(refused.append)
    assert len(refused) == 10
    lookups = store.lookups
    for r in raws[:3]:
        auth.authenticate(r)
    assert store.lookups == lookups  # still cached
    auth.authenticate(raws[3])  # evicts raws[0]
    auth.authenticate(raws[0])
    assert store.lookups == lookups + 2


def test_lookup_racing_a_revocation_is_not_cached():
    """When a lookup started before invalidate() returns the old row, that row is not cached."""
    pending = []

    class RacyStore:
        lookups = 0

        def lookup_by_hash(self, key_hash):
            RacyStore.lookups += 1
            d = defer.Deferred()
            pending.append(d)
            return d

    auth = Authenticator(RacyStore(), Clock(), cache_ttl_s=100)
    first = auth.authenticate(RAW)
    auth.invalidate("k1")
    pending[0].callback(fake_record())  # the pre-revocation row
    assert first.result.id == "k1"
    auth.authenticate(RAW)
    assert RacyStore.lookups == 2


@pytest_twisted.ensureDeferred
async def test_postgres_host_list_skips_a_dead_host_and_reconnects_to_the_primary(
    pg_database, clock
):
    """When DATABASE_URL lists a closed port before the primary, keys live on the primary, also after its connections are cut."""
    from keys_support import PG_SERVER, _admin_connection, _reset_pg
    from tests.ratelimit_support import free_port

    _reset_pg(pg_database)
    url = (f"postgresql://{PG_SERVER['user']}@127.0.0.1:{free_port()},"
           f"{PG_SERVER['host']}:{PG_SERVER['port']}/{pg_database}"
           "?target_session_attrs=read-write")
    store = KeyStore(url, reactor, clock=clock)
    await store.start()
    try:
        assert store.ready
        record, raw = await store.create_key("multi-host")
        ports = await store._pool.runQuery("SELECT inet_server_port()")
        assert ports == [(PG_SERVER["port"],)]
        # Several pooled connections, as under load.
        await defer.gatherResults([store._pool.runQuery("SELECT pg_sleep(0.05)")
                                   for _ in range(5)])
        # Every pooled connection cut: the next query goes down the list
        # again, past each dead connection.
        admin = _admin_connection()
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = %s AND pid <> pg_backend_pid()", (pg_database,))
        admin.close()
        assert (await store.lookup_by_hash(hash_key(raw))).id == record.id
    finally:
        await store.stop()
