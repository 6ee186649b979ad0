"""The pure part of shared state: what a replica reads from its engine, and how a pool is split among replicas.

No I/O and no clock here (like the engine): `observe` reads an engine, `targets` and `merge_priorities` are
functions of numbers. The Redis store (redis_store.py) moves these numbers between replicas and enforces the
one rule that keeps several replicas inside the pool's capacity (Σ claims ≤ 1, atomically, in Lua).

Units: every share is a fraction of the *whole* pool (or of an entitlement's whole baseline and ceilings), so
shares stay valid when the autoscaler changes the number of backend replicas.

Keys: the pool itself is the key "" ; an entitlement is its name. Only entitlements whose share limits
something (a baseline, or a finite ceiling) get keys of their own; the others follow the pool share (what the
engine's set_shares does when an entitlement is not named).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config.documents import BASELINE_CLASSES

POOL = ""  # the key of the pool's own share
PRIOR = 0.1  # β: weight of the equal split in a replica's target (the rest follows its recent demand)
DEMAND_GAMMA = 0.5  # EWMA of the demand samples, per sync
# An engine never gets share 0: that would read as "the pool has no replicas" (503, Retry-After = scale-up
# time). A tiny share admits nothing (less than one sequence) and answers 429 with a real Retry-After.
MIN_SHARE = 1e-6
# The sync's passes over entitlements pause every SLICE of them, so that requests arriving meanwhile wait for one
# slice (~0.1 ms of Python), not for a whole pass over thousands of entitlements (milliseconds).
SLICE = 200


def drain(steps):
    """Run a *_steps generator to its end without pausing; return its value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


@dataclass
class EntObs:
    """One entitlement as this replica sees it now."""

    applied: float  # the share its engine applies now
    used: float  # in-flight use as a fraction of its whole ceilings (concurrency, KV); 0 when it has none
    frac: float  # its whole baseline as a fraction of the whole pool (max over dimensions); 0 for spot
    holds_idle: bool  # its baseline is held even while it is idle (dedicated/guaranteed, lendReserved preemptible)
    debt: float = 0.0
    burst: float = 0.0


@dataclass
class PoolObs:
    applied: float  # the pool share its engine applies now
    used: float  # in-flight use as a fraction of the whole pool (max of concurrency and KV)
    # Constrained entitlements worth a look (sparse): busy here, holding a share other than the pool's, carrying
    # debt or burst, or (added by Observer.include) asked for on another replica.
    ents: dict[str, EntObs] = field(default_factory=dict)
    idle_hold: float = 0.0  # Σ baseline fraction of all constrained entitlements that hold it while idle


class _Static:
    """What does not change while the config and the pool's replica count stay the same."""

    __slots__ = ("spec", "replicas", "frac", "ceil_conc", "ceil_kv", "constrained", "holds_idle")

    def __init__(self, p, e, full_tps: float, full_kv: float, full_conc: float) -> None:
        s = e.share if e.share > 0 else MIN_SHARE
        self.spec = e.spec
        self.replicas = p.replicas
        self.frac = 0.0
        if e.cls in BASELINE_CLASSES:
            self.frac = max(_frac(e.b_tps / s, full_tps), _frac(e.b_kv / s, full_kv), _frac(e.b_conc / s, full_conc))
        self.ceil_conc = e.c_conc / s if math.isfinite(e.c_conc) else None
        self.ceil_kv = e.c_kv / s if math.isfinite(e.c_kv) else None
        self.constrained = self.frac > 0 or self.ceil_conc is not None or self.ceil_kv is not None or e.ceiling is not None
        self.holds_idle = e.reserved and p.strict


