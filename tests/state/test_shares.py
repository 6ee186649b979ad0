"""The pure half (targets, priority merge), the store options, and the Lua lease script driven directly."""

from __future__ import annotations

import asyncio
import random
import time

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.engine import Engine
from extproc.state import MemoryStore, open_store
from extproc.state.redis_store import LEASE_LUA, RedisStore, parse_url
from extproc.state.shares import POOL, PRIOR, EntObs, Observer, PoolObs, expect_equal, merge_priorities, targets

from .harness import mixed_config


def _obs(ents: dict[str, tuple[float, bool]]) -> dict[str, PoolObs]:
    """A pool observation with entitlements name -> (baseline fraction, held when idle)."""
    po = PoolObs(1.0, 0.0)
    for name, (frac, holds) in ents.items():
        po.ents[name] = EntObs(1.0, 0.0, frac, holds)
        po.idle_hold += frac if holds else 0.0
    return {"p": po}


demands = st.dictionaries(st.sampled_from(["g", "e", "s"]), st.one_of(st.just(0.0), st.floats(1e-3, 100)), max_size=3)


@settings(max_examples=300, deadline=None)
@given(st.lists(demands, min_size=1, max_size=5), st.booleans())
def test_targets_of_all_replicas_sum_to_one(per_replica, g_holds):
    """Seen from the same demands, the replicas' targets split every key exactly; an entitlement nobody asks
    for follows the pool (no key of its own) on every replica alike."""
    obs = _obs({"g": (0.3, g_holds), "e": (0.2, False), "s": (0.0, False)})
    ts = []
    for i, mine in enumerate(per_replica):
        others = [{"p": d} for j, d in enumerate(per_replica) if j != i]
        t, follow = targets({"p": mine}, others, obs)
        assert follow == {"p": set()}  # shares applied all equal the pool's here: nothing to bring back
        ts.append(t["p"])
    for key in ("g", "e", "s", POOL):
        asked = any(d.get(key, 0) > 0 for d in per_replica)
        if key != POOL and not asked:
            assert all(key not in t for t in ts)
            continue
        assert sum(t[key] for t in ts) == pytest.approx(1.0, abs=1e-9), (key, ts)
    assert all(0 <= t[key] <= 1 for t in ts for key in t)


def test_targets_follow_demand_with_an_equal_prior():
    obs = _obs({"g": (0.5, True)})
    mine = targets({"p": {"g": 10}}, [{"p": {}}, {"p": {}}], obs)[0]["p"]
    idle = targets({"p": {}}, [{"p": {"g": 10}}, {"p": {}}], obs)[0]["p"]
    assert mine["g"] == pytest.approx(PRIOR / 3 + 1 - PRIOR)  # the tenant's traffic is here: ~all of its baseline
    assert idle["g"] == pytest.approx(PRIOR / 3)
    # Pool: the replica with the demand holds its part of g's baseline plus the unreserved half split by demand.
    assert mine[POOL] == pytest.approx(0.5 * mine["g"] + 0.5 * mine["g"])
    # Nobody asks: g follows the pool share (held in proportion to it), the pool is split equally.
    assert targets({"p": {}}, [{"p": {}}], obs)[0]["p"] == {POOL: 0.5}
    # g still holds a share of its own but nobody asks any more: brought back to the pool share first.
    obs["p"].ents["g"].applied = 0.9
    t, follow = targets({"p": {}}, [{"p": {}}], obs)
    assert follow == {"p": {"g"}} and t["p"]["g"] == t["p"][POOL]


def test_merge_priorities_is_the_share_weighted_mean():
    records = [
        ({"p": {POOL: 0.5, "g": 0.75}}, {"p": {"g": [0.4, 1.0]}}),
        ({"p": {POOL: 0.5, "g": 0.25}}, {"p": {}}),  # zero debt and burst here (sparse: absent)
    ]
    merged = merge_priorities(records)
    assert merged["p"]["g"] == pytest.approx([0.3, 0.75])


