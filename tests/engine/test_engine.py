"""Engine behaviour, one rule at a time: reasons, Retry-After, queue, eviction, release, lifecycle, apply."""

import math

import pytest

from extproc.engine import Engine, Lifecycle, Reason, Verdict

from .harness import config, ent_doc, pool_doc


def engine(*ents, **pool):
    return Engine(config(pool_doc(**pool), *ents), 0.0)


def test_guaranteed_ceiling_is_its_baseline_and_retry_after_is_the_next_own_completion():
    eng = engine(ent_doc("g", "guaranteed", resources={"concurrency": 2}), tps=480, conc=16)
    assert eng.admit("1", "g", 64, 64, 0.0).verdict is Verdict.ADMIT
    assert eng.admit("2", "g", 64, 64, 1.0).verdict is Verdict.ADMIT
    d = eng.admit("3", "g", 64, 64, 2.0)
    assert d.verdict is Verdict.QUEUE and d.reason is Reason.OVER_CONCURRENCY
    # Request 1 started at 0 and needs 128 tokens at 480/16 = 30 tok/s: expected to end at 4.267 s.
    assert d.retry_after == pytest.approx(128 / 30 - 2.0)
    assert d.deadline == pytest.approx(2.0 + 10.0)
    ev = eng.finish("1", 64, 64, 3.0)
    assert ev.admitted == ["3"]


def test_throughput_ceiling_rejects_with_bucket_refill_time():
    # A guaranteed tenant whose token rate, not concurrency, binds: 10 tok/s, bucket depth 5 s = 50 tokens.
    eng = engine(
        ent_doc("g", "guaranteed", resources={"tokensPerSecond": 10, "concurrency": 8}),
        tps=480, conc=16, queue={"timeoutSeconds": 0},
    )
    assert eng.admit("1", "g", 20, 20, 0.0).verdict is Verdict.ADMIT  # 40 of 50 tokens
    d = eng.admit("2", "g", 20, 20, 0.0)
    assert d.verdict is Verdict.REJECT and d.reason is Reason.QUEUE_FULL  # queueing disabled
    eng2 = engine(ent_doc("g", "guaranteed", resources={"tokensPerSecond": 10, "concurrency": 8}), tps=480, conc=16)
    eng2.admit("1", "g", 20, 20, 0.0)
    d = eng2.admit("2", "g", 20, 20, 0.0)
    assert d.verdict is Verdict.QUEUE and d.reason is Reason.OVER_THROUGHPUT
    assert d.retry_after == pytest.approx((40 - 10) / 10)  # 10 left, 30 more at 10 tok/s
    assert eng2.tick(2.9).admitted == []
    assert eng2.tick(3.0).admitted == ["2"]


def test_spot_backfills_then_is_throttled_with_retry_after_from_expected_completions():
    eng = engine(
        ent_doc("g", "guaranteed", slo=500, resources={"concurrency": 4}),
        ent_doc("s", "spot", slo=5000),
        tps=480, conc=8,
    )
    for i in range(4):
        assert eng.admit(f"s{i}", "s", 64, 64, 0.0).verdict is Verdict.ADMIT
    d = eng.admit("s4", "s", 64, 64, 1.0)  # the other 4 slots are g's headroom
    assert d.verdict is Verdict.REJECT and d.reason is Reason.POOL_CONTENDED
    assert d.retry_after == pytest.approx(128 / 60 - 1.0)  # s0 ends at 128 / (480/8) s
    for i in range(4):  # g gets its whole baseline at once, whatever spot does
        assert eng.admit(f"g{i}", "g", 64, 64, 1.0).verdict is Verdict.ADMIT


