"""Engine-level faults (no adapter): what the pure engine does when a pool loses and regains all its replicas."""

from __future__ import annotations

from extproc.config import load_text
from extproc.engine import Engine, Verdict

# The paper's Exp 1 pool: 16 slots, 480 tok/s per replica; a guaranteed entitlement of 6 slots (180 tok/s,
# a bucket of 5 s = 900 tokens).
CONFIG = """
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {name: p}
spec:
  model: m
  replicas: {min: 0, max: 2, current: 1}
  perReplica: {tokensPerSecond: 480, concurrency: 16, kvCacheTokens: 32768}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: g, labels: {tokenpools.io/demo: "true"}}
spec:
  tenantId: t
  poolRef: {name: p}
  qos: {serviceClass: guaranteed}
  resources: {concurrency: 6}
  auth: {apiKeys: [k]}
"""


def test_pool_to_zero_and_back_keeps_the_books():
    e = Engine(load_text(CONFIG), 0.0)
    assert e.admit("a", "g", 100, 100, 0.0).verdict is Verdict.ADMIT
    e.set_replicas("p", 0, 1.0)
    assert e.admit("b", "g", 100, 100, 1.0).reason.value == "no_capacity"
    e.finish("a", 100, 50, 2.0)  # the request that was running when the replica went away ends normally
    e.check_invariants()
    e.set_replicas("p", 1, 3.0)
    e.check_invariants()
    assert e.snapshot(3.0)["entitlements"]["g"]["state"] == "Bound"
    assert not e.inflight and not e.waiting and e.reserved_total == e.released_total


def test_guaranteed_request_is_admitted_at_once_after_the_pool_returns_from_zero():
    e = Engine(load_text(CONFIG), 0.0)
    e.tick(5.0)  # a full bucket
    e.set_replicas("p", 0, 10.0)
    e.tick(20.0)
    e.set_replicas("p", 1, 30.0)
    d = e.admit("x", "g", 100, 100, 30.0)
    assert d.verdict is Verdict.ADMIT, d
