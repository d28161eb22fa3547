"""GatewayService: wires the pieces into one service tree and runs it.

It builds the collaborators, hands them to the pipeline and the resources
that need them, swaps the routes on reload, and orders start and stop. It
is not on the request path: nothing there holds a reference to it.
"""

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger

from apigw.accounting import Accounting
from apigw.addresses import allowed
from apigw.admin import AdminAPI
from apigw.config import ConfigError, reload_config
from apigw.fdlimit import connection_cap, raise_open_files_limit
from apigw.forward import Forwarder, default_client
from apigw.keys import Authenticator, KeyStore, KeyStoreUnavailable
from apigw.listener import Listener
from apigw.logs import AccessLog
from apigw.metrics import Metrics, MetricsResource
from apigw.pipeline import Pipeline
from apigw.ratelimit import RateLimiting, make_limiter
from apigw.revocation import KeyChangeListener
from apigw.signals import SighupHandler, exit_zero_after_sigterm
from apigw.startup import log_startup
from apigw.traffic import TrafficHistory
from apigw.web import GatewayRoot, GatewaySite, Healthz, Readyz, ServiceRoute

log = Logger()


class GatewayService(MultiService):
    """Holds the live config and the parts that outlive a reload.

    A reload builds new routes and swaps them in one assignment: requests
    already routed keep the service config they started with.

    `client` (the upstream client), `clock` and `jitter` are for tests;
    `metrics` and `port`/`admin_port` endpoint objects for worker processes;
    `heap` (apigw.heap) for the processes that serve, not for tests sharing
    one Python process.
    """

    def __init__(self, config, port="tcp:8000", admin_port=None, access_log=None,
                 reactor=None, clock=None, metrics=None, client=None, jitter=None,
                 heap=None):
        super().__init__()
        self.heap = heap
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.metrics = metrics if metrics is not None else Metrics()
        self.access_log = AccessLog(access_log, self.clock)
        forwarder_options = {} if jitter is None else {"jitter": jitter}
        self.forwarder = Forwarder(
            client if client is not None else default_client(reactor),
            self.metrics, self.clock, debug=config.env.debug, **forwarder_options,
        )
        self.rate_limiting = RateLimiting(
            make_limiter(config, self.clock, reactor), self.metrics, self.clock
        )
        self.accounting = Accounting(self.metrics, self.access_log, self.clock)
        self.shutting_down = False
        self._sighup = SighupHandler(reactor, self._reload_quietly)
        self._port_description = port
        self._admin_port_description = admin_port
        # Nothing opens before startService: adbapi starts its threads there.
        self.key_store = KeyStore(config.env.database_url, reactor, clock=self.clock)
        self.authenticator = Authenticator(
            self.key_store, self.clock, config.settings.auth_cache_ttl_s
        )
        # PostgreSQL tells every process of every node about changed keys;
        # SQLite cannot, and falls back to the cache TTL (and, under
        # --workers, the supervisor's relay).
        self.key_changes = None
        if self.key_store.url.kind == "postgresql":
            self.key_changes = KeyChangeListener(
                self.key_store.url, reactor, self.authenticator.invalidate,
                self.authenticator.invalidate_all,
                describe_ttl=lambda: f"{self.authenticator.cache_ttl_s:g}s",
                store_ready=lambda: self.key_store.ready)
        self.pipeline = Pipeline(self.authenticator, self.rate_limiting, self.forwarder,
                                 self.accounting, self.metrics, self.clock)
        # Every client connection costs a file descriptor: take what the
        # hard limit allows, so the cap below stays under it.
        self._open_files = raise_open_files_limit()
        self.root = GatewayRoot()
        self.root.putChild(b"healthz", Healthz())
        self.root.putChild(b"readyz", Readyz(self.readiness, self._metrics_trusted,
                                             self.degraded, self.readiness_details))
        self.root.putChild(b"metrics", MetricsResource(self.metrics, self._metrics_trusted))
        self.traffic = TrafficHistory(self.metrics.registry, self.clock)
        self.admin = AdminAPI(
            self.key_store, self.authenticator, config.env.master_key,
            admin_allow=lambda: self.config.settings.admin_allow,
            service_names=lambda: self.config.services,
            reload=self._admin_reload, clock=self.clock,
            status=lambda: self.traffic.status(self.config), key_changed=self.key_changed,
        )
        self.sites = []
        self.config = None
        self.apply_config(config)
        self.admin_listener = None
        if admin_port is None:
            self.root.putChild(b"admin", self.admin.resource())
        else:
            # With --admin-port, /admin exists only there.
            admin_root = self.admin.root_resource()
            # Prometheus can scrape the admin listener, off the public one.
            admin_root.putChild(b"metrics",
                                MetricsResource(self.metrics, self._metrics_trusted))
            admin_site = self._site(admin_root)
            admin_site.listener_name = "admin"
            self.admin_listener = Listener(admin_port, admin_site, reactor)
            self.admin_listener.setServiceParent(self)
        self.site = self._site(self.root)
        self.site.fast_lane = True
        self.listener = Listener(port, self.site, reactor)
        self.listener.setServiceParent(self)

    def _site(self, resource):
        site = GatewaySite(resource, self.pipeline, self.clock, self._body_limit)
        site.configure(self.config.settings, self._connection_cap)
        self.sites.append(site)
        return site

    def _metrics_trusted(self, address):
        return allowed(address, self.config.settings.metrics_allow)

    def when_listening(self):
        """Fires with the listening port once startService has bound it."""
        return self.listener.when_listening()

    def when_admin_listening(self):
        """Like when_listening, for the --admin-port listener."""
        return self.admin_listener.when_listening()

    @property
    def in_flight(self):
        return self.accounting.in_flight

    # -- configuration ---------------------------------------------------

    def reload(self):
        """Re-read the config file (SIGHUP, POST /admin/reload).

        Returns the new service names, or raises ConfigError with the old
        config still in force. In-flight requests keep the service objects
        they were routed with; only new requests see the new config.
        """
        try:
            config = reload_config(self.config)
        except ConfigError as e:
            if self.counts_reloads:
                self.metrics.config_reloads.labels("error").inc()
            log.error("config reload failed, keeping the old config: {error}", error=str(e))
            raise
        self.apply_config(config)
        if self.heap is not None:
            self.heap.reloaded()
        if self.counts_reloads:
            self.metrics.config_reloads.labels("ok").inc()
        log.info("config reloaded: services {services}", services=", ".join(config.services))
        return sorted(config.services)

    # Set by worker processes (apigw.worker): an admin reload asks the
    # supervisor to reload the other workers too.
    reload_others = None
    # Every reload reaches every worker and their counts are summed: only
    # one worker counts them (apigw.worker).
    counts_reloads = True
    # Workers leave the startup summary to their supervisor.
    announce = True

    # Set by worker processes (apigw.worker): a key changed through this
    # worker's admin API is passed to the others by the supervisor.
    relay_key_change = None

    def key_changed(self, key_id):
        """A key changed through this process: forget it here, and have
        sibling workers forget it too (with PostgreSQL every process hears
        the database's notification as well; twice does no harm)."""
        self.authenticator.invalidate(key_id)
        if self.relay_key_change is not None:
            self.relay_key_change(key_id)

    def _admin_reload(self):
        names = self.reload()
        if self.reload_others is not None:
            self.reload_others()
        return names

    def _reload_quietly(self):
        try:
            self.reload()
        except ConfigError:
            pass  # logged and counted by reload()

    def apply_config(self, config):
        self.config = config
        self.authenticator.cache_ttl_s = config.settings.auth_cache_ttl_s
        # Keeps the breakers of targets the new config still has.
        self.forwarder.configure(config)
        self._body_limit = max(
            [config.settings.max_body_bytes]
            + [s.max_body_bytes for s in config.services.values()]
        )
        settings = config.settings
        self._connection_cap = connection_cap(settings.max_connections, self._open_files)
        for site in self.sites:
            site.body_limit = self._body_limit
            site.configure(settings, self._connection_cap)
        self.pipeline.send_timeout_s = settings.client_send_timeout_s
        previous = self.root.routes
        routes = {}
        for name, service in config.services.items():
            key = name.encode("ascii")
            old = previous.get(key)
            # An unchanged service keeps its route.
            unchanged = old is not None and old.service == service \
                and old.settings == config.settings
            routes[key] = old if unchanged else ServiceRoute(service, config.settings)
        self.root.routes = routes

    async def readiness(self):
        """Names of the parts that are down; empty when ready."""
        down = []
        if self.shutting_down:
            down.append("shutting down")
        try:
            await self.key_store.ping()
        except KeyStoreUnavailable:
            down.append("database")
        if self.rate_limiting.shared and not await self.rate_limiting.ping():
            down.append("redis")
        return down

    def degraded(self):
        """Sentences about what works, but worse than it should; /readyz
        shows them without failing readiness."""
        notes = []
        if self.key_changes is not None and self.key_changes.degraded:
            notes.append(self.key_changes.degraded)
        return notes

    def readiness_details(self):
        """What /readyz adds: the Redis master in use, when Sentinel names it."""
        limiter = self.rate_limiting.limiter
        if getattr(limiter, "watch", None) is None:
            return {}
        return {"redis_master": limiter.master}

    # -- lifecycle ---------------------------------------------------------

    def startService(self):
        self._sighup.install()
        self.access_log.start()
        self.metrics.start(self.clock)
        self.rate_limiting.start()
        self.key_store.start().addErrback(self._key_store_failed)
        self.traffic.start()
        if self.key_changes is not None:
            self.key_changes.start()
        super().startService()
        if self.announce:
            log_startup(self.config, self._port_description, self._admin_port_description,
                        workers=1)
        if self.heap is not None:
            self.heap.settle()

    def stopService(self):
        return defer.ensureDeferred(self._stop())

    async def _stop(self):
        self.shutting_down = True
        for site in self.sites:
            site.draining = True
        exit_zero_after_sigterm(self.reactor)
        self._sighup.uninstall()
        # Children first: this stops listening.
        await super().stopService()
        started = self.clock.seconds()
        grace_s = self.config.settings.shutdown_grace_s
        await self.accounting.drain(grace_s)
        # Responses just finished may still be in the sockets' buffers.
        await self._close_client_connections(
            max(1.0, grace_s - (self.clock.seconds() - started)))
        if self.pipeline.tunnels.open:
            # A WebSocket tunnel whose upstream has not closed yet: cut, and
            # its access record written before the log closes.
            self.pipeline.tunnels.close_all()
            await self.accounting.drain(1.0)
        self.pipeline.watchdog.stop()
        self.traffic.stop()
        for site in self.sites:
            site.watchdog.stop()
        try:
            await self.forwarder.close()
            await self.rate_limiting.stop()
            if self.key_changes is not None:
                self.key_changes.stop()
            await self.key_store.stop()
            self.access_log.stop()
        finally:
            # With workers, the last second's counts reach the shared files
            # however the rest went.
            try:
                self.metrics.stop()
            finally:
                if self.heap is not None:
                    self.heap.stop()

    def _close_client_connections(self, timeout_s):
        d = defer.gatherResults([site.close_connections() for site in self.sites],
                                consumeErrors=True)
        d.addTimeout(timeout_s, self.clock, onTimeoutCancel=lambda result, t: None)
        return d

    def _key_store_failed(self, failure):
        # Outages are retried inside the store; what arrives here is fatal
        # (a schema from a newer apigw), and serving on it would be a guess.
        log.critical("key store cannot start: {error}", error=failure.value)
        if self.reactor.running:
            self.reactor.stop()