def test_preemptible_backfill_is_evicted_when_guaranteed_returns():
    eng = engine(
        ent_doc("g", "guaranteed", slo=500, resources={"concurrency": 4}),
        ent_doc("p", "preemptible", slo=5000),
        tps=480, conc=4,
    )
    for i in range(4):
        assert eng.admit(f"p{i}", "p", 64, 64, float(i)).verdict is Verdict.ADMIT
    d = eng.admit("g0", "g", 64, 64, 5.0)
    assert d.verdict is Verdict.ADMIT and list(d.evict) == ["p3"]  # the newest, least work lost
    assert eng.ents["p"].in_flight == 3 and eng.ents["p"].evicted_total == 1
    assert eng.release("p3", 5.0).admitted == [] and eng.duplicate_releases == 1  # adapter's late release
    eng.check_invariants()


def test_release_is_exactly_once_and_queued_release_frees_the_slot():
    eng = engine(ent_doc("g", "guaranteed", resources={"concurrency": 1}))
    eng.admit("1", "g", 10, 10, 0.0)
    assert eng.admit("2", "g", 10, 10, 0.0).verdict is Verdict.QUEUE
    eng.release("2", 0.5)  # client gave up while queued
    assert eng.finish("1", 12, 3, 1.0).admitted == []
    eng.finish("1", 12, 3, 1.0)
    eng.release("1", 1.0)
    assert (eng.reserved_total, eng.released_total, eng.duplicate_releases) == (1, 1, 2)
    eng.check_invariants()


def test_reconcile_charges_real_usage_and_bucket_may_go_negative():
    eng = engine(ent_doc("g", "guaranteed", resources={"tokensPerSecond": 100, "concurrency": 4}))
    b = eng.ents["g"].bucket
    eng.admit("1", "g", 100, 100, 0.0)
    assert b.level == pytest.approx(500 - 200)
    eng.finish("1", 300, 500, 0.0)  # the prompt was underestimated and the output ran long
    assert b.level == pytest.approx(500 - 800)
    d = eng.admit("2", "g", 10, 10, 0.0)
    assert d.reason is Reason.OVER_THROUGHPUT and d.retry_after == pytest.approx((300 + 20) / 100)


def test_progress_grows_kv_only_beyond_the_reservation():
    eng = engine(ent_doc("e", "elastic", resources={"concurrency": 4}))
    eng.admit("1", "e", 100, 50, 0.0)
    eng.progress("1", 40, 0.1)
    assert eng.ents["e"].kv == 150
    eng.progress("1", 80, 0.2)  # upstream ignored max_tokens
    assert eng.ents["e"].kv == 180 and eng.pools["pool"].used_kv == 180
    eng.finish("1", 100, 80, 0.3)
    assert eng.pools["pool"].used_kv == 0


def test_queue_bounds_and_timeout():
    eng = engine(
        ent_doc("g", "guaranteed", resources={"concurrency": 1}),
        queue={"maxQueued": 3, "maxQueuedPerEntitlement": 2, "timeoutSeconds": 2},
    )
    eng.admit("1", "g", 10, 10, 0.0)
    assert eng.admit("2", "g", 10, 10, 0.0).verdict is Verdict.QUEUE
    assert eng.admit("3", "g", 10, 10, 0.5).verdict is Verdict.QUEUE
    full = eng.admit("4", "g", 10, 10, 0.5)
    assert full.verdict is Verdict.REJECT and full.reason is Reason.QUEUE_FULL and full.retry_after > 0
    ev = eng.tick(2.0)
    assert [d.request_id for d in ev.rejected] == ["2"] and ev.rejected[0].reason is Reason.QUEUE_TIMEOUT
    assert math.isfinite(ev.rejected[0].retry_after)
    assert [d.request_id for d in eng.tick(2.5).rejected] == ["3"]


def test_no_capacity_and_oversized():
    eng = engine(ent_doc("s", "spot"), replicas=0, kv=1000)
    d = eng.admit("1", "s", 10, 10, 0.0)
    assert d.reason is Reason.NO_CAPACITY and d.retry_after == 30.0
    eng.set_replicas("pool", 1, 1.0)
    assert eng.admit("2", "s", 10, 10, 1.0).verdict is Verdict.ADMIT
    big = eng.admit("3", "s", 990, 20, 1.0)
    assert big.reason is Reason.OVER_KV and big.retry_after is None