class Observer:
    """Reads (never changes) an engine once per sync: shares applied, use, debt and burst, and this replica's
    recent demand per entitlement: an EWMA of (in flight + queued + arrivals since the last sync), whose unit
    does not matter (only ratios between replicas are used).

    One pass over each pool's entitlements reading a few counters (cheap at 10,000); an entry in PoolObs.ents
    only for the few that matter this period. Read-only use of the engine's public state attributes."""

    def __init__(self, gamma: float = DEMAND_GAMMA, prio_eps: float = 1e-4) -> None:
        self.gamma = gamma
        self.prio_eps = prio_eps
        self.demand: dict[str, dict[str, float]] = {}  # pool -> entitlement -> EWMA (sparse: ≥ 1e-3)
        self._arrivals: dict[str, dict[str, int]] = {}
        self._static: dict[str, dict[str, _Static]] = {}

    def observe(self, engine) -> dict[str, PoolObs]:
        return drain(self.observe_steps(engine, chunk=0))

    def observe_steps(self, engine, chunk: int = SLICE):
        """observe() as a generator that pauses (yields None) after every `chunk` entitlements (0: never),
        so that a caller on an event loop can let requests in between; returns the observation."""
        g, eps = self.gamma, self.prio_eps
        seen = 0
        out: dict[str, PoolObs] = {}
        for pname, p in engine.pools.items():
            per = p.spec.per_replica
            kv_per = per.kv_cache_tokens if per.kv_cache_tokens is not None else per.model_geometry.kv_cache_tokens
            full = (p.replicas * per.tokens_per_second, p.replicas * kv_per, p.replicas * per.concurrency)
            # A share the engine has been given but applies only at its next control period (set_shares(defer=True))
            # is claimed already: the claim must cover whatever this engine may hand out before the next sync.
            pending = p.pending_shares
            pool_share = p.share if pending is None else max(p.share, pending[0])
            po = PoolObs(pool_share, max(_frac(p.used_conc, full[2]), _frac(p.used_kv, full[1])))
            dem = self.demand.setdefault(pname, {})
            arrivals = self._arrivals.setdefault(pname, {})
            static = self._static.setdefault(pname, {})
            for e in list(p.ents):
                seen += 1
                if chunk and seen % chunk == 0:
                    yield
                if e.retired:
                    continue
                name = e.name
                st = static.get(name)
                if st is None or st.spec is not e.spec or st.replicas != p.replicas:
                    st = static[name] = _Static(p, e, *full)
                arr = e.admitted_total + e.rejected_total
                waiting = e.in_flight + len(e.queue)
                last = arrivals.get(name)
                arrivals[name] = arr
                old = dem.get(name)
                if waiting or old is not None or (last is not None and arr != last):
                    v = g * (old or 0.0) + (1 - g) * (waiting + (arr - last if last is not None else 0))
                    if v < 1e-3:
                        dem.pop(name, None)
                    else:
                        dem[name] = v
                if not st.constrained:
                    continue
                if st.holds_idle:
                    po.idle_hold += st.frac
                applied = e.share if pending is None else max(e.share, pending[1].get(name, pending[0]))
                if waiting or name in dem or applied != pool_share or abs(e.debt) > eps or e.burst > eps:
                    po.ents[name] = _ent(e, st, applied)
            for name in [n for n in dem if n not in engine.ents or engine.ents[n].pool is not p]:
                del dem[name]  # removed from the config (or moved to another pool)
            out[pname] = po
        return out

    def include(self, engine, obs: dict[str, PoolObs], names: dict[str, set[str]]) -> None:
        """Add entries for entitlements asked for on other replicas (each replica must report a key that
        anyone asks for, so that it can give most of that entitlement's share to where the traffic is)."""
        for pname, wanted in names.items():
            po = obs.get(pname)
            static = self._static.get(pname, {})
            if po is None:
                continue
            for name in wanted:
                if name in po.ents:
                    continue
                e = engine.ents.get(name)
                st = static.get(name)
                if e is None or st is None or e.retired or e.pool.name != pname or not st.constrained:
                    continue
                pending = e.pool.pending_shares
                applied = e.share if pending is None else max(e.share, pending[1].get(name, pending[0]))
                po.ents[name] = _ent(e, st, applied)


def _ent(e, st: _Static, applied: float) -> EntObs:
    u = 0.0
    if st.ceil_conc:
        u = e.in_flight / st.ceil_conc
    if st.ceil_kv:
        u = max(u, e.kv / st.ceil_kv)
    return EntObs(applied, u, st.frac, st.holds_idle, e.debt, e.burst)


def _frac(x: float, whole: float) -> float:
    return x / whole if whole > 0 else 0.0


def expect_equal(demands: list[dict[str, dict[str, float]]], warming: list[bool]) -> list[dict[str, dict[str, float]]]:
    """Demands where each warming replica's counts as at least the mean of the others' (per pool and entitlement).

    A replica that has just become ready has no demand yet, but the load balancer will send it an equal part
    of the traffic, and its demand (in flight + queued + arrivals) takes about a request's length to build up:
    counting the equal part meanwhile puts its share in place before its traffic, so its first requests do
    not queue behind a share of almost nothing. Unchanged when no replica warms, or when all do."""
    settled = [d for d, w in zip(demands, warming) if not w]
    if not settled or len(settled) == len(demands):
        return demands
    mean: dict[str, dict[str, float]] = {}
    for d in settled:
        for pool, ents in d.items():
            acc = mean.setdefault(pool, {})
            for name, v in ents.items():
                acc[name] = acc.get(name, 0.0) + v / len(settled)
    out = []
    for d, w in zip(demands, warming):
        if w:
            d = {pool: {**ents, **{n: max(v, d.get(pool, {}).get(n, 0.0)) for n, v in mean.get(pool, {}).items()}}
                 for pool, ents in {**mean, **d}.items()}  # fmt: skip
        out.append(d)
    return out


def targets(
    mine: dict[str, dict[str, float]],
    others: list[dict[str, dict[str, float]]],
    obs: dict[str, PoolObs],
    prior: float = PRIOR,
) -> tuple[dict[str, dict[str, float]], dict[str, set[str]]]:
    return drain(targets_steps(mine, others, obs, prior, chunk=0))


