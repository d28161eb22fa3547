from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock

from apigw.balancer import Balancer, BreakerRegistry
from apigw.breaker import CircuitBreaker
from apigw.config import Environment, parse_config, parse_target
from apigw.metrics import Metrics

A, B, C = (parse_target(f"http://127.0.0.1:{p}") for p in (5001, 5002, 5003))


def make(targets=(A, B, C), threshold=1, recovery_s=10):
    clock = Clock()
    balancer = Balancer(
        "svc", targets, lambda t: CircuitBreaker(threshold, recovery_s, clock)
    )
    return balancer, clock


def picks(balancer, n, exclude=()):
    out = []
    for _ in range(n):
        chosen = balancer.pick(exclude)
        out.append(chosen[0] if chosen else None)
    return out


def test_round_robin_order():
    """When all targets are healthy, picks cycle through them in order."""
    balancer, _ = make()
    assert picks(balancer, 7) == [A, B, C, A, B, C, A]


def test_pick_returns_the_targets_breaker():
    """When a target is picked, the breaker returned is that target's own."""
    balancer, _ = make()
    target, breaker = balancer.pick()
    assert breaker is balancer.breaker_for(target)


def test_skips_open_targets():
    """When a target's breaker is open, rotation skips it."""
    balancer, _ = make()
    balancer.breaker_for(B).record_failure()
    assert picks(balancer, 4) == [A, C, A, C]


def test_all_open_gives_none_and_retry_after():
    """When every breaker is open, pick gives None and retry_after is the soonest half-open."""
    balancer, clock = make(recovery_s=10)
    balancer.breaker_for(A).record_failure()
    clock.advance(4)
    balancer.breaker_for(B).record_failure()
    balancer.breaker_for(C).record_failure()
    assert balancer.pick() is None
    assert balancer.retry_after_s() == 6


def test_half_open_target_gets_one_probe_in_rotation():
    """When a target half-opens, exactly one pick goes to it until its probe reports."""
    balancer, clock = make(targets=(A, B), recovery_s=10)
    balancer.breaker_for(A).record_failure()
    clock.advance(10)
    assert picks(balancer, 5) == [A, B, B, B, B]


def test_exclusion_prefers_another_target():
    """When a retry excludes the target just tried, another healthy target is chosen."""
    balancer, _ = make()
    assert balancer.pick()[0] == A
    # Plain rotation would give B next.
    assert balancer.pick(exclude=(B,))[0] == C
    assert balancer.pick(exclude=(A, C))[0] == B


def test_exclusion_falls_back_when_nothing_else():
    """When every other target is open, an excluded but allowed target is still used."""
    balancer, _ = make(targets=(A, B))
    balancer.breaker_for(B).record_failure()
    assert picks(balancer, 2, exclude=(A,)) == [A, A]


def test_single_target_with_exclusion():
    """When the only target was excluded, it is picked again rather than nothing."""
    balancer, _ = make(targets=(A,))
    assert picks(balancer, 2, exclude=(A,)) == [A, A]


def test_stop_cancels_all_timers():
    """When stopped, no breaker timer remains on the clock."""
    balancer, clock = make()
    for t in (A, B):
        balancer.breaker_for(t).record_failure()
    assert len(clock.getDelayedCalls()) == 2
    balancer.stop()
    assert clock.getDelayedCalls() == []


YAML_V1 = """
services:
  svc:
    urls: ["http://127.0.0.1:5001", "http://127.0.0.1:5002"]
  other:
    url: "http://127.0.0.1:5003"
settings:
  breaker_failure_threshold: 1
  breaker_min_requests: 1
  breaker_recovery_time: 10
"""

YAML_V2 = """
services:
  svc:
    urls: ["http://127.0.0.1:5001", "http://127.0.0.1:5004"]
settings:
  breaker_failure_threshold: 2
  breaker_min_requests: 1
  breaker_recovery_time: 10
"""


def test_registry_keeps_breakers_of_unchanged_targets_across_reload():
    """When the config reloads, a kept target's open breaker stays open; removed ones go away."""
    clock = Clock()
    metrics = Metrics(CollectorRegistry())
    registry = BreakerRegistry(clock, 5, 30, metrics=metrics)
    v1 = registry.balancers(parse_config(YAML_V1, "gw.yaml", Environment()))
    v1["svc"].breaker_for(A).record_failure()
    v1["svc"].breaker_for(B).record_failure()
    v1["other"].breaker_for(C).record_failure()
    assert len(clock.getDelayedCalls()) == 3
    v2 = registry.balancers(parse_config(YAML_V2, "gw.yaml", Environment()))
    kept = v2["svc"].breaker_for(A)
    assert kept is v1["svc"].breaker_for(A)
    assert kept.state == "open"
    assert kept.failure_threshold == 2
    # B and C's timers were cancelled with their breakers.
    assert len(clock.getDelayedCalls()) == 1
    assert len(registry) == 2
    new_target = v2["svc"].targets[1]
    assert v2["svc"].pick() == (new_target, v2["svc"].breaker_for(new_target))

    def gauge(service, url):
        return metrics.registry.get_sample_value(
            "gateway_circuit_breaker_state", {"service": service, "target": url}
        )

    assert gauge("svc", A.url) == 1
    assert gauge("svc", B.url) is None
    assert gauge("other", C.url) is None
    assert gauge("svc", "http://127.0.0.1:5004") == 0


def test_registry_stop_cancels_timers():
    """When the registry stops, every breaker timer is cancelled."""
    clock = Clock()
    registry = BreakerRegistry(clock, 1, 30)
    registry.breaker("svc", A.url).record_failure()
    registry.breaker("svc", B.url).record_failure()
    registry.stop()
    assert clock.getDelayedCalls() == []
