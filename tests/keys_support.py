"""Fixtures for the key store tests: SQLite files and a PostgreSQL database
of our own on the shared server, created for the session and dropped after."""

import contextlib
import secrets

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater

from apigw.keys import Authenticator, KeyStore

PG_SERVER = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
T0 = 1_700_000_000.0  # a plausible "now" for Clock-driven tests


def _admin_connection(dbname="postgres"):
    conn = psycopg2.connect(dbname=dbname, connect_timeout=3, **PG_SERVER)
    conn.autocommit = True
    return conn


@contextlib.contextmanager
def private_database(prefix="apigw_test_"):
    """A fresh database on the shared server, dropped afterwards; the test
    skips when the server does not answer."""
    try:
        conn = _admin_connection()
    except psycopg2.OperationalError as e:
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 is not reachable: {e}")
    name = prefix + secrets.token_hex(6)
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@pytest.fixture(scope="session")
def pg_database():
    """A fresh database on the shared server, dropped when the session ends."""
    with private_database() as name:
        yield name


def pg_url(dbname):
    return f"postgresql://{PG_SERVER['user']}@{PG_SERVER['host']}:{PG_SERVER['port']}/{dbname}"


def _reset_pg(dbname):
    conn = _admin_connection(dbname)
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS api_keys, admin_sessions_ended, apigw_schema")
    conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """Each store test runs on SQLite and on PostgreSQL, starting empty."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/keys.db"
    dbname = request.getfixturevalue("pg_database")
    _reset_pg(dbname)
    return pg_url(dbname)


@pytest.fixture
def clock():
    c = Clock()
    c.advance(T0)
    return c


@pytest_twisted.async_yield_fixture
async def store(database_url, clock):
    s = KeyStore(database_url, reactor, clock=clock)
    await s.start()
    assert s.ready
    yield s
    await s.stop()


class CountingStore:
    """Wraps a store and counts lookups that reach the database."""

    def __init__(self, store):
        self._store = store
        self.lookups = 0

    def lookup_by_hash(self, key_hash):
        self.lookups += 1
        return self._store.lookup_by_hash(key_hash)

    def __getattr__(self, name):
        return getattr(self._store, name)


def make_authenticator(store, clock, cache_ttl_s=10.0, **kwargs):
    counting = CountingStore(store)
    return Authenticator(counting, clock, cache_ttl_s, **kwargs), counting


async def real_sleep(seconds):
    await deferLater(reactor, seconds, lambda: None)