def test_lifecycle_pending_when_reserved_does_not_fit_and_expiry():
    eng = engine(
        ent_doc("a", "guaranteed", resources={"concurrency": 10}),
        ent_doc("b", "dedicated", resources={"concurrency": 10}),
        conc=16,
    )
    assert eng.ents["a"].lifecycle is Lifecycle.BOUND and eng.ents["b"].lifecycle is Lifecycle.PENDING
    assert eng.admit("1", "b", 1, 1, 0.0).reason is Reason.NOT_BOUND
    eng.set_replicas("pool", 2, 1.0)
    assert eng.ents["b"].lifecycle is Lifecycle.BOUND
    assert eng.admit("2", "b", 1, 1, 1.0).verdict is Verdict.ADMIT
    assert eng.inflight["2"].protected  # bound with a full bucket (within baseline), not an empty one
    eng.set_replicas("pool", 1, 2.0)  # shrinks below Σ reserved: b keeps serving, degraded, pro rata
    assert eng.ents["b"].lifecycle is Lifecycle.DEGRADED and eng.ents["b"].a_conc == pytest.approx(6.0)


def test_apply_changes_limits_without_dropping_requests():
    a = ent_doc("a", "guaranteed", resources={"concurrency": 4})
    eng = Engine(config(pool_doc(), a), 0.0)
    for i in range(4):
        eng.admit(f"r{i}", "a", 10, 10, 0.0)
    eng.admit("q", "a", 10, 10, 0.0)
    eng.apply(config(pool_doc(), ent_doc("a", "guaranteed", resources={"concurrency": 2})), 1.0)
    assert eng.ents["a"].in_flight == 4 and len(eng.ents["a"].queue) == 1  # nothing dropped
    assert eng.finish("r0", 10, 10, 2.0).admitted == []  # 3 in flight > new ceiling 2: the waiter stays
    eng.finish("r1", 10, 10, 2.0)
    assert eng.finish("r2", 10, 10, 2.0).admitted == ["q"]
    ev = eng.apply(config(pool_doc()), 3.0)  # entitlement removed: in-flight drain, new requests refused
    assert eng.admit("x", "a", 1, 1, 3.0).reason is Reason.NOT_BOUND
    assert ev.rejected == []
    eng.finish("r3", 10, 10, 4.0)
    eng.finish("q", 10, 10, 4.0)
    eng.check_invariants()
    assert eng.pools["pool"].ents == []


def test_clock_going_backwards_is_ignored():
    eng = engine(ent_doc("g", "guaranteed", resources={"concurrency": 1}))
    eng.admit("1", "g", 10, 10, 100.0)
    d = eng.admit("2", "g", 10, 10, 50.0)  # wall clock stepped back
    assert d.deadline == pytest.approx(110.0)
    assert eng.tick(60.0).rejected == []


def test_bad_arguments_are_errors_not_silent():
    eng = engine(ent_doc("s", "spot"))
    with pytest.raises(ValueError):
        eng.admit("1", "s", -1, 10, 0.0)
    with pytest.raises(ValueError):
        eng.admit("1", "s", 1, -1, 0.0)
    assert eng.admit("0", "s", 8, 0, 0.0).verdict is Verdict.ADMIT  # an embedding: no output tokens
    eng.admit("1", "s", 1, 1, 0.0)
    with pytest.raises(ValueError):
        eng.admit("1", "s", 1, 1, 0.0)
    assert eng.admit("2", "nobody", 1, 1, 0.0).reason is Reason.NOT_BOUND


def test_shares_split_capacity_and_entitlements_between_gateway_replicas():
    eng = engine(
        ent_doc("g", "guaranteed", resources={"concurrency": 6}),
        ent_doc("s", "spot", burst={"concurrency": 8}),
        conc=16,
    )
    eng.admit("g0", "g", 10, 10, 0.0)
    eng.set_shares("pool", 0.5, {"g": 0.5}, 1.0)
    p, g, s = eng.pools["pool"], eng.ents["g"], eng.ents["s"]
    assert (p.cap_conc, g.b_conc, g.c_conc, s.c_conc) == (8, 3, 3, 4)
    assert g.in_flight == 1 and eng.inflight["g0"].ent is g  # state carried over to the re-shared entitlement
    for i in range(1, 3):
        assert eng.admit(f"g{i}", "g", 10, 10, 1.0).verdict is Verdict.ADMIT
    assert eng.admit("g3", "g", 10, 10, 1.0).reason is Reason.OVER_CONCURRENCY
    with pytest.raises(ValueError):
        eng.set_shares("pool", 1.5, {}, 2.0)
    eng.check_invariants()


