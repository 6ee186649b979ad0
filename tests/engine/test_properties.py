"""Invariants of the engine under random traffic, classes and capacity changes (hypothesis)."""

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from extproc.config import RESERVED_CLASSES
from extproc.engine import Engine, Verdict
from extproc.engine.state import Lifecycle

from .harness import config, ent_doc, pool_doc

CLASSES = ["dedicated", "guaranteed", "elastic", "spot", "preemptible"]


@st.composite
def configs(draw):
    conc = draw(st.integers(2, 16))
    kv = draw(st.integers(conc * 64, conc * 1024))
    tps = draw(st.floats(100, 2000))
    pool = pool_doc(
        tps=tps,
        conc=conc,
        kv=kv,
        replicas=draw(st.integers(1, 3)),
        queue={"maxQueued": draw(st.integers(0, 20)), "maxQueuedPerEntitlement": draw(st.integers(0, 8))},
        lendReserved=draw(st.sampled_from(["preemptible", "idle"])),
    )
    ents = []
    for i in range(draw(st.integers(1, 6))):
        cls = draw(st.sampled_from(CLASSES))
        resources = burst = None
        if cls in ("dedicated", "guaranteed", "elastic"):
            resources = {"concurrency": draw(st.integers(1, conc))}
            if draw(st.booleans()):
                resources["tokensPerSecond"] = draw(st.floats(10, tps))
        elif draw(st.booleans()):
            burst = {"concurrency": draw(st.integers(1, conc * 2))}
        ents.append(ent_doc(f"e{i}", cls, slo=draw(st.sampled_from([100, 500, 5000, 30000])),
                            resources=resources, burst=burst))
    return config(pool, *ents)


class EngineMachine(RuleBasedStateMachine):
    @initialize(cfg=configs(), shrink=st.booleans())
    def setup(self, cfg, shrink):
        self.cfg = cfg
        self.engine = Engine(cfg, 0.0)
        self.pool = self.engine.pools["pool"]
        self.now = 0.0
        self.n = 0
        self.live: set[str] = set()  # admitted, not yet ended
        self.waiting: set[str] = set()
        self.ended: set[str] = set()
        self.shrink_allowed = shrink
        self.shrunk = False
        self.promised = 0

    def _events(self, ev):
        for rid in ev.admitted:
            self.waiting.discard(rid)
            self.live.add(rid)
        for d in ev.rejected:
            self.waiting.discard(d.request_id)
            self.ended.add(d.request_id)
        for rid in ev.evicted:
            self.live.discard(rid)
            self.ended.add(rid)
        if ev.admitted:
            self._within_capacity()

    def _within_capacity(self):
        p = self.pool
        assert p.used_conc <= p.cap_conc and p.used_kv <= p.cap_kv + 1e-6, "admission over-committed the pool"

    @rule(data=st.data(), inp=st.integers(0, 600) | st.integers(0, 40), out=st.integers(1, 600) | st.integers(1, 40))
    def admit(self, data, inp, out):
        name = data.draw(st.sampled_from(sorted(self.engine.ents)))
        e = self.engine.ents[name]
        p = self.pool
        kv = inp + out
        # Is this a guaranteed request within baseline that the issue promises to admit at once?
        if e.bucket is not None:
            e.bucket.refill(self.now)
        promised = (
            e.cls.value == "guaranteed"
            and e.lifecycle is Lifecycle.BOUND
            and not e.queue
            and p.strict
            and not self.shrunk
            and e.in_flight + 1 <= e.b_conc
            and e.kv + kv <= e.b_kv
            and e.bucket.can_take(kv)
            and kv <= p.cap_kv
        )
        self.n += 1
        rid = f"r{self.n}"
        d = self.engine.admit(rid, name, inp, out, self.now)
        for victim in d.evict:
            assert victim in self.live
            self.live.discard(victim)
            self.ended.add(victim)
        if promised:
            self.promised += 1
            assert d.verdict is Verdict.ADMIT, (d, self.engine.snapshot(self.now)["pools"])
        if d.verdict is Verdict.ADMIT:
            self.live.add(rid)
            self._within_capacity()
        elif d.verdict is Verdict.QUEUE:
            self.waiting.add(rid)
            assert d.deadline is not None and d.deadline > self.now
        else:
            self.ended.add(rid)
            assert d.reason is not None
            assert d.retry_after is None or (d.retry_after >= 0 and math.isfinite(d.retry_after))

    @precondition(lambda self: self.live)
    @rule(data=st.data(), frac=st.floats(0, 1.5))
    def finish(self, data, frac):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        r = self.engine.inflight[rid]
        before = self.engine.released_total
        self._events(self.engine.finish(rid, r.input_tokens, int(r.max_tokens * min(frac, 1.0)), self.now))
        assert self.engine.released_total == before + 1
        self.live.discard(rid)
        self.ended.add(rid)

    @precondition(lambda self: self.live or self.waiting)
    @rule(data=st.data())
    def release(self, data):
        rid = data.draw(st.sampled_from(sorted(self.live | self.waiting)))
        before = self.engine.released_total
        self._events(self.engine.release(rid, self.now))
        assert self.engine.released_total == before + (1 if rid in self.live else 0)
        self.live.discard(rid)
        self.waiting.discard(rid)
        self.ended.add(rid)

    @precondition(lambda self: self.ended)
    @rule(data=st.data())
    def release_again(self, data):
        rid = data.draw(st.sampled_from(sorted(self.ended)))
        before = (self.engine.released_total, self.engine.duplicate_releases)
        self._events(self.engine.release(rid, self.now))
        assert self.engine.released_total == before[0]
        assert self.engine.duplicate_releases == before[1] + 1

    @precondition(lambda self: self.live)
    @rule(data=st.data(), frac=st.floats(0, 1))
    def progress(self, data, frac):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        r = self.engine.inflight[rid]
        self.engine.progress(rid, int(r.max_tokens * frac), self.now)

    @rule(dt=st.floats(0.001, 4))
    def tick(self, dt):
        self.now += dt
        self._events(self.engine.tick(self.now))

    @rule(replicas=st.integers(0, 4))
    def set_replicas(self, replicas):
        if replicas < self.pool.replicas:
            if not self.shrink_allowed:
                return
            self.shrunk = True
        self._events(self.engine.set_replicas("pool", replicas, self.now))

    @invariant()
    def books_balance(self):
        if not hasattr(self, "engine"):
            return
        eng = self.engine
        eng.check_invariants()
        assert set(eng.inflight) == self.live
        assert set(eng.waiting) == self.waiting
        q = self.pool.spec.queue
        assert self.pool.queued <= q.max_queued
        assert all(len(e.queue) <= q.max_queued_per_entitlement for e in self.pool.ents)

    @invariant()
    def debt_and_burst_bounded(self):
        if not hasattr(self, "engine"):
            return
        per = self.pool.spec.per_replica
        caps = (per.tokens_per_second * 4, per.kv_cache_tokens * 4, per.concurrency * 4)  # replicas <= 4
        for e in self.engine.ents.values():
            assert e.burst >= 0.0
            if e.bucket is None:
                assert e.debt == 0.0
                continue
            base = (e.b_tps, e.b_kv, e.b_conc)
            m = max(c / b for c, b, on in zip(caps, base, e.measured) if on and b > 0)
            assert 1.0 - m - 1e-9 <= e.debt <= 1.0 + 1e-9, (e.name, e.debt, m)

    def teardown(self):
        if not hasattr(self, "engine"):
            return
        for rid in sorted(self.live | self.waiting):
            self.engine.release(rid, self.now)
        eng = self.engine
        eng.check_invariants()
        assert eng.reserved_total == eng.released_total
        assert self.pool.used_conc == 0 and self.pool.used_kv == 0 and self.pool.queued == 0
        assert all(e.in_flight == 0 and e.kv == 0 for e in eng.ents.values())


