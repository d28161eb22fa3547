"""API keys: the store (all SQL lives here) and the cached authenticator.

A raw key is shown once, when it is made; the database keeps only its
SHA-256 hash and a short display prefix.
"""

import hashlib
import json
import re
import secrets
import uuid
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Optional, Tuple

import attr
from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from apigw.config import DatabaseURL, parse_database_url
from apigw.outage import OutageLog

KEY_MARK = "agw_"
# Malformed keys are refused without a database round trip.
KEY_SHAPE = re.compile(r"agw_[A-Za-z0-9_-]{43,128}\Z")
PREFIX_LEN = len(KEY_MARK) + 8
SCHEMA_VERSION = 3

# version -> statements taking the schema from version-1 to version.
MIGRATIONS = {
    1: (
        "CREATE TABLE IF NOT EXISTS api_keys ("
        " id TEXT PRIMARY KEY,"
        " key_hash TEXT NOT NULL UNIQUE,"
        " prefix TEXT NOT NULL,"
        " owner TEXT NOT NULL,"
        " services TEXT,"  # JSON list; NULL allows every service
        " rate_limit BIGINT,"  # NULL: the service's limit
        " created_at DOUBLE PRECISION NOT NULL,"
        " expires_at DOUBLE PRECISION,"
        " revoked_at DOUBLE PRECISION)",
    ),
    2: ("CREATE INDEX IF NOT EXISTS api_keys_created ON api_keys (created_at, id)",),
    # Sessions of the admin page ended by logout before their expiry
    # (apigw.admin_session); shared, like the keys, by every process.
    3: (
        "CREATE TABLE IF NOT EXISTS admin_sessions_ended ("
        " id TEXT PRIMARY KEY,"
        " expires_at DOUBLE PRECISION NOT NULL)",
    ),
}

_COLUMNS = "id, owner, prefix, services, rate_limit, created_at, expires_at, revoked_at"

# PostgreSQL NOTIFY channel: its payload is the id of a key that changed
# (revoked, or any later edit), for every gateway's cache to forget
# (apigw.revocation listens).
KEY_CHANGES_CHANNEL = "apigw_key_changes"


class _QuietConnection(adbapi.Connection):
    """adbapi's Connection, minus two logged tracebacks per dead connection.

    After a PostgreSQL restart the first query on each pooled connection
    fails, and the stock rollback logs "Rollback failed" and raises, which
    its caller logs again. That is an outage we already report once (and
    answer with 503); here the dead connection is just dropped, and the
    original error still reaches the caller.
    """

    def __init__(self, pool):
        # The pool passes itself to its connectionFactory; adbapi keeps it,
        # and the DB-API connection, under private names, so we keep ours.
        self.owner_pool = pool
        self.dbapi_connection = None
        super().__init__(pool)

    def reconnect(self):
        # Every (re)connection of the wrapper goes through here; right after
        # it, connect() in this pool thread returns the connection just made.
        super().reconnect()
        self.dbapi_connection = self.owner_pool.connect()

    def rollback(self):
        pool, connection = self.owner_pool, self.dbapi_connection
        try:
            connection.rollback()
            cursor = connection.cursor()
            cursor.execute(pool.good_sql)
            cursor.close()
            connection.commit()
        except Exception:
            pool.disconnect(connection)


class KeyStoreUnavailable(Exception):
    """The key database did not answer; never a reason to answer 401."""


class SchemaTooNew(Exception):
    """The database was migrated by a newer apigw than this one."""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class KeyRecord:
    id: str
    owner: str
    prefix: str
    services: Optional[Tuple[str, ...]]  # None: every service
    rate_limit: Optional[int]  # None: the service's limit
    created_at: float
    expires_at: Optional[float]
    revoked_at: Optional[float]

    def allows(self, service):
        return self.services is None or service in self.services

    def active_at(self, now):
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def to_json(self, now):
        """The public view: never the key or its hash."""
        return {
            "id": self.id,
            "owner": self.owner,
            "prefix": self.prefix,
            "services": list(self.services) if self.services is not None else None,
            "rate_limit": self.rate_limit,
            "created_at": isoformat(self.created_at),
            "expires_at": isoformat(self.expires_at),
            "revoked_at": isoformat(self.revoked_at),
            "active": self.active_at(now),
        }