def test_observer_reads_shares_use_fractions_and_demand():
    cfg = mixed_config()
    eng = Engine(cfg, 0.0)
    ob = Observer()
    assert ob.observe(eng)["pool"].ents == {}  # nothing busy, every share the pool's: nothing to report
    eng.set_shares("pool", 0.5, {"g": 0.25}, 0.0)
    eng.admit("r1", "g", 100, 100, 0.0)
    eng.admit("r2", "s", 100, 100, 0.0)
    obs = ob.observe(eng)
    po = obs["pool"]
    assert po.applied == 0.5 and po.idle_hold == pytest.approx(10 / 32)  # g: guaranteed, held while idle
    assert po.used == pytest.approx(max(2 / 32, 400 / 16384))
    assert set(po.ents) == {"g"}  # spot without ceilings has no share of its own (it follows the pool)
    g = po.ents["g"]
    assert (g.applied, g.frac, g.holds_idle) == (0.25, pytest.approx(10 / 32), True)
    assert g.used == pytest.approx(1 / 10)
    assert ob.demand["pool"] == {"g": 1.0, "s": 1.0}  # EWMA (γ = 0.5) of 1 in flight + 1 arrival each
    eng.finish("r1", 100, 100, 1.0)
    eng.set_shares("pool", 0.5, {}, 1.0)
    assert set(ob.observe(eng)["pool"].ents) == {"g"}  # idle, but its demand has not decayed yet
    ob.include(eng, obs, {"pool": {"el", "s", "nope"}})  # asked for elsewhere: el gets an entry (s: no ceilings)
    assert "el" in obs["pool"].ents and "s" not in obs["pool"].ents


def test_deferred_shares_are_claimed_before_they_are_applied():
    """set_shares(defer=True) keeps the control step off the admission path: the capacity moves at the pool's
    next control period, and until then the observer claims the larger of the applied and the pending share
    (a claim lower than what the engine will apply would let other replicas take the same room)."""
    cfg = mixed_config()
    eng = Engine(cfg, 0.0)
    p = eng.pools["pool"]
    cap = p.cap_conc
    eng.set_shares("pool", 0.5, {"g": 0.25}, 0.0)
    eng.set_shares("pool", 0.8, {"g": 0.6}, 0.2, defer=True)
    assert p.share == 0.5 and p.cap_conc == cap * 0.5 and eng.ents["g"].share == 0.25  # not yet
    po = Observer().observe(eng)["pool"]
    assert po.applied == 0.8 and po.ents["g"].applied == 0.6  # but claimed already
    eng.set_shares("pool", 0.3, {}, 0.4, defer=True)  # a smaller one replaces it: the claim stays the applied
    po = Observer().observe(eng)["pool"]
    assert po.applied == 0.5 and po.ents["g"].applied == 0.3
    eng.tick(1.0)  # the period's control step applies it
    assert p.share == 0.3 and p.cap_conc == cap * 0.3 and eng.ents["g"].share == 0.3 and p.pending_shares is None
    eng.check_invariants()


def test_deferred_priorities_move_weights_at_once_and_allocations_at_the_period():
    cfg = mixed_config()
    eng = Engine(cfg, 0.0)
    el = eng.ents["el"]
    w0 = el.weight
    eng.set_priorities("pool", {"el": (0.5, 0.0)}, 0.1, defer=True)
    assert el.debt == 0.5 and el.weight > w0  # ranks by the pool-wide debt now
    eng.set_priorities("pool", {"el": (0.0, 0.0)}, 0.2)  # immediate: the control step recomputes all weights
    assert el.weight == pytest.approx(w0)


def test_open_store_and_url_options():
    assert isinstance(open_store(None), MemoryStore) and isinstance(open_store("memory"), MemoryStore)
    with pytest.raises(ValueError):
        open_store("etcd://x")
    url, opts = parse_url("redis://h:1/2?interval=0.5&lease=2&fail_share=0.25&health_check_interval=3&replica=r")
    assert url == "redis://h:1/2?health_check_interval=3"
    assert opts == {"interval": "0.5", "lease": "2", "fail_share": "0.25", "replica": "r"}
    s = open_store("redis://h:1/2?interval=0.5&lease=2&fail_share=0.25&replica=r&prefix=x")
    assert isinstance(s, RedisStore)
    assert (s.interval, s.lease, s.fail_share, s.replica_id, s.keys[0]) == (0.5, 2.0, 0.25, "r", "{x}:claims")
    assert open_store("redis://h:1/0").lease == 3.0  # 3 × the interval (1 s until the engine's period is known)


def test_memory_store_holds_the_whole_pool():
    async def main():
        store = MemoryStore()
        eng = Engine(mixed_config(), 0.0)
        await store.start(eng, 0.0)
        assert not await store.sync(1.0)
        return store.status(), eng.pools["pool"].share

    status, share = asyncio.run(main())
    assert share == 1.0 and status["mode"] == "memory"