def test_preemptible_inside_held_headroom_is_not_counted_twice_against_burst_work():
    eng = engine(
        ent_doc("g", "guaranteed", resources={"concurrency": 4}),
        ent_doc("p", "preemptible"),
        ent_doc("s", "spot"),
        conc=8,
    )
    for i in range(4):  # preemptible work borrows 4 slots; count it inside g's idle headroom
        assert eng.admit(f"p{i}", "p", 8, 8, 0.0).verdict is Verdict.ADMIT
    for i in range(4):  # so the 4 unreserved slots are still there for spot
        assert eng.admit(f"s{i}", "s", 8, 8, 0.0).verdict is Verdict.ADMIT
    assert eng.admit("s4", "s", 8, 8, 0.0).reason is Reason.POOL_CONTENDED
    d = eng.admit("g0", "g", 8, 8, 0.0)  # the owner comes back: preemptible gives way, not spot
    assert d.verdict is Verdict.ADMIT and len(d.evict) == 1 and d.evict[0].startswith("p")
    eng.check_invariants()


def test_set_priorities_adopts_shared_debt_and_burst_without_moving_the_period():
    eng = engine(
        ent_doc("x", "elastic", slo=500, resources={"concurrency": 4}),
        ent_doc("y", "elastic", slo=500, resources={"concurrency": 4}),
    )
    w = eng.ents["x"].weight
    last = eng.pools["pool"].last_control
    eng.set_priorities("pool", {"x": (0.5, 0.0), "y": (0.0, 1.0), "nobody": (1.0, 1.0)}, 0.5)
    x, y = eng.ents["x"], eng.ents["y"]
    assert (x.debt, y.burst) == (0.5, 1.0)
    assert x.weight == pytest.approx(w * 3.0)  # 1 + alpha_debt * 0.5
    assert y.weight == pytest.approx(w / 2.0)  # 1 / (1 + alpha_burst * 1)
    assert eng.pools["pool"].last_control == last


def test_shares_are_rescaled_in_place_without_minting_throughput_or_restarting_the_period():
    eng = engine(ent_doc("e", "elastic", resources={"concurrency": 4}), ent_doc("s", "spot"), conc=16, kv=4000)
    p = eng.pools["pool"]
    eng.tick(1.0)
    e = eng.ents["e"]
    surplus = p.surplus.level
    eng.set_shares("pool", 0.25, {}, 1.5)
    eng.set_shares("pool", 1.0, {}, 1.5)  # down and up again at the same instant: nothing is created
    assert p.surplus.level <= surplus + 1e-9
    assert eng.ents["e"] is e and e.b_conc == 4.0  # rescaled in place
    assert p.last_control == 1.0  # neither set_shares nor set_replicas restarts the control period
    eng.set_replicas("pool", 1, 1.7)
    assert p.last_control == 1.0
    # A request that fits the whole pool but not this replica's share is contended, not "can never fit".
    eng.set_shares("pool", 0.25, {}, 1.8)
    d = eng.admit("big", "s", 1500, 500, 1.8)  # 2,000 KV tokens: half the pool, twice this share
    assert d.reason is Reason.POOL_CONTENDED and d.retry_after is not None
    assert eng.admit("huge", "s", 3000, 1500, 1.8).reason is Reason.OVER_KV  # larger than the whole pool
    eng.set_shares("pool", 0.0, {}, 1.9)  # this replica holds no share: contended, retry within a period
    d = eng.admit("x", "s", 1, 1, 1.9)
    assert d.reason is Reason.POOL_CONTENDED
