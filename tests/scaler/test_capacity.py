"""Required capacity from the engine's books, replicas needed, and the hysteresis that keeps them steady."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.engine import Engine
from extproc.scaler.capacity import Hysteresis, ScalingPolicy, UsageAverager, requirement
from tests.engine.harness import config, ent_doc, pool_doc

POLICY = ScalingPolicy(burst_cap_replicas=1.0, usage_window_s=10.0, scale_down_delay_s=5.0, scale_down_band=0.1)


def req(eng: Engine, now: float = 0.0, policy: ScalingPolicy = POLICY, averager: UsageAverager | None = None):
    return requirement(eng.pools["pool"], averager or UsageAverager(policy.usage_window_s), policy, now)


def g(name, conc=6, **kw):
    return ent_doc(name, "guaranteed", resources={"concurrency": conc}, **kw)


def test_reserved_baselines_set_the_floor():
    # The paper's Exp 1: 2 × 6 guaranteed slots on 16-slot replicas: 12 of 16, one replica.
    eng = Engine(config(pool_doc(conc=16), g("a"), g("c"), ent_doc("s", "spot", burst={"concurrency": 10})), 0.0)
    r = req(eng)
    assert r.reserved[2] == 12 and r.total[2] == 12 and r.needed == 1 and r.binding == "concurrency"
    assert r.reserved[0] == pytest.approx(12 * 480 / 16)  # throughput follows the pool's per-sequence ratio
    eng.apply(config(pool_doc(conc=16), g("a"), g("c"), g("d")), 1.0)  # 18 slots: two replicas
    assert req(eng, 1.0).needed == 2


def test_the_binding_dimension_wins():
    eng = Engine(config(pool_doc(tps=480, conc=16), ent_doc("t", "dedicated", resources={"tokensPerSecond": 1000})), 0.0)
    r = req(eng)
    assert r.needed == 3  # 1000/480 → 3 (concurrency filled in at the pool's ratio: 1000/30 = 33.3 of 16 → 3)
    kv_heavy = ent_doc("k", "guaranteed", resources={"kvCacheTokens": 2500, "tokensPerSecond": 10, "concurrency": 1})
    eng = Engine(config(pool_doc(kv=1000, conc=16), kv_heavy), 0.0)
    assert req(eng).needed == 3 and req(eng).binding == "kvCacheTokens"


def test_pending_reservations_count_expired_and_removed_do_not():
    eng = Engine(config(pool_doc(conc=16, replicas=1), g("a", 12), g("b", 12), g("x", 4, )), 0.0)
    assert eng.ents["b"].lifecycle.value == "Pending"
    assert req(eng).reserved[2] == 28 and req(eng).needed == 2  # b needs a second replica to bind
    docs = [pool_doc(conc=16), g("a", 12), g("b", 12)]
    expiring = ent_doc("x", "guaranteed", resources={"concurrency": 4})
    expiring["spec"]["expiresAt"] = 5
    eng = Engine(config(*docs, expiring), 0.0)
    assert req(eng).reserved[2] == 28
    eng.tick(6.0)
    assert req(eng, 6.0).reserved[2] == 24
    eng.apply(config(pool_doc(conc=16), g("a", 12)), 7.0)
    assert req(eng, 7.0).reserved[2] == 12 and req(eng, 7.0).needed == 1


def test_elastic_counts_its_use_averaged_over_time_and_its_demand_now():
    eng = Engine(config(pool_doc(conc=16, replicas=1), ent_doc("e", "elastic", resources={"concurrency": 8})), 0.0)
    avg = UsageAverager(POLICY.usage_window_s)
    assert req(eng, 0.0, averager=avg).elastic[2] == 0  # idle: nothing provisioned for it
    for i in range(4):
        eng.admit(f"r{i}", "e", 10, 10, 0.0)
    r = req(eng, 0.0, averager=avg)
    assert r.elastic[2] == 4  # demand now
    for i in range(4):
        eng.finish(f"r{i}", 10, 10, 1.0)
    # Done: demand 0, but the average remembers ~10 s of use (time constant usage_window_s).
    r = req(eng, 5.0, averager=avg)
    assert r.elastic[2] == pytest.approx(0.0, abs=1e-9)  # the first sample was 0 at t=0; second at t=0 was 4
    avg = UsageAverager(POLICY.usage_window_s)
    for t in range(0, 30):  # 4 in flight for 30 s
        if t == 0:
            for i in range(4):
                eng.admit(f"s{i}", "e", 10, 10, 10.0)
        req(eng, 10.0 + t, averager=avg)
    for i in range(4):
        eng.finish(f"s{i}", 10, 10, 40.0)
    after = [req(eng, 40.0 + dt, averager=avg).elastic[2] for dt in (0, 10, 20)]
    # Sampled each second: 4 until t=39, 0 from t=40 on (time constant 10 s).
    assert after[0] == pytest.approx(4 * math.exp(-1 / 10), rel=1e-6)
    assert after[1] == pytest.approx(after[0] * math.exp(-1), rel=1e-6)
    assert after[2] == pytest.approx(after[0] * math.exp(-2), rel=1e-6)


def test_burst_demand_is_capped_and_guaranteed_overflow_is_not_demand():
    eng = Engine(config(
        pool_doc(conc=4, replicas=1, queue={"maxQueued": 100, "maxQueuedPerEntitlement": 100}),
        g("a", 2), ent_doc("s", "spot", burst={"concurrency": 3}), ent_doc("p", "preemptible"),
    ), 0.0)  # fmt: skip
    for i in range(5):  # 2 admitted, 3 wait on their own ceiling (guaranteed: ceiling = baseline)
        eng.admit(f"a{i}", "a", 1, 1, 0.0)
    assert req(eng).burst[2] == 0 and req(eng).total[2] == 2
    # At zero replicas with an autoscaler everything waits, whatever its weight: demand is all visible.
    eng = Engine(config(
        pool_doc(conc=4, replicas=0, queue={"maxQueued": 100, "maxQueuedPerEntitlement": 100}),
        ent_doc("s", "spot", burst={"concurrency": 3}), ent_doc("p", "preemptible"),
    ), 0.0)  # fmt: skip
    eng.autoscaled.add("pool")
    for i in range(6):  # spot: ceiling 3 → at most 3 count, however many wait
        assert eng.admit(f"s{i}", "s", 1, 1, 0.0).reason.value == "no_capacity"
    assert req(eng).burst_demand[2] == 3 and req(eng).needed == 1
    for i in range(20):  # preemptible: no ceiling, but the cap (1 replica = 4 slots) bounds what burst adds
        eng.admit(f"p{i}", "p", 1, 1, 0.0)
    r = req(eng)
    assert r.burst_demand[2] == 23 and r.burst[2] == 4 and r.total[2] == 4 and r.needed == 1
    assert req(eng, policy=ScalingPolicy(burst_cap_replicas=3.0)).needed == 3
    assert req(eng, policy=ScalingPolicy(burst_cap_replicas=0.0)).needed == 0


def test_clamped_to_the_pool_bounds():
    doc = pool_doc(conc=16)
    doc["spec"]["replicas"] = {"min": 2, "max": 3, "current": 2}
    eng = Engine(config(doc, g("a", 1)), 0.0)
    assert req(eng).needed == 2
    eng = Engine(config(doc, g("a", 16), g("b", 16), g("c", 16), g("d", 16)), 0.0)
    assert req(eng).needed == 3 and req(eng).total[2] == 64  # the requirement still says what is missing


def test_a_shared_pool_asks_for_the_whole_baseline():
    eng = Engine(config(pool_doc(conc=16), g("a", 6), g("c", 6)), 0.0)
    eng.set_shares("pool", 0.5, {}, 0.0)
    assert eng.ents["a"].b_conc == 3  # this engine hands out half...
    assert req(eng).reserved[2] == 12  # ...but the pool must still hold all of it


# ---- hysteresis ---------------------------------------------------------------------------------------------
def test_up_at_once_down_after_the_delay_and_with_room_to_spare():
    h = Hysteresis(delay_s=5.0, band=0.1)
    assert h.step(1, 1, 0.0, current=1) == 1
    assert h.step(3, 3, 1.0) == 3  # up at once
    assert h.step(1, 1, 2.0) == 3  # down waits
    assert h.step(1, 1, 5.9) == 3
    assert h.step(1, 1, 6.0) == 1  # 5 s after the last change, and the whole window asked for ≤ 1
    assert h.step(2, 2, 6.5) == 2
    assert h.step(1, 2, 20.0) == 2  # needs 1, but 1 would leave less than 10 % free: stays


def test_first_answer_keeps_what_runs():
    h = Hysteresis(delay_s=5.0, band=0.1)
    assert h.step(1, 1, 0.0, current=3) == 3  # a restarted controller does not scale down at once
    assert h.step(1, 1, 5.0) == 1


def test_noise_around_a_replica_boundary_does_not_flap():
    """Required capacity wobbling ±5 % around 16 sequences (one replica): one step up, then steady."""
    policy = ScalingPolicy(scale_down_delay_s=3.0, scale_down_band=0.1)
    h = Hysteresis(policy.scale_down_delay_s, policy.scale_down_band)
    seen = []
    for t in range(120):
        required = 16 * (1.05 if t % 2 else 0.95)
        needed = math.ceil(required / 16 - 1e-6)
        with_band = math.ceil(required / (16 * 0.9) - 1e-6)
        seen.append(h.step(needed, with_band, float(t), current=1))
    changes = sum(1 for a, b in zip(seen, seen[1:]) if a != b)
    assert changes == 1 and seen[-1] == 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=100), min_size=2, max_size=80), st.floats(min_value=0.5, max_value=10))
def test_hysteresis_properties(levels, delay):
    """Never below what is needed; down steps at least `delay` apart; each down step to a count that the whole
    window fitted with the band to spare."""
    band, per = 0.1, 16.0
    h = Hysteresis(delay, band)
    downs = []
    last = None
    window = []
    for i, required in enumerate(levels):
        t = float(i)
        needed = math.ceil(required / per - 1e-6) if required > 1e-9 else 0
        with_band = math.ceil(required / (per * (1 - band)) - 1e-6) if required > 1e-9 else 0
        window.append((t, with_band))
        d = h.step(needed, with_band, t, current=0)
        assert d >= needed
        if last is not None and d < last:
            downs.append(t)
            assert all(n <= d for s, n in window if s > t - delay + 1e-9)
        last = d
    assert all(b - a >= delay - 1e-9 for a, b in zip(downs, downs[1:]))
