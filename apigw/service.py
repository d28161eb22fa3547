"""GatewayService: the one service tree twistd runs, and its start/stop order."""

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger

from apigw.admin import AdminAPI
from apigw.config import ConfigError, reload_config
from apigw.errors import GatewayError
from apigw.keys import Authenticator, AuthFailure, KeyStore, KeyStoreUnavailable
from apigw.logs import AccessLog
from apigw.metrics import Metrics, MetricsResource
from apigw.proxy import GatewayRoot, GatewaySite, Healthz, Readyz, ServiceResource
from apigw.ratelimit import RateLimiting, make_limiter
from apigw.signals import SighupHandler, exit_zero_after_sigterm
from apigw.upstream import Forwarder

log = Logger()

# RFC 9110 wants a challenge on every 401.
CHALLENGE = b'APIKey realm="apigw", header="X-API-Key"'


class GatewayService(MultiService):
    """Holds the live config and everything a request needs.

    A reload builds new per-service resources and swaps them in one
    assignment: requests already routed keep the objects they started with.
    """

    def __init__(self, config, port="tcp:8000", admin_port=None, access_log=None,
                 reactor=None, clock=None, metrics=None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.metrics = metrics if metrics is not None else Metrics()
        self.access_log = AccessLog(access_log)
        self.forwarder = Forwarder(reactor, self.metrics, clock=self.clock,
                                   debug=config.env.debug)
        self.rate_limiting = RateLimiting(
            make_limiter(config, self.clock, reactor), self.metrics, self.clock
        )
        self.shutting_down = False
        self._in_flight = 0
        self._drained = []
        self._sighup = SighupHandler(reactor, self._reload_quietly)
        self._port_description = port
        self._admin_port_description = admin_port
        self.config = None
        self.service_resources = {}
        # Nothing opens before startService: adbapi starts its threads there.
        self.key_store = KeyStore(config.env.database_url, reactor, clock=self.clock)
        self.authenticator = Authenticator(
            self.key_store, self.clock, config.settings.auth_cache_ttl_s
        )
        self.apply_config(config)
        self.root = GatewayRoot(self)
        self.root.putChild(b"healthz", Healthz())
        self.root.putChild(b"readyz", Readyz(self))
        self.root.putChild(b"metrics", MetricsResource(self.metrics))
        self.admin = AdminAPI(
            self.key_store, self.authenticator, config.env.master_key,
            admin_allow=lambda: self.config.settings.admin_allow,
            service_names=lambda: self.config.services,
            reload=self._admin_reload, clock=self.clock,
        )
        self.admin_listener = None
        if admin_port is None:
            self.root.putChild(b"admin", self.admin.resource())
        else:
            # SPEC section 1: with --admin-port, /admin exists only there.
            self.admin_site = GatewaySite(self.admin.root_resource(), self)
            self.admin_listener = _listener(admin_port, self.admin_site, reactor)
            self.admin_listener.setServiceParent(self)
        self.site = GatewaySite(self.root, self)
        self.listener = _listener(port, self.site, reactor)
        self.listener.setServiceParent(self)

    def when_listening(self):
        """Fires with the listening port once startService has bound it."""
        return self.listener._waitingForPort

    def when_admin_listening(self):
        """Like when_listening, for the --admin-port listener."""
        return self.admin_listener._waitingForPort

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
            self.metrics.config_reloads.labels("error").inc()
            log.error("config reload failed, keeping the old config: {error}", error=str(e))
            raise
        self.apply_config(config)
        self.metrics.config_reloads.labels("ok").inc()
        log.info("config reloaded: services {services}", services=", ".join(config.services))
        return sorted(config.services)

    # Set by worker processes (apigw.worker): an admin reload asks the
    # supervisor to reload the other workers too.
    reload_others = None

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
        previous = self.service_resources
        self.config = config
        self.authenticator.cache_ttl_s = config.settings.auth_cache_ttl_s
        # Keeps the breakers of targets the new config still has.
        self.forwarder.configure(config)
        self.body_limit = max(
            [config.settings.max_body_bytes]
            + [s.max_body_bytes for s in config.services.values()]
        )
        resources = {}
        for name, service in config.services.items():
            key = name.encode("ascii")
            old = previous.get(key)
            # An unchanged service keeps its resource (and what hangs off it).
            resources[key] = old if old is not None and old.service == service \
                else ServiceResource(self, service)
        self.service_resources = resources

    # -- request path hooks ------------------------------------------------

    async def authenticate(self, request, service):
        """The consumer for this request, or GatewayError 401/403/503."""
        if not service.auth:
            return None
        given = request.requestHeaders.getRawHeaders(b"x-api-key")
        try:
            return await self.authenticator.authenticate(
                given[0] if given else None, service.name
            )
        except AuthFailure as e:
            self.metrics.auth_failures.labels(e.reason).inc()
            if e.reason == "forbidden":
                raise GatewayError(403, f"the API key is not allowed to use {service.name}") \
                    from None
            raise GatewayError(401, e.message, headers=[(b"www-authenticate", CHALLENGE)]) \
                from None
        except KeyStoreUnavailable:
            # An outage is never the client's fault: 503, not 401.
            self.metrics.auth_failures.labels("unavailable").inc()
            raise GatewayError(503, "the key store is unavailable; try again shortly") \
                from None

    async def check_rate_limit(self, request, service, consumer):
        """Adds rate-limit headers to the request, or GatewayError 429/503."""
        return await self.rate_limiting.check(request, service, consumer, self.config.settings)

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

    # -- in-flight accounting ------------------------------------------------

    def in_flight_started(self, request):
        self._in_flight += 1
        self.metrics.in_flight.inc()

    def in_flight_finished(self, request):
        self._in_flight -= 1
        self.metrics.in_flight.dec()
        if self._in_flight == 0 and self._drained:
            waiters, self._drained = self._drained, []
            for d in waiters:
                d.callback(None)

    def _drain(self, grace_s):
        """Fires when no request is in flight, or after grace_s at the latest."""
        if self._in_flight == 0:
            return defer.succeed(None)
        d = defer.Deferred()
        self._drained.append(d)
        log.info("draining {n} in-flight requests (up to {grace}s)",
                 n=self._in_flight, grace=grace_s)
        d.addTimeout(grace_s, self.clock, onTimeoutCancel=self._drain_expired)
        return d

    def _close_client_connections(self, timeout_s):
        sites = [self.site] + ([self.admin_site] if self.admin_listener is not None else [])
        d = defer.gatherResults([site.close_connections() for site in sites], consumeErrors=True)
        d.addTimeout(timeout_s, self.clock, onTimeoutCancel=lambda result, t: None)
        return d

    def _drain_expired(self, result, grace_s):
        log.warn("shutdown grace of {grace}s over with {n} requests in flight",
                 grace=grace_s, n=self._in_flight)

    @property
    def in_flight(self):
        return self._in_flight

    # -- lifecycle ---------------------------------------------------------

    def startService(self):
        self._sighup.install()
        self.access_log.start()
        self.rate_limiting.start()
        self.key_store.start().addErrback(self._key_store_failed)
        super().startService()
        log.info(
            "apigw listening on {port} with services {services}",
            port=self._port_description,
            services=", ".join(self.config.services) or "(none)",
        )

    def stopService(self):
        return defer.ensureDeferred(self._stop())

    async def _stop(self):
        self.shutting_down = True
        exit_zero_after_sigterm(self.reactor)
        self._sighup.uninstall()
        # Children first: this stops listening.
        await super().stopService()
        started = self.clock.seconds()
        grace_s = self.config.settings.shutdown_grace_s
        await self._drain(grace_s)
        # Responses just finished may still be in the sockets' buffers.
        await self._close_client_connections(max(1.0, grace_s - (self.clock.seconds() - started)))
        await self.forwarder.close()
        await self.rate_limiting.stop()
        await self.key_store.stop()
        self.access_log.stop()

    def _key_store_failed(self, failure):
        # Outages are retried inside the store; what arrives here is fatal
        # (a schema from a newer apigw), and serving on it would be a guess.
        log.critical("key store cannot start: {error}", error=failure.value)
        if self.reactor.running:
            self.reactor.stop()


def _listener(port, factory, reactor):
    """A listening service for an endpoint description or endpoint object
    (worker processes pass endpoints adopting an inherited socket)."""
    if isinstance(port, str):
        return strports.service(port, factory, reactor=reactor)
    service = StreamServerEndpointService(port, factory)
    service._raiseSynchronously = True  # as strports.service does
    return service
