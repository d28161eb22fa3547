"""Which Redis is the master, as Redis Sentinel has it, kept current.

txredisapi has a Sentinel client, but it fits a limiter badly: each
discovery asks every sentinel once and, while they still name a master that
is down, waits up to 10 s (on the global reactor) for a better answer, so a
promotion made during that wait is only seen by the next attempt; and it only
looks again when a connection is lost, so a master that was demoted while
reachable (answering READONLY) is kept. Here every sentinel keeps two
connections: one subscribed to `+switch-master`, which a sentinel publishes
the moment it knows of a promotion, and one to ask `SENTINEL MASTER`, on
connect, on that message, when the master cannot be reached or answers
READONLY, and once a second in case a message was missed. The answer with
the highest config epoch wins: during a failover the sentinel that ran it
knows the new master before the others do.
"""

from twisted.internet import defer, endpoints, protocol
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from apigw.outage import OutageLog

log = Logger()


def client_endpoint(reactor, host, port, timeout_s=2):
    """A TCP endpoint; straight to the address when it is one.

    Sentinel names servers by address, and HostnameEndpoint takes 0.3 s to
    report a refused connection, which is what a dead master does until
    the failover.
    """
    if isIPAddress(host):
        return endpoints.TCP4ClientEndpoint(reactor, host, port, timeout=timeout_s)
    if isIPv6Address(host):
        return endpoints.TCP6ClientEndpoint(reactor, host, port, timeout=timeout_s)
    return endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout_s)