def targets_steps(
    mine: dict[str, dict[str, float]],
    others: list[dict[str, dict[str, float]]],
    obs: dict[str, PoolObs],
    prior: float = PRIOR,
    chunk: int = SLICE,
):
    """targets() as a generator pausing every `chunk` entitlements (see Observer.observe_steps).

    This replica's wished-for share of every pool and of the entitlements that need one of their own.

    mine / others: demand per pool and entitlement (this replica; each other live replica).
    Returns (targets per pool: POOL and entitlement keys, entitlements per pool that should follow the pool).

    Only entitlements with demand on some replica get a share of their own (sparse: an idle entitlement follows
    the pool share, which is what the engine gives an entitlement set_shares does not name). An entitlement
    that has no demand anywhere but still holds a share of its own is brought back to the pool share first
    (target = the pool's, through the Lua room check), and only dropped once it is there.

    Per entitlement with demand: t = β/N + (1 − β) · my demand / Σ demand, so a tenant whose traffic lands on
    one replica gets (almost) its whole baseline there.
    Per pool: t = (my part of the held baselines + the unreserved rest split by my total demand) / (1 − F_idle),
    where held baselines are those of entitlements with demand, F_idle the baselines of idle dedicated /
    guaranteed entitlements (held in proportion to the pool share itself, hence the division). Summed over
    replicas seeing the same demands every key's targets sum to 1; the Lua side makes sure the *granted*
    shares never sum above 1 whatever the targets say.
    """
    n = len(others) + 1
    out: dict[str, dict[str, float]] = {}
    follow: dict[str, set[str]] = {}
    for pool, po in obs.items():
        md = mine.get(pool, {})
        total = dict(md)
        for o in others:
            for k, v in o.get(pool, {}).items():
                total[k] = total.get(k, 0.0) + v
        t: dict[str, float] = {}
        back: set[str] = set()
        base = f_held = 0.0
        f_idle = po.idle_hold
        for i, (name, eo) in enumerate(po.ents.items(), 1):
            if chunk and i % chunk == 0:
                yield
            s = total.get(name, 0.0)
            if s > 1e-9:
                te = min(1.0, prior / n + (1 - prior) * md.get(name, 0.0) / s)
                t[name] = te
                base += te * eo.frac
                f_held += eo.frac
                if eo.holds_idle:
                    f_idle -= eo.frac  # held as its own share now, not in proportion to the pool's
            elif eo.applied != po.applied:
                back.add(name)
        f_idle = max(0.0, f_idle)
        if f_held + f_idle > 1.0:  # baselines oversubscribe the pool (elastic may): scale them into it
            k = 1.0 / (f_held + f_idle)
            base, f_held, f_idle = base * k, f_held * k, f_idle * k
        m_all = sum(md.values())
        s_all = sum(total.values())
        w = min(1.0, prior / n + (1 - prior) * m_all / s_all) if s_all > 1e-9 else 1.0 / n
        free = max(0.0, 1.0 - f_held - f_idle)
        tp = (base + free * w) / (1.0 - f_idle) if 1.0 - f_idle > 1e-9 else w
        t[POOL] = min(1.0, tp)
        for name in back:
            t[name] = t[POOL]
        out[pool] = t
        follow[pool] = back
    return out, follow


def merge_priorities(
    records: list[tuple[dict[str, dict[str, float]], dict[str, dict[str, list[float]]]]],
) -> dict[str, dict[str, list[float]]]:
    return drain(merge_priorities_steps(records, chunk=0))


def merge_priorities_steps(
    records: list[tuple[dict[str, dict[str, float]], dict[str, dict[str, list[float]]]]], chunk: int = SLICE
):
    """merge_priorities() as a generator pausing every `chunk` entitlements.

    Pool-wide debt and burst per entitlement: the share-weighted mean of every replica's own values.

    records: per live replica (its granted shares per pool and key, its sparse [debt, burst] per pool and
    entitlement; absent = 0). Debt is an EMA of gaps that are linear in use, and each replica's gap is measured
    against its share of the baseline, so Σ share_r · gap_r is the pool-wide gap: the weighted mean of the
    replicas' debts follows the pool-wide EMA. Burst (a sum of max(0, ·)) is approximated the same way.
    """
    out: dict[str, dict[str, list[float]]] = {}
    names: dict[str, set[str]] = {}
    for _, q in records:
        for pool, ents in q.items():
            names.setdefault(pool, set()).update(ents)
    for pool, ents in names.items():
        res: dict[str, list[float]] = {}
        for i, name in enumerate(ents, 1):
            if chunk and i % chunk == 0:
                yield
            wsum = d = b = 0.0
            for grants, q in records:
                g = grants.get(pool)
                if g is None:
                    continue
                w = g.get(name, g.get(POOL, 0.0))
                v = q.get(pool, {}).get(name)
                wsum += w
                if v is not None:
                    d += w * v[0]
                    b += w * v[1]
            if wsum > 0:
                res[name] = [d / wsum, b / wsum]
        out[pool] = res
    return out
