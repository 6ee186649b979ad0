"""The paper's experiments at engine level, in virtual time (qualitative results of §5.2 and §5.3)."""

import random

from extproc.engine import Engine

from .harness import Scenario, Tenant, config, ent_doc, pool_doc

DURATION = 128 / 30  # 64 + 64 tokens at 480/16 = 30 tokens/s per sequence


def exp1(**control):
    pool = pool_doc(tps=480, conc=16, **control)
    a = ent_doc("guaranteed-a", "guaranteed", slo=500, resources={"concurrency": 6})
    b = ent_doc("spot-b", "spot", slo=5000, burst={"concurrency": 10})
    c = ent_doc("guaranteed-c", "guaranteed", slo=500, resources={"concurrency": 6})
    without_c, with_c = config(pool, a, b), config(pool, a, b, c)
    engine = Engine(without_c, 0.0)
    sc = Scenario(
        engine,
        [Tenant("guaranteed-a", 6, 0, 90), Tenant("spot-b", 10, 0, 90), Tenant("guaranteed-c", 6, 30, 60)],
        horizon=90,
    )
    sc.at(30, lambda t: engine.apply(with_c, t))  # c's entitlement exists from 30 s to 60 s
    sc.at(60, lambda t: engine.apply(without_c, t))
    return sc.run()


def test_exp1_guaranteed_never_rejected_and_spot_squeezed_then_recovers():
    sc = exp1()
    # Guaranteed tenants never ask beyond their concurrency, so none of their requests may be refused.
    assert sc.rejections("guaranteed-a") == []
    assert sc.rejections("guaranteed-c") == []
    # a's baseline is held for it: it never waits, not even while c arrives and spot is squeezed.
    assert max(sc.waits("guaranteed-a", 0, 90)) == 0.0
    # c arrives while spot holds 10 slots: it waits at most for spot requests to drain (one request time).
    assert max(sc.waits("guaranteed-c", 30, 60)) <= DURATION + 1e-6
    assert max(sc.waits("guaranteed-c", 30 + DURATION + 0.1, 60)) == 0.0
    # Spot fills what is free (work-conserving), is squeezed to 16 - 6 - 6 while c is there, recovers after.
    assert sc.mean_in_flight("spot-b", 5, 30) >= 9.9
    assert sc.mean_in_flight("spot-b", 30 + DURATION + 0.1, 60) <= 4.0 + 1e-9
    assert sc.mean_in_flight("spot-b", 60 + DURATION + 0.1, 90) >= 9.9
    # Spot was throttled with 429s (not queued forever), and the pool stayed full.
    assert len(sc.rejections("spot-b", 30, 60)) > 0
    # The pool stays full, except right after c leaves: spot's users were told (truthfully, at the time) to
    # come back after a request time, and an entitlement's removal is not something Retry-After can foresee.
    total = [sum(s[1].values()) for s in sc.samples if 5 <= s[0] < 60 or 60 + DURATION <= s[0] < 88]
    assert min(total) >= 15


def exp2(seed=7):
    pool = pool_doc(tps=480, conc=8, kv=16384, replicas=2)
    copilot = ent_doc("copilot", "elastic", slo=500, resources={"concurrency": 5})
    synth = ent_doc("synth", "elastic", slo=30000, resources={"concurrency": 5})
    reports = ent_doc("reports", "elastic", slo=5000, resources={"concurrency": 5})
    engine = Engine(config(pool, copilot, synth, reports), 0.0)
    rng = random.Random(seed)
    lengths = [rng.randint(32, 176) for _ in range(100_000)]
    tenants = [
        Tenant("copilot", 5, 0, 300, lengths.__getitem__, lambda n: lengths[-n]),
        Tenant("synth", 5, 0, 300, lengths.__getitem__, lambda n: lengths[-n]),
        Tenant("reports", 5, 210, 300, lengths.__getitem__, lambda n: lengths[-n]),
    ]
    sc = Scenario(engine, tenants, horizon=300)
    sc.at(30, lambda t: engine.set_replicas("pool", 1, t))  # capacity halved 30-120 s
    sc.at(120, lambda t: engine.set_replicas("pool", 2, t))
    return sc.run()


def test_exp2_debt_rises_for_the_under_served_and_decays_after_recovery():
    sc = exp2()
    # Before the outage there is room for everyone: no debt.
    assert abs(sc.debt_at("synth", 29)) < 0.05 and abs(sc.debt_at("copilot", 29)) < 0.05
    # During the outage the loose-SLO tenant is shrunk first and accrues debt; the tight one keeps its share.
    assert sc.debt_at("synth", 110) > 0.2
    assert abs(sc.debt_at("copilot", 110)) < 0.05
    assert sc.mean_in_flight("copilot", 40, 120) > sc.mean_in_flight("synth", 40, 120)
    # Both get their full baseline back after recovery, and the debt decays.
    recovered = next(t for t, d in sc.debts if t > 120 and abs(d["synth"]) < 0.05)
    assert recovered - 120 < 30
    assert abs(sc.debt_at("synth", 200)) < 0.05
    # reports joins at 210: 15 slots of baseline fit in 16, so nobody is under-served.
    assert all(abs(sc.debt_at(n, 290)) < 0.05 for n in ("copilot", "synth", "reports"))
    assert sc.mean_in_flight("reports", 215, 300) > 4.5
