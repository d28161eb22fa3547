"""apigw.heap: the heap frozen once the gateway is up, and again after a reload."""

import gc
import os
import subprocess
import sys
import weakref

import pytest
from twisted.internet import task

from apigw.heap import YOUNG_THRESHOLD, Heap


class _Cycle:
    def __init__(self):
        self.me = self


@pytest.fixture
def real_gc():
    """The process's own collector, put back as it was afterwards."""
    threshold = gc.get_threshold()
    yield gc
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settle_collects_freezes_and_relaxes_the_young_generation(real_gc):
    """Cycles already garbage are collected, not frozen; the survivors are
    frozen; the young generation's threshold is raised, the others kept."""
    garbage = _Cycle()
    gone = weakref.ref(garbage)
    del garbage
    kept = _Cycle()
    assert any(o is kept for o in gc.get_objects())
    _, middle, oldest = gc.get_threshold()
    Heap(task.Clock()).settle()
    assert gone() is None
    # Frozen objects are in no generation the collector walks.
    assert not any(o is kept for o in gc.get_objects())
    assert gc.get_threshold() == (YOUNG_THRESHOLD, middle, oldest)


def test_a_cycle_frozen_then_dropped_is_collected_after_a_reload(real_gc):
    """A cycle that was alive at the freeze and is dropped later (what a
    reload replaces) survives collections until the refreeze after the
    reload, which collects it; a second reload postpones the refreeze."""
    clock = task.Clock()
    heap = Heap(clock)
    old_config = _Cycle()
    gone = weakref.ref(old_config)
    heap.settle()
    del old_config
    gc.collect()
    assert gone() is not None  # frozen: no collection sees it
    heap.reloaded()
    clock.advance(heap.after_reload_s - 1)
    heap.reloaded()
    clock.advance(heap.after_reload_s - 1)
    assert gone() is not None
    clock.advance(1)
    assert gone() is None
    assert gc.get_freeze_count() > 0
    assert not clock.getDelayedCalls()


def test_stop_cancels_a_pending_refreeze():
    """Stopping the service leaves no timer behind."""
    clock = task.Clock()
    heap = Heap(clock)
    heap.reloaded()
    heap.stop()
    assert not clock.getDelayedCalls()


_PROBE = r"""
import gc, sys
from twisted.internet import reactor
from apigw.config import load_config
from apigw.service import GatewayService
from apigw.tap import Options, makeService

# As tests build one: no heap.
test_gateway = GatewayService(load_config(sys.argv[1]), port="tcp:0:interface=127.0.0.1",
                              reactor=reactor)
test_gateway.startService()
print(gc.get_freeze_count(), gc.get_threshold()[0], flush=True)

# As `twistd apigw` builds it.
options = Options()
options.parseOptions(["--config", sys.argv[1], "--port", "tcp:0:interface=127.0.0.1"])
service = makeService(options, reactor)
service.startService()
print(gc.get_freeze_count() > 1000, gc.get_threshold()[0], flush=True)
reactor.callLater(0, reactor.stop)
reactor.run()
# Its reactor hands events straight to their handlers (apigw._twisted_compat).
print("doIteration" in vars(reactor), flush=True)
"""


@pytest.mark.slow
def test_the_served_process_freezes_its_heap_but_test_gateways_do_not(tmp_path):
    """`twistd apigw`'s service freezes the heap when it starts (and its
    reactor dispatches events directly); a GatewayService built without a
    heap (as tests build it) leaves the collector alone."""
    config = tmp_path / "gw.yaml"
    config.write_text("services:\n  a:\n    url: http://127.0.0.1:9\n    auth: false\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "MASTER_KEY")}
    out = subprocess.run([sys.executable, "-c", _PROBE, str(config)], cwd=str(tmp_path),
                         env=env, capture_output=True, text=True, timeout=60)
    test_gateway, served, direct_dispatch = out.stdout.splitlines()
    assert test_gateway == f"0 {gc.get_threshold()[0]}", out.stderr
    assert gc.get_threshold()[0] != YOUNG_THRESHOLD
    assert served == f"True {YOUNG_THRESHOLD}", out.stderr
    assert direct_dispatch == "True", out.stderr
