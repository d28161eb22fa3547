"""Key changes reach every gateway's cache at once, not after its TTL.

With PostgreSQL, every transaction that changes a key ends in a NOTIFY
(apigw.keys), and each gateway process keeps one connection of its own
LISTENing: its socket is watched by the reactor like any other, so a
notification is read in the reactor turn it arrives in, and the key's cache
entry goes. (SQLite has no such channel; workers of one supervisor relay
to each other instead, see apigw.worker.)

While the channel is down the cache falls back to `auth_cache_ttl`; the log
says so once (apigw.outage) and /readyz lists it as degraded. Changes made
while nobody listened are unknown, so every (re)connection starts by
emptying the cache.
"""

import os

from twisted.internet import threads
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from apigw.keys import KEY_CHANGES_CHANNEL
from apigw.outage import OutageLog

RETRY_BASE_S = 0.5
RETRY_MAX_S = 5.0
# A peer that vanished without a FIN (a cut cable, a dead VM) is noticed by
# TCP keepalive in about idle + interval * count seconds.
_KEEPALIVE = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
              "keepalives_count": 3}


@implementer(IReadDescriptor)
class KeyChangeListener:
    """LISTENs on a dedicated PostgreSQL connection and calls
    `forget(key_id)` for each key changed anywhere, `forget_all()` on each
    (re)connection.

    Connecting blocks, so it runs in the reactor's thread pool; after that
    the connection is only touched from the reactor thread, when its socket
    is readable (psycopg2's poll() reads what arrived, never waits).
    """

    log = Logger()

    def __init__(self, database_url, reactor, forget, forget_all, describe_ttl,
                 store_ready=None):
        self._params = dict(database_url.params)
        self._where = database_url.describe()
        self._reactor = reactor
        self._forget = forget
        self._forget_all = forget_all
        # The consequence of an outage names the TTL in force at that time.
        self._describe_ttl = describe_ttl
        # While the key store itself is not ready, its own warning already
        # says the database is down: one line per outage, not two.
        self._store_ready = store_ready
        self._connection = None
        self._fd = -1
        self._connecting = None
        self._retry_call = None
        self._retry_delay_s = RETRY_BASE_S
        self._stopped = True
        self._outage = OutageLog(
            f"the key change channel (LISTEN on {self._where})", reactor, self.log,
            consequence="revoked keys are refused by this process only once their cache"
                        " entries expire")
        self.listening = False
        self._ever_listened = False

    @property
    def degraded(self):
        """None while listening; else a sentence for /readyz."""
        if self.listening:
            return None
        return ("the key change channel is down: revoked keys are refused only after"
                f" auth_cache_ttl ({self._describe_ttl()})")

    def start(self):
        self._stopped = False
        self._connect()

    def stop(self):
        self._stopped = True
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        self._disconnect()

    # -- connecting --------------------------------------------------------

    def _connect(self):
        self._retry_call = None
        params = dict(_KEEPALIVE)
        params.update(self._params)
        params.setdefault("connect_timeout", 5)
        params["application_name"] = "apigw-listen"
        d = threads.deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), _open_listening, params)
        self._connecting = d
        d.addCallbacks(self._connected, self._connect_failed)
        d.addErrback(lambda f: self.log.failure("key change listener", f))

    def _connected(self, connection):
        self._connecting = None
        if self._stopped:
            connection.close()
            return
        self._connection = connection
        # psycopg2 closes its socket by itself when the server goes away,
        # inside poll(), while the reactor still watches that number: the
        # reactor watches a duplicate of ours, closed only after removeReader.
        self._fd = os.dup(connection.fileno())
        self._reactor.addReader(self)
        self.listening = True
        self._retry_delay_s = RETRY_BASE_S
        self._outage.recovered()
        # Whatever changed before this moment was not heard.
        self._forget_all()
        if not self._ever_listened:
            self._ever_listened = True
            self.log.info("listening for key changes on {where}", where=self._where)
        # Notifications that came with the LISTEN's own answer.
        self.doRead()

    def _connect_failed(self, failure):
        self._connecting = None
        if self._stopped:
            return
        self._failed(_first_line(failure.value))
        self._retry_later()

    def _retry_later(self):
        if self._stopped:
            return
        delay_s, self._retry_delay_s = self._retry_delay_s, min(
            RETRY_MAX_S, self._retry_delay_s * 2)
        self._retry_call = self._reactor.callLater(delay_s, self._connect)

    def _disconnect(self):
        connection, self._connection = self._connection, None
        if connection is None:
            return
        self.listening = False
        self._reactor.removeReader(self)
        fd, self._fd = self._fd, -1
        os.close(fd)
        try:
            connection.close()
        except Exception:
            pass  # already broken: what we wanted anyway

    def _lost(self, why):
        self._disconnect()
        if self._stopped:
            return
        self._failed(why)
        self._retry_later()

    def _failed(self, why):
        if self._store_ready is None or self._store_ready():
            self._outage.failed(why)

    # -- IReadDescriptor -----------------------------------------------------

    def fileno(self):
        return self._fd

    def doRead(self):
        connection = self._connection
        if connection is None:
            return None
        try:
            connection.poll()
        except Exception as e:  # psycopg2.Error: the server or the network went
            self._lost(_first_line(e))
            return None
        notifies = connection.notifies
        while notifies:
            notify = notifies.pop(0)
            if notify.channel == KEY_CHANGES_CHANNEL:
                self._forget(notify.payload)
        return None

    def connectionLost(self, reason):
        # The reactor gave up on the descriptor (closed under it).
        if self._connection is not None:
            self._lost(_first_line(reason.value))

    def logPrefix(self):
        return "apigw key change listener"


def _open_listening(params):
    """In a pool thread: a connection that has run LISTEN."""
    import psycopg2

    connection = psycopg2.connect(**params)  # reactor-safe: a pool thread (see _connect)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f"LISTEN {KEY_CHANGES_CHANNEL}")
    except Exception:
        connection.close()
        raise
    return connection


def _first_line(error):
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
