"""Round-robin over a service's targets, skipping those whose breaker is open.

Breakers live in a BreakerRegistry keyed by (service, url) so that a config
reload which keeps a target keeps its breaker: an upstream that was failing
before SIGHUP is still known to be failing after it.
"""

from twisted.logger import Logger

from apigw.breaker import CircuitBreaker, breaker_observer


class Balancer:
    """One service's targets in turn; `make_breaker(target)` supplies breakers."""

    def __init__(self, service_name, targets, make_breaker):
        if not targets:
            raise ValueError(f"service {service_name!r} has no targets")
        self.service_name = service_name
        self.targets = tuple(targets)
        self.breakers = tuple(make_breaker(t) for t in self.targets)
        self._next = 0

    def breaker_for(self, target):
        return self.breakers[self.targets.index(target)]

    def pick(self, exclude=()):
        """(target, breaker) for the next target in turn whose breaker allows a
        request, preferring targets not in `exclude`; None when none allows.

        A returned half_open breaker has handed its single probe to the caller,
        who must report the outcome to it.
        """
        count = len(self.targets)
        if not exclude:
            # The common case: the next target in turn, without building lists.
            for step in range(count):
                i = (self._next + step) % count
                if self.breakers[i].allow_request():
                    self._next = (i + 1) % count
                    return self.targets[i], self.breakers[i]
            return None
        order = [(self._next + i) % count for i in range(count)]
        preferred = [i for i in order if self.targets[i] not in exclude]
        fallback = [i for i in order if self.targets[i] in exclude]
        for i in preferred + fallback:
            # allow_request() claims a half_open probe, so ask only the target
            # we would take, in order, and stop at the first yes.
            if self.breakers[i].allow_request():
                self._next = (i + 1) % count
                return self.targets[i], self.breakers[i]
        return None

    def retry_after_s(self):
        """When every target refuses: seconds until the first could accept."""
        waits = [b.retry_after_s() for b in self.breakers]
        return max(1, min(waits)) if waits else 1

    def stop(self):
        """Stop every breaker's timer. Not for registry-owned breakers that a
        newer Balancer may still use: stop those through the registry."""
        for breaker in self.breakers:
            breaker.stop()


class BreakerRegistry:
    """Breakers by (service, url), surviving reloads for unchanged targets."""

    log = Logger()

    def __init__(self, clock, failure_threshold, recovery_time_s, metrics=None,
                 min_requests=1, failure_ratio=0.0, window_s=10.0):
        self._clock = clock
        self._policy = {}
        self._metrics = metrics
        self._breakers = {}
        self.configure(failure_threshold, recovery_time_s, min_requests, failure_ratio,
                       window_s)

    def breaker(self, service, url, register=True):
        """The breaker of (service, url), created if new. With register=False
        a missing one is made detached (no registry entry, no gauge): for a
        request still running on a config that has since dropped the target."""
        key = (service, url)
        breaker = self._breakers.get(key)
        if breaker is None and not register:
            return CircuitBreaker(clock=self._clock, **self._policy)
        if breaker is None:
            breaker = CircuitBreaker(
                clock=self._clock,
                on_transition=breaker_observer(self._metrics, service, url, self.log),
                **self._policy,
            )
            self._breakers[key] = breaker
        return breaker

    def balancer(self, service_config):
        name = service_config.name
        return Balancer(name, service_config.targets, lambda t: self.breaker(name, t.url))

    def balancers(self, config):
        """A Balancer per service of a GatewayConfig; drops breakers of targets
        no longer configured and applies the (possibly new) breaker settings."""
        settings = config.settings
        self.configure(
            settings.breaker_failure_threshold, settings.breaker_recovery_time_s,
            settings.breaker_min_requests, settings.breaker_failure_ratio,
            settings.breaker_window_s,
        )
        self.retain(
            (name, t.url) for name, service in config.services.items() for t in service.targets
        )
        return {name: self.balancer(service) for name, service in config.services.items()}

    def configure(self, failure_threshold, recovery_time_s, min_requests=1,
                  failure_ratio=0.0, window_s=10.0):
        """New thresholds for new and existing breakers; a running recovery
        timer keeps its original deadline."""
        self._policy = {
            "failure_threshold": failure_threshold, "recovery_time_s": recovery_time_s,
            "min_requests": min_requests, "failure_ratio": failure_ratio, "window_s": window_s,
        }
        for breaker in self._breakers.values():
            for name, value in self._policy.items():
                setattr(breaker, name, value)

    def retain(self, keys):
        """Stop and forget breakers whose (service, url) is not in `keys`."""
        keep = set(keys)
        for key in [k for k in self._breakers if k not in keep]:
            self._breakers.pop(key).stop()
            if self._metrics is not None:
                # A removed target's gauge would otherwise report forever.
                self._metrics.breaker_state.remove(*key)

    def stop(self):
        for breaker in self._breakers.values():
            breaker.stop()

    def __len__(self):
        return len(self._breakers)
