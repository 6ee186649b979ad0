"""Shadow mode: decide and record, never enforce (per entitlement, or for a whole pool)."""

from __future__ import annotations

from extproc.engine import Engine, Reason, Verdict

from .harness import config, ent_doc, pool_doc


def _shadow(doc: dict) -> dict:
    doc["spec"]["shadow"] = True
    return doc


def test_a_shadow_entitlement_is_admitted_and_the_would_be_rejections_are_counted():
    """spot with a concurrency ceiling of 2: enforcement rejects the third request; shadow admits all five and
    counts three would-be rejections with their reason. Nothing is held back afterwards."""
    cfg = config(pool_doc(conc=16), _shadow(ent_doc("s", "spot", burst={"concurrency": 2})))
    eng = Engine(cfg, 0.0)
    decisions = [eng.admit(f"r{i}", "s", 10, 10, 0.0) for i in range(5)]
    assert [d.verdict for d in decisions] == [Verdict.ADMIT] * 5
    assert [d.would for d in decisions] == [None, None, Verdict.QUEUE, Verdict.QUEUE, Verdict.QUEUE]
    assert decisions[2].reason is Reason.OVER_CONCURRENCY
    snap = eng.snapshot(0.0)["entitlements"]["s"]
    assert snap["shadow"] is True
    assert snap["shadow_would"] == {"queue": 3, "reject": 0, "by_reason": {"over_concurrency": 3}}
    assert snap["in_flight"] == 5 and snap["rejected_total"] == 0 and snap["queued"] == 0
    for i in range(5):
        eng.finish(f"r{i}", 10, 10, 1.0)
    eng.check_invariants()
    assert eng.snapshot(1.0)["pools"]["pool"]["used"]["concurrency"] == 0


def test_the_same_decisions_are_enforced_without_shadow():
    """The control: the same entitlement without shadow gets the ceiling enforced (so the test above counts
    what enforcement really does)."""
    cfg = config(pool_doc(conc=16), ent_doc("s", "spot", burst={"concurrency": 2}))
    eng = Engine(cfg, 0.0)
    verdicts = [eng.admit(f"r{i}", "s", 10, 10, 0.0).verdict for i in range(5)]
    assert verdicts[:2] == [Verdict.ADMIT] * 2 and Verdict.ADMIT not in verdicts[2:]


def test_a_shadow_pool_admits_beyond_capacity_and_evicts_nobody():
    """A whole pool in shadow: a guaranteed tenant that would evict preemptible work is admitted without
    evicting anyone, spot beyond the pool is admitted and counted as would-be rejected (pool contended)."""
    cfg = config(
        _shadow(pool_doc(conc=4)),
        ent_doc("g", "guaranteed", resources={"concurrency": 2}),
        ent_doc("pe", "preemptible"),
        ent_doc("s", "spot"),
    )
    eng = Engine(cfg, 0.0)
    for i in range(4):
        assert eng.admit(f"pe{i}", "pe", 10, 10, 0.0).verdict is Verdict.ADMIT
    d = eng.admit("g0", "g", 10, 10, 0.1)
    assert d.verdict is Verdict.ADMIT and d.would is None and not d.evict  # would evict: admitted, nobody evicted
    d = eng.admit("s0", "s", 10, 10, 0.1)
    assert d.verdict is Verdict.ADMIT and d.would is not None and d.reason is Reason.POOL_CONTENDED
    snap = eng.snapshot(0.1)
    assert snap["pools"]["pool"]["shadow"] is True
    assert snap["pools"]["pool"]["used"]["concurrency"] == 6  # above capacity: shadow never enforces
    assert snap["entitlements"]["pe"]["evicted_total"] == 0
    eng.check_invariants()


def test_shadow_can_be_switched_by_a_reload_and_keeps_its_counts():
    ent = ent_doc("s", "spot", burst={"concurrency": 1})
    eng = Engine(config(pool_doc(), _shadow(ent_doc("s", "spot", burst={"concurrency": 1}))), 0.0)
    eng.admit("a", "s", 10, 10, 0.0)
    assert eng.admit("b", "s", 10, 10, 0.0).would is Verdict.QUEUE
    eng.apply(config(pool_doc(), ent), 0.5)  # enforcing now
    assert eng.admit("c", "s", 10, 10, 0.5).verdict is not Verdict.ADMIT
    snap = eng.snapshot(0.5)["entitlements"]["s"]
    assert snap["shadow"] is False and snap["shadow_would"]["queue"] == 1
    eng.apply(config(_shadow(pool_doc()), ent), 0.6)  # the pool's flag covers its entitlements
    assert eng.snapshot(0.6)["entitlements"]["s"]["shadow"] is True