class MasterWatch:
    """`address` is the master's (host, port), or None until a sentinel says.

    `on_change(old, new)` is called when it changes; the first answer is a
    change from None.
    """

    poll_interval_s = 1.0
    # Refreshes asked for by failures (every refused connect, every READONLY)
    # are merged: at most one round of questions per this long.
    min_refresh_interval_s = 0.05

    def __init__(self, url, clock, reactor, on_change):
        self.url = url
        self.address = None
        self.epoch = -1
        self._clock = clock
        self._on_change = on_change
        self._asked_at = None
        self._loop = None
        self._waiting = []  # when_known() Deferreds
        self._links = [_SentinelLink(self, host, port, clock, reactor)
                       for host, port in url.sentinels]

    def describe_address(self):
        if self.address is None:
            return None
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def when_known(self):
        """Fires once a sentinel has named the master (at once if one has)."""
        if self.address is not None:
            return defer.succeed(self.address)
        d = defer.Deferred(lambda d: self._waiting.remove(d))
        self._waiting.append(d)
        return d

    def start(self):
        for link in self._links:
            link.start()
        self._loop = LoopingCall(self._poll)
        self._loop.clock = self._clock
        self._loop.start(self.poll_interval_s, now=False).addErrback(
            lambda f: log.failure("Sentinel poll loop stopped", f))

    def stop(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return defer.gatherResults([link.stop() for link in self._links], consumeErrors=True)

    def _poll(self):
        # A LoopingCall stops for good on an exception: nothing may escape.
        try:
            self.refresh(force=True)
        except Exception:
            log.failure("Sentinel poll")

    def refresh(self, force=False):
        """Ask every connected sentinel now (merged with a round just asked)."""
        now = self._clock.seconds()
        if not force and self._asked_at is not None \
                and now - self._asked_at < self.min_refresh_interval_s:
            return
        self._asked_at = now
        for link in self._links:
            link.ask()

    def answered(self, link, fields):
        """A sentinel's SENTINEL MASTER reply, as a dict of text."""
        try:
            address = (fields["ip"], int(fields["port"]))
            epoch = int(fields.get("config-epoch", 0))
        except (KeyError, ValueError):
            log.warn("Sentinel {sentinel} gave an answer without an address", sentinel=link)
            return
        # An older epoch is a sentinel that has not heard of the last
        # failover yet: it must not take us back to the old master.
        if epoch < self.epoch or (epoch == self.epoch and address == self.address):
            return
        old, self.address, self.epoch = self.address, address, epoch
        if old == address:
            return
        if old is None:
            log.info("Redis master {name!r} is at {address}, says Sentinel {sentinel}",
                     name=self.url.master_name, address=self.describe_address(),
                     sentinel=link)
        else:
            log.warn("Redis master {name!r} moved to {address} (config epoch {epoch}),"
                     " says Sentinel {sentinel}", name=self.url.master_name,
                     address=self.describe_address(), epoch=epoch, sentinel=link)
        self._on_change(old, address)
        self._waiting, waiting = [], self._waiting
        for d in waiting:
            d.callback(address)

    def switched(self, message):
        """A +switch-master message: `name old-ip old-port new-ip new-port`."""
        words = message.split()
        if len(words) == 5 and words[0] == self.url.master_name:
            self.refresh(force=True)


class _SentinelLink:
    """Two connections to one sentinel, each reconnecting by itself."""

    def __init__(self, watch, host, port, clock, reactor):
        self._watch = watch
        self.name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        endpoint = client_endpoint(reactor, host, port)
        # One line when a sentinel goes and comes back, whatever the others do.
        self.outage = OutageLog(
            f"Sentinel {self.name} (for Redis master {watch.url.master_name!r})", clock, log,
            consequence="the other sentinels are asked")
        self._commands = _Kept(endpoint, _command_protocol, clock, self._commands_up,
                               self.failed)
        self._events = _Kept(endpoint, lambda: _event_protocol(watch.switched), clock,
                             self._events_up)

    def __str__(self):
        return self.name

    def start(self):
        self._commands.start()
        self._events.start()

    def stop(self):
        return defer.gatherResults([self._commands.stop(), self._events.stop()],
                                   consumeErrors=True)

    def ask(self):
        """Ask for the master; False when not connected."""
        redis = self._commands.protocol
        if redis is None:
            return False
        d = redis.execute_command("SENTINEL", "MASTER", self._watch.url.master_name)
        d.addTimeout(2.0, self._commands.clock)
        d.addCallbacks(self._answer, self._no_answer)
        d.addErrback(lambda f: log.failure("Sentinel answer from {sentinel}", f, sentinel=self))
        return True

    def _answer(self, reply):
        if not isinstance(reply, list):
            self.failed(f"unexpected reply {reply!r:.80}")
            return
        fields = {_text(k): _text(v) for k, v in zip(reply[::2], reply[1::2])}
        self.outage.recovered()
        self._watch.answered(self, fields)

    def _no_answer(self, failure):
        if failure.check(defer.TimeoutError):
            # A sentinel that stopped answering: connect afresh.
            self._commands.drop()
        self.failed(failure.getErrorMessage())

    def failed(self, why):
        self.outage.failed(why)

    def _commands_up(self, redis):
        self.ask()

    def _events_up(self, redis):
        d = redis.subscribe("+switch-master")
        d.addErrback(lambda f: self.failed(f"SUBSCRIBE: {f.getErrorMessage()}"))
        # Switches made while this link was down are only in the answer.
        self.ask()


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _command_protocol():
    # txredisapi imports the global reactor: keep it out of module import.
    import txredisapi

    return txredisapi.RedisProtocol(convertNumbers=False)


def _event_protocol(on_switch):
    import txredisapi

    class Subscriber(txredisapi.SubscriberProtocol):
        def messageReceived(self, pattern, channel, message):
            on_switch(_text(message))

    return Subscriber(convertNumbers=False)


class _ProtocolFactory(protocol.Factory):
    noisy = False

    def __init__(self, make):
        self._make = make

    def buildProtocol(self, addr):
        p = self._make()
        p.factory = self
        return p


class _Kept:
    """One connection kept open: reconnects after a loss or a failed
    attempt, waiting 0.1 s and then longer up to 2 s, without a log line
    per attempt (the link's OutageLog speaks for them)."""

    initial_delay_s = 0.1
    max_delay_s = 2.0

    def __init__(self, endpoint, make_protocol, clock, on_up, on_down=None):
        self._endpoint = endpoint
        self._factory = _ProtocolFactory(make_protocol)
        self.clock = clock
        self._on_up = on_up
        self._on_down = on_down
        self.protocol = None
        self._pending = None  # the connect Deferred or the retry timer
        self._delay_s = self.initial_delay_s
        self._stopped = False

    def start(self):
        self._connect()

    def stop(self):
        self._stopped = True
        pending, self._pending = self._pending, None
        if isinstance(pending, defer.Deferred):
            pending.cancel()
        elif pending is not None and pending.active():
            pending.cancel()
        redis = self.protocol
        if redis is None:
            return defer.succeed(None)
        d = redis.whenDisconnected()
        redis.transport.loseConnection()
        return d

    def drop(self):
        if self.protocol is not None:
            self.protocol.transport.abortConnection()

    def _connect(self):
        self._pending = d = self._endpoint.connect(self._factory)
        d.addCallbacks(self._connected, self._failed)
        d.addErrback(lambda f: log.failure("Sentinel connection", f))

    def _connected(self, redis):
        self._pending = None
        if self._stopped:
            redis.transport.loseConnection()
            return
        self.protocol = redis
        self._delay_s = self.initial_delay_s
        redis.whenDisconnected().addCallback(self._lost)
        self._on_up(redis)

    def _lost(self, _):
        self.protocol = None
        if not self._stopped and self._on_down is not None:
            self._on_down("connection lost")
        self._retry()

    def _failed(self, failure):
        if self._stopped or failure.check(defer.CancelledError):
            return
        self._pending = None
        if self._on_down is not None:
            self._on_down(failure.getErrorMessage())
        self._retry()

    def _retry(self):
        if self._stopped:
            return
        self._pending = self.clock.callLater(self._delay_s, self._connect)
        self._delay_s = min(self.max_delay_s, self._delay_s * 2)
