"""Scale from zero: with an autoscaler attached, a request for a pool at zero replicas waits for the first one."""

from extproc.engine import Engine, Lifecycle, Reason, Verdict

from .harness import config, ent_doc, pool_doc


def engine(*ents, autoscaled=True, **pool):
    eng = Engine(config(pool_doc(replicas=0, **pool), *ents), 0.0)
    if autoscaled:
        eng.autoscaled.add("pool")
    return eng


def test_without_an_autoscaler_zero_replicas_is_503_at_once():
    eng = engine(ent_doc("s", "spot"), autoscaled=False)
    d = eng.admit("1", "s", 10, 10, 0.0)
    assert d.verdict is Verdict.REJECT and d.reason is Reason.NO_CAPACITY and d.retry_after == 30.0
    assert eng.pools["pool"].queued == 0


def test_request_waits_for_the_first_replica_and_is_admitted_when_it_comes():
    eng = engine(ent_doc("s", "spot"), ent_doc("e", "elastic", resources={"concurrency": 4}), kv=1000)
    d = eng.admit("1", "s", 10, 10, 0.0)
    assert d.verdict is Verdict.QUEUE and d.reason is Reason.NO_CAPACITY
    assert d.retry_after == 30.0 and d.deadline == 10.0  # scaleUpSeconds; queue.timeoutSeconds
    d2 = eng.admit("2", "e", 10, 10, 0.5)
    assert d2.verdict is Verdict.QUEUE and d2.reason is Reason.NO_CAPACITY
    assert eng.pools["pool"].queued == 2
    assert not eng.tick(1.0).admitted  # nothing runs at zero replicas
    eng.check_invariants()
    ev = eng.set_replicas("pool", 1, 2.0)
    assert sorted(ev.admitted) == ["1", "2"] and not ev.rejected
    assert eng.pools["pool"].queued == 0 and eng.pools["pool"].used_conc == 2
    eng.check_invariants()


def test_no_replica_before_the_deadline_is_a_429_with_the_scale_up_time():
    eng = engine(ent_doc("s", "spot"), queue={"timeoutSeconds": 2})
    assert eng.admit("1", "s", 10, 10, 0.0).verdict is Verdict.QUEUE
    ev = eng.tick(2.5)
    assert [d.request_id for d in ev.rejected] == ["1"]
    assert ev.rejected[0].reason is Reason.QUEUE_TIMEOUT and ev.rejected[0].retry_after == 30.0
    eng.check_invariants()


def test_what_cannot_wait_is_refused_at_once():
    # Larger than one replica's KV: no single replica could run it.
    eng = engine(ent_doc("s", "spot"), kv=1000)
    d = eng.admit("1", "s", 990, 20, 0.0)
    assert d.verdict is Verdict.REJECT and d.reason is Reason.NO_CAPACITY
    # Queueing disabled, or the queue full: 503 as before.
    eng = engine(ent_doc("s", "spot"), queue={"timeoutSeconds": 0})
    assert eng.admit("1", "s", 10, 10, 0.0).reason is Reason.NO_CAPACITY
    eng = engine(ent_doc("s", "spot"), queue={"maxQueued": 1})
    assert eng.admit("1", "s", 10, 10, 0.0).verdict is Verdict.QUEUE
    d = eng.admit("2", "s", 10, 10, 0.0)
    assert d.verdict is Verdict.REJECT and d.reason is Reason.NO_CAPACITY and d.retry_after == 30.0
    # A pool whose max is zero never gets a replica.
    eng = Engine(config({**pool_doc(replicas=0), "spec": {**pool_doc()["spec"], "replicas": {"min": 0, "max": 0, "current": 0}}},
                        ent_doc("s", "spot")), 0.0)
    eng.autoscaled.add("pool")
    assert eng.admit("1", "s", 10, 10, 0.0).verdict is Verdict.REJECT


def test_a_pending_reservation_is_still_not_bound():
    eng = engine(ent_doc("g", "guaranteed", resources={"concurrency": 4}))
    assert eng.ents["g"].lifecycle is Lifecycle.PENDING
    assert eng.admit("1", "g", 10, 10, 0.0).reason is Reason.NOT_BOUND
    eng.set_replicas("pool", 1, 1.0)
    assert eng.ents["g"].lifecycle is Lifecycle.BOUND
    # Bound now (its token bucket starts empty, so the first request may wait for a refill, not a 403).
    assert eng.admit("2", "g", 10, 10, 1.0).verdict in (Verdict.ADMIT, Verdict.QUEUE)