def isoformat(ts):
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_raw_key():
    return KEY_MARK + secrets.token_urlsafe(32)  # 256 bits


def hash_key(raw_key):
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()


def _record(row):
    key_id, owner, prefix, services, rate_limit, created, expires, revoked = row
    return KeyRecord(
        id=key_id,
        owner=owner,
        prefix=prefix,
        services=tuple(json.loads(services)) if services is not None else None,
        rate_limit=int(rate_limit) if rate_limit is not None else None,
        created_at=float(created),
        expires_at=float(expires) if expires is not None else None,
        revoked_at=float(revoked) if revoked is not None else None,
    )


class KeyStore:
    """Keys in SQLite (embedded) or PostgreSQL through adbapi's thread pool.

    Nothing opens until start(); the pool reconnects by itself after an
    outage, and every database failure surfaces as KeyStoreUnavailable.
    """

    log = Logger()

    def __init__(self, database_url, reactor, clock=None, query_timeout_s=5.0):
        if isinstance(database_url, str):
            database_url = parse_database_url(database_url)
        self.url: DatabaseURL = database_url
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._query_timeout_s = query_timeout_s
        self._pool = None
        self._dbapi = None
        self._schema_ready = False
        self._retry_call = None
        self._retry_delay_s = 1.0
        self.available = None  # unknown until the first query
        self._outage = OutageLog(
            f"key store ({self.url.describe()})", self._clock, self.log,
            consequence="keys not in the cache get 503")

    # --- lifecycle ----------------------------------------------------------

    def start(self):
        """Open the pool and make sure the schema exists.

        Fires once the first attempt is over. If the database is down the
        attempt is repeated in the background, so a gateway started during
        an outage heals by itself; a schema newer than ours is fatal.
        """
        if self.url.kind == "sqlite":
            import sqlite3

            self._dbapi = sqlite3
            # One connection: SQLite serialises writers anyway, and a second
            # thread would only meet "database is locked".
            self._pool = adbapi.ConnectionPool(
                "sqlite3", self.url.path, timeout=5.0, check_same_thread=False,
                cp_min=1, cp_max=1, cp_reactor=self._reactor, cp_noisy=False,
                cp_openfun=_sqlite_open,
            )
        else:
            import psycopg2

            self._dbapi = psycopg2
            params = dict(self.url.params)
            params.setdefault("connect_timeout", 5)
            params.setdefault("application_name", "apigw")
            self._pool = adbapi.ConnectionPool(
                "psycopg2", cp_min=1, cp_max=5, cp_reconnect=True,
                cp_reactor=self._reactor, cp_noisy=False, **params,
            )
            self._pool.connectionFactory = _QuietConnection
        self._pool.start()
        return Deferred.fromCoroutine(self._ensure_schema())

    def stop(self):
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self.available = False
        return defer.succeed(None)

    async def _ensure_schema(self):
        try:
            version = await self._run(self._migrate)
        except KeyStoreUnavailable:
            # Said by _mark_down, which also reminds while it lasts.
            self._retry_call = self._clock.callLater(self._retry_delay_s, self._retry_schema)
            self._retry_delay_s = min(30.0, self._retry_delay_s * 2)
            return
        self._schema_ready = True
        self.log.info("key store ready ({kind}, schema version {version})",
                      kind=self.url.kind, version=version)

    def _retry_schema(self):
        self._retry_call = None
        if self._pool is None:
            return
        d = Deferred.fromCoroutine(self._ensure_schema())
        d.addErrback(lambda f: self.log.failure("key store: schema preparation failed", f))

    @property
    def ready(self):
        return self._schema_ready and bool(self.available)

    def _migrate(self, txn):
        postgres = self.url.kind == "postgresql"
        if postgres:
            # Serialises gateways migrating the same database at once.
            txn.execute("SELECT pg_advisory_xact_lock(7347109)")
        else:
            # The same for SQLite (workers of one gateway, started at once):
            # the write lock from the start, so the second waits and then
            # finds the schema made instead of inserting its version twice.
            txn.execute("BEGIN IMMEDIATE")
        txn.execute(
            "CREATE TABLE IF NOT EXISTS apigw_schema"
            " (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
        )
        txn.execute("SELECT version FROM apigw_schema WHERE id = 1")
        row = txn.fetchone()
        current = row[0] if row else 0
        if current > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the key database has schema version {current}; this apigw knows up to "
                f"{SCHEMA_VERSION}"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version]:
                txn.execute(statement)
        if row is None:
            txn.execute(self._sql("INSERT INTO apigw_schema (id, version) VALUES (1, ?)"),
                        (SCHEMA_VERSION,))
        elif current != SCHEMA_VERSION:
            txn.execute(self._sql("UPDATE apigw_schema SET version = ? WHERE id = 1"),
                        (SCHEMA_VERSION,))
        return SCHEMA_VERSION

    # --- plumbing -----------------------------------------------------------

    def _sql(self, statement):
        # Written with qmark placeholders; psycopg2 wants format style.
        return statement.replace("?", "%s") if self.url.kind == "postgresql" else statement

    async def _run(self, interaction, *args, retry=False):
        """Run one transaction in the pool; database trouble -> KeyStoreUnavailable.

        With retry, a read that meets a dead connection is tried again: after
        a database restart every pooled connection is dead, and each failed
        try drops one, so it may take one try per pooled connection (and one
        more) to reach a fresh one. A timeout or another error is tried once
        more, no more.
        """
        if self._pool is None:
            raise KeyStoreUnavailable("the key store is not started")
        attempts = self._pool.max + 1 if retry else 1
        other_failures = 0
        for attempt in range(attempts):
            d = self._pool.runInteraction(interaction, *args)
            d.addTimeout(self._query_timeout_s, self._reactor)
            try:
                result = await d
            except SchemaTooNew:
                raise
            except defer.TimeoutError:
                why = f"no answer within {self._query_timeout_s:g}s"
                other_failures += 1
                if other_failures == 2:
                    break
            except (adbapi.ConnectionLost, self._dbapi.OperationalError,
                    self._dbapi.InterfaceError) as e:
                why = _first_line(e)
            except self._dbapi.Error as e:
                self.log.failure("key store: unexpected database error")
                why = _first_line(e)
                other_failures += 1
                if other_failures == 2:
                    break
            else:
                self._mark_up()
                return result
        self._mark_down(why)
        raise KeyStoreUnavailable(why)

    # A line when it goes and comes back, reminders in between; not one
    # per failed request or retry.
    def _mark_down(self, why):
        self._outage.failed(why)
        self.available = False

    def _mark_up(self):
        self._outage.recovered()
        self.available = True

    # --- keys ---------------------------------------------------------------

    async def create_key(self, owner, services=None, expires_in_s=None, rate_limit=None):
        """Returns (KeyRecord, raw_key); the raw key is not kept anywhere."""
        raw_key = new_raw_key()
        now = self._clock.seconds()
        record = KeyRecord(
            id=uuid.uuid4().hex,
            owner=owner,
            prefix=raw_key[:PREFIX_LEN],
            services=tuple(services) if services is not None else None,
            rate_limit=rate_limit,
            created_at=now,
            expires_at=now + expires_in_s if expires_in_s is not None else None,
            revoked_at=None,
        )
        services_json = json.dumps(list(record.services)) if services is not None else None
        statement = self._sql(
            "INSERT INTO api_keys (id, key_hash, prefix, owner, services, rate_limit,"
            " created_at, expires_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)"
        )
        values = (record.id, hash_key(raw_key), record.prefix, owner, services_json,
                  rate_limit, record.created_at, record.expires_at)
        await self._run(lambda txn: txn.execute(statement, values))
        return record, raw_key

    async def list_keys(self):
        statement = f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, id"

        def interaction(txn):
            txn.execute(statement)
            return txn.fetchall()

        return [_record(row) for row in await self._run(interaction, retry=True)]

    async def get_key(self, key_id):
        return await self._one(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?", key_id)

    async def lookup_by_hash(self, key_hash):
        return await self._one(f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = ?", key_hash)

    async def _one(self, statement, value):
        statement = self._sql(statement)

        def interaction(txn):
            txn.execute(statement, (value,))
            return txn.fetchone()

        row = await self._run(interaction, retry=True)
        return _record(row) if row is not None else None

    async def revoke_key(self, key_id):
        """Soft delete. True if the key exists (revoking twice is fine)."""
        now = self._clock.seconds()
        update = self._sql(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
        exists = self._sql("SELECT 1 FROM api_keys WHERE id = ?")

        def interaction(txn):
            txn.execute(update, (now, key_id))
            txn.execute(exists, (key_id,))
            found = txn.fetchone() is not None
            if found:
                self._announce_change(txn, key_id)
            return found

        return await self._run(interaction)

    # --- sessions of the admin page ------------------------------------------

    async def end_session(self, session_id, expires_at):
        """Remember that a session ended before `expires_at`; rows of sessions
        that have expired by now are dropped on the way."""
        prune = self._sql("DELETE FROM admin_sessions_ended WHERE expires_at < ?")
        insert = self._sql("INSERT INTO admin_sessions_ended (id, expires_at) VALUES (?, ?)"
                           " ON CONFLICT (id) DO NOTHING")
        now = self._clock.seconds()

        def interaction(txn):
            txn.execute(prune, (now,))
            txn.execute(insert, (session_id, expires_at))

        await self._run(interaction)

    async def session_ended(self, session_id):
        statement = self._sql("SELECT 1 FROM admin_sessions_ended WHERE id = ?")

        def interaction(txn):
            txn.execute(statement, (session_id,))
            return txn.fetchone() is not None

        return await self._run(interaction, retry=True)

    def _announce_change(self, txn, key_id):
        """Every write that changes a key calls this in its transaction.

        PostgreSQL delivers the NOTIFY when (and only if) the transaction
        commits, to every listening gateway process on every node; SQLite
        has nothing like it, so there the caller relays (apigw.worker).
        """
        if self.url.kind == "postgresql":
            txn.execute("SELECT pg_notify(%s, %s)", (KEY_CHANGES_CHANNEL, key_id))

    async def ping(self):
        """Raises KeyStoreUnavailable unless the database answers (for /readyz)."""
        await self._run(lambda txn: txn.execute("SELECT 1"))
        if not self._schema_ready:
            raise KeyStoreUnavailable("the key schema is not ready yet")


def _sqlite_open(conn):
    # WAL lets readers (the admin API listing keys) run beside a writer.
    conn.execute("PRAGMA journal_mode=WAL")


def _first_line(error):
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# --- authentication ----------------------------------------------------------

class AuthFailure(Exception):
    """A 401 (missing, invalid, revoked, expired) or 403 (forbidden)."""

    MESSAGES = {
        "missing": "missing X-API-Key header",
        "invalid": "invalid API key",
        "revoked": "the API key has been revoked",
        "expired": "the API key has expired",
        "forbidden": "the API key is not allowed to use this service",
    }

    def __init__(self, reason):
        super().__init__(self.MESSAGES[reason])
        self.reason = reason
        self.message = self.MESSAGES[reason]
        self.status = 403 if reason == "forbidden" else 401


_MISS = object()


class Authenticator:
    """X-API-Key -> KeyRecord through a bounded in-process cache.

    A hot key costs no database round trip; a burst of requests with one
    uncached key costs one query; unknown keys are remembered briefly so a
    flood of bad keys does not reach the database; while the database is
    down, keys seen before keep working from their (stale) cache entries.
    """

    log = Logger()

    def __init__(self, store, clock, cache_ttl_s, negative_ttl_s=2.0, max_entries=10000):
        self._store = store
        self._clock = clock
        self.cache_ttl_s = cache_ttl_s
        self._negative_ttl_s = negative_ttl_s
        self._max_entries = max_entries
        # Two maps so a flood of bad keys cannot evict the good ones.
        self._known = OrderedDict()  # hash -> (KeyRecord, fetched_at)
        self._unknown = OrderedDict()  # hash -> fetched_at
        self._inflight = {}  # hash -> [waiting Deferreds]
        # Bumped by invalidate(): lookups that started before a revocation
        # may carry the old row and must not be cached.
        self._generation = 0

    def authenticate(self, raw_key, service=None):
        """Deferred[KeyRecord]; fails with AuthFailure or KeyStoreUnavailable."""
        return Deferred.fromCoroutine(self.check(raw_key, service))

    async def check(self, raw_key, service=None):
        """The KeyRecord for `raw_key`, or AuthFailure / KeyStoreUnavailable.

        A cached key is answered without suspending: the request path awaits
        this coroutine directly, with no Deferred of its own.
        """
        if not raw_key:
            raise AuthFailure("missing")
        # Only keys of the right shape are ever cached, so a hot key is found
        # by its hash alone, before it is decoded and matched again: the
        # hash of ASCII bytes as sent is hash_key() of their text.
        if isinstance(raw_key, bytes):
            key_hash = hashlib.sha256(raw_key).hexdigest()
        elif raw_key.isascii():
            key_hash = hash_key(raw_key)
        else:
            raise AuthFailure("invalid")  # no key has other characters
        now = self._clock.seconds()
        record = self._cached(key_hash, now)
        if record is not _MISS:
            return self._check(record, service, now)
        if isinstance(raw_key, bytes):
            try:
                raw_key = raw_key.decode("ascii")
            except UnicodeDecodeError:
                raise AuthFailure("invalid") from None
        if not KEY_SHAPE.match(raw_key):
            raise AuthFailure("invalid")
        record = await self._lookup(key_hash)
        return self._check(record, service, self._clock.seconds())

    def _check(self, record, service, now):
        if record is None:
            raise AuthFailure("invalid")
        if record.revoked_at is not None:
            raise AuthFailure("revoked")
        if record.expires_at is not None and record.expires_at <= now:
            raise AuthFailure("expired")
        if service is not None and not record.allows(service):
            raise AuthFailure("forbidden")
        return record

    def _cached(self, key_hash, now):
        entry = self._known.get(key_hash)
        if entry is not None and now - entry[1] < self.cache_ttl_s:
            self._known.move_to_end(key_hash)
            return entry[0]
        fetched_at = self._unknown.get(key_hash)
        if fetched_at is not None:
            if now - fetched_at < self._negative_ttl_s:
                return None
            del self._unknown[key_hash]
        return _MISS

    def _lookup(self, key_hash):
        waiter = Deferred()
        waiters = self._inflight.get(key_hash)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._inflight[key_hash] = [waiter]
        d = defer.ensureDeferred(self._store.lookup_by_hash(key_hash))
        d.addBoth(self._looked_up, key_hash, self._generation)
        return waiter

    def _looked_up(self, result, key_hash, generation):
        waiters = self._inflight.pop(key_hash, [])
        if isinstance(result, Failure):
            stale = self._known.get(key_hash)
            if stale is not None and generation == self._generation:
                result = stale[0]
            elif not result.check(KeyStoreUnavailable):
                self.log.failure("key lookup failed", result)
                result = Failure(KeyStoreUnavailable("key lookup failed"))
        else:
            if generation == self._generation:
                self._remember(key_hash, result)
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def _remember(self, key_hash, record):
        now = self._clock.seconds()
        if record is None:
            table, value = self._unknown, now
        else:
            table, value = self._known, (record, now)
        table[key_hash] = value
        table.move_to_end(key_hash)
        while len(table) > self._max_entries:
            table.popitem(last=False)

    def invalidate(self, key_id):
        """Forget a key now (after revoking it), so it is looked up afresh."""
        self._generation += 1
        for key_hash, (record, _) in list(self._known.items()):
            if record.id == key_id:
                del self._known[key_hash]

    def invalidate_all(self):
        """Forget every cached key: changes announced while nobody listened
        (the notification channel was down) are unknown, so all are suspect."""
        self._generation += 1
        self._known.clear()
        self._unknown.clear()