@pytest.mark.integration
def test_lua_lease_never_grants_beyond_the_room(redis_server):
    """Random replicas following the protocol (report applied, apply the grant, use at most the grant) against
    the script itself: Σ claims ≤ 1 after every call, usage always within a replica's claim, expired replicas
    dropped, probation holds a (re)joining replica at what it applied."""
    import redis

    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    script = r.register_script(LEASE_LUA)
    keys = ["{t}:claims", "{t}:info", "{t}:leader", "{t}:prio"]
    rng = random.Random(7)
    applied = {f"r{i}": 0.0 for i in range(4)}
    used = dict.fromkeys(applied, 0.0)

    def call(me: str, target: float, ttl: int) -> dict:
        req = {"t": {"p": {POOL: [target, applied[me], used[me]]}}}
        return orjson.loads(script(keys=keys, args=[me, ttl, orjson.dumps(req).decode(), "{}", ""]))

    try:
        t0 = time.monotonic()  # everybody joins and sits out its probation (one lease: 0.3 s) at share 0
        while time.monotonic() < t0 + 0.35:
            for me in applied:
                early = time.monotonic() < t0 + 0.25
                res = call(me, 1.0 if early else 0.0, 300)
                assert res["g"]["p"][POOL] == 0.0 and (res["probation"] or not early)
            time.sleep(0.01)
        raised = 0
        for step in range(400):
            me = rng.choice(list(applied))
            target = rng.random()
            res = call(me, target, 300)
            grant = res["g"]["p"][POOL]
            assert not res["probation"] and grant <= target + 1e-12
            raised += grant > applied[me]
            applied[me] = grant
            if rng.random() < 0.5:  # its requests drained; new ones fill the new share (saturated)
                used[me] = grant
            # else: still draining what it admitted before (possibly more than the new share)
            recs = {k: orjson.loads(v) for k, v in r.hgetall(keys[0]).items()}
            assert sum(rec["c"]["p"][POOL] for rec in recs.values()) <= 1 + 1e-9, (step, recs)
            assert sum(used.values()) <= 1 + 1e-9, (step, used, recs)  # what the replicas really hold
        assert raised > 50  # the room was really used
        # After a loss of all records (a Redis restart), re-joining replicas hold at what they applied.
        r.delete(keys[0])
        for me in applied:
            res = call(me, 1.0, 60_000)
            assert res["probation"] and res["g"]["p"][POOL] <= applied[me] + 1e-12
            applied[me] = 0.0
        for me in applied:
            assert call(me, 1.0, 60_000)["g"]["p"][POOL] == 0.0
        assert all(v == 0.0 for v in applied.values())  # joined during probation at 0: still 0
        # An expired record is removed by the next caller, and its claim no longer counts.
        r.hset(keys[0], "ghost", orjson.dumps({"exp": 0, "since": 0, "c": {"p": {POOL: 1.0}}, "g": {}}).decode())
        script(keys=keys, args=["r0", 1000, orjson.dumps({"t": {"p": {POOL: [0.5, 0, 0]}}}).decode(), "{}", ""])
        assert "ghost" not in r.hgetall(keys[0])
    finally:
        r.close()


def test_a_warming_replica_counts_as_at_least_an_equal_part_of_the_demand():
    a = {"p": {"x": 4.0, "y": 2.0}}
    b = {"p": {"x": 2.0}}
    new = {"p": {"y": 5.0}}  # just ready: little demand yet, except y, where it already has more than the mean
    out = expect_equal([a, b, new], [False, False, True])
    assert out[0] is a and out[1] is b  # the settled ones are untouched
    assert out[2] == {"p": {"x": 3.0, "y": 5.0}}  # x: the mean of a and b; y: its own, above the mean (1.0)
    assert expect_equal([a, b], [False, False]) == [a, b]  # nobody warming
    assert expect_equal([a, new], [True, True]) == [a, new]  # everybody warming (a fresh start): no mean to use
    # Every replica computes its targets from the same substituted snapshot: they still sum to 1.
    obs = {"p": PoolObs(applied=0.3, used=0.0)}
    demands = expect_equal([a, b, new], [False, False, True])
    total = sum(targets(demands[i], demands[:i] + demands[i + 1:], obs)[0]["p"][POOL] for i in range(3))
    assert abs(total - 1.0) < 1e-9, total