TestEngineMachine = EngineMachine.TestCase
TestEngineMachine.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@settings(max_examples=60, deadline=None)
@given(cfg=configs(), ops=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 400), st.floats(0, 2)), max_size=80))
def test_same_inputs_same_decisions(cfg, ops):
    def run():
        eng = Engine(cfg, 0.0)
        names = sorted(eng.ents)
        now, out, n = 0.0, [], 0
        for kind, size, dt in ops:
            now += dt
            if kind <= 2:
                n += 1
                d = eng.admit(f"r{n}", names[size % len(names)], size, 1 + size // 2, now)
                out.append((d.verdict, d.reason, d.retry_after, d.evict))
            elif kind == 3 and eng.inflight:
                rid = sorted(eng.inflight)[size % len(eng.inflight)]
                ev = eng.finish(rid, None, size // 3, now)
                out.append((ev.admitted, [x.request_id for x in ev.rejected], ev.evicted))
            else:
                ev = eng.tick(now)
                out.append((ev.admitted, [x.request_id for x in ev.rejected], ev.evicted))
        out.append(eng.snapshot(now))
        return out

    assert run() == run()


def test_reserved_classes_are_the_documented_ones():
    assert {c.value for c in RESERVED_CLASSES} == {"dedicated", "guaranteed"}


@st.composite
def guarantee_cases(draw):
    """A pool with one guaranteed entitlement `g` whose reserved sum fits, amid random other classes."""
    conc = draw(st.integers(4, 16))
    g_conc = draw(st.integers(1, conc // 2))
    docs = [
        pool_doc(tps=480, conc=conc, kv=conc * 512),
        ent_doc("g", "guaranteed", slo=500, resources={"concurrency": g_conc}),
    ]
    if draw(st.booleans()):
        docs.append(ent_doc("d", "dedicated", slo=1000, resources={"concurrency": draw(st.integers(1, conc - g_conc))}))
    for i, cls in enumerate(draw(st.lists(st.sampled_from(["elastic", "spot", "preemptible"]), min_size=1, max_size=4))):
        res = {"concurrency": draw(st.integers(1, conc))} if cls == "elastic" else None
        docs.append(ent_doc(f"{cls}{i}", cls, slo=draw(st.sampled_from([100, 5000])), resources=res))
    ops = draw(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 200), st.floats(0, 0.5)), min_size=40, max_size=120))
    return config(*docs), g_conc, ops


@settings(max_examples=200, deadline=None)
@given(case=guarantee_cases())
def test_guaranteed_within_baseline_is_admitted_whatever_others_do(case):
    cfg, g_conc, ops = case
    eng = Engine(cfg, 0.0)
    others = sorted(n for n in eng.ents if n != "g")
    g = eng.ents["g"]
    now, n, checked = 0.0, 0, 0
    for kind, size, dt in ops:
        now += dt
        n += 1
        if kind <= 4:  # others: as much traffic as they like
            eng.admit(f"o{n}", others[size % len(others)], size % 64, 1 + size % 32, now)
        elif kind <= 6:  # g, only within its baseline
            g.bucket.refill(now)
            if g.in_flight < g_conc and g.bucket.can_take(8) and not g.queue:
                d = eng.admit(f"g{n}", "g", 4, 4, now)
                assert d.verdict is Verdict.ADMIT, (d, eng.snapshot(now))
                checked += 1
        elif kind == 7 and eng.inflight:
            eng.finish(sorted(eng.inflight)[size % len(eng.inflight)], None, size % 16, now)
        else:
            eng.tick(now)
        eng.check_invariants()
