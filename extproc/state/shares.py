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


@dataclass
class EntObs:
    """One entitlement as this replica sees it now."""

    applied: float  # the share its engine applies now
    used: float  # in-flight use as a fraction of its whole ceilings (concurrency, KV); 0 when it has none
    frac: float  # its whole baseline as a fraction of the whole pool (max over dimensions); 0 for spot
    constrained: bool  # has a baseline or a finite ceiling: its share matters
    holds_idle: bool  # its baseline is held even while it is idle (dedicated/guaranteed, lendReserved preemptible)
    arrivals: int  # admitted_total + rejected_total (for the demand sample)
    waiting: int  # in flight + queued now
    debt: float
    burst: float


@dataclass
class PoolObs:
    applied: float  # the pool share its engine applies now
    used: float  # in-flight use as a fraction of the whole pool (max of concurrency and KV)
    ents: dict[str, EntObs] = field(default_factory=dict)


def observe(engine) -> dict[str, PoolObs]:
    """Read (never change) what the sync needs from an engine: shares applied, use, demand counters, debt and
    burst. One pass over each pool's entitlements; read-only use of the engine's public state attributes."""
    out: dict[str, PoolObs] = {}
    for name, p in engine.pools.items():
        per = p.spec.per_replica
        kv_per = per.kv_cache_tokens if per.kv_cache_tokens is not None else per.model_geometry.kv_cache_tokens
        full_conc = p.replicas * per.concurrency
        full_kv = p.replicas * kv_per
        full_tps = p.replicas * per.tokens_per_second
        used = max(_frac(p.used_conc, full_conc), _frac(p.used_kv, full_kv))
        po = PoolObs(p.share, used)
        for e in p.ents:
            if e.retired:
                continue
            s = e.share if e.share > 0 else MIN_SHARE
            frac = 0.0
            if e.cls in BASELINE_CLASSES:
                frac = max(_frac(e.b_tps / s, full_tps), _frac(e.b_kv / s, full_kv), _frac(e.b_conc / s, full_conc))
            ceil_conc = e.c_conc / s if math.isfinite(e.c_conc) else None
            ceil_kv = e.c_kv / s if math.isfinite(e.c_kv) else None
            u = 0.0
            if ceil_conc:
                u = e.in_flight / ceil_conc
            if ceil_kv:
                u = max(u, e.kv / ceil_kv)
            constrained = frac > 0 or ceil_conc is not None or ceil_kv is not None or e.ceiling is not None
            po.ents[e.name] = EntObs(
                e.share, u, frac, constrained, e.reserved and p.strict, e.admitted_total + e.rejected_total, e.in_flight + len(e.queue),
                e.debt, e.burst,
            )  # fmt: skip
        out[name] = po
    return out


def _frac(x: float, whole: float) -> float:
    return x / whole if whole > 0 else 0.0


class Demand:
    """Recent demand per (pool, entitlement) on this replica: an EWMA of (in flight + queued + arrivals since
    the last sync). Its unit does not matter: only ratios between replicas are used."""

    def __init__(self, gamma: float = DEMAND_GAMMA) -> None:
        self.gamma = gamma
        self.value: dict[str, dict[str, float]] = {}
        self._arrivals: dict[tuple[str, str], int] = {}

    def update(self, obs: dict[str, PoolObs]) -> dict[str, dict[str, float]]:
        g = self.gamma
        for pool, po in obs.items():
            cur = self.value.setdefault(pool, {})
            for name, eo in po.ents.items():
                last = self._arrivals.get((pool, name), eo.arrivals)
                self._arrivals[(pool, name)] = eo.arrivals
                sample = eo.waiting + max(0, eo.arrivals - last)
                v = g * cur.get(name, 0.0) + (1 - g) * sample
                if v < 1e-3:
                    cur.pop(name, None)
                else:
                    cur[name] = v
        return self.value


def targets(
    mine: dict[str, dict[str, float]],
    others: list[dict[str, dict[str, float]]],
    obs: dict[str, PoolObs],
    prior: float = PRIOR,
) -> dict[str, dict[str, float]]:
    """This replica's wished-for share of every pool and constrained entitlement.

    mine / others: demand per pool and entitlement (this replica; each other live replica).
    Per entitlement: t = β/N + (1 − β) · my demand / Σ demand (equal split 1/N when nobody has any), so a
    tenant whose traffic lands on one replica gets (almost) its whole baseline there.
    Per pool: my part of the baselines that are held (Σ_e t_e · baseline fraction_e over reserved classes and
    entitlements with demand anywhere), plus the unreserved rest split the same
    way by my total demand. Summed over replicas both are 1 (up to the lag between replicas' demand samples);
    the Lua side makes sure the *granted* shares never sum above 1 whatever the targets say.
    """
    n = len(others) + 1
    out: dict[str, dict[str, float]] = {}
    for pool, po in obs.items():
        md = mine.get(pool, {})
        ods = [o.get(pool, {}) for o in others]
        t: dict[str, float] = {}
        base = 0.0
        total_frac = 0.0
        for name, eo in po.ents.items():
            if not eo.constrained:
                continue
            m = md.get(name, 0.0)
            s = m + sum(od.get(name, 0.0) for od in ods)
            te = min(1.0, prior / n + (1 - prior) * m / s) if s > 1e-9 else 1.0 / n
            t[name] = te
            if s > 1e-9 or eo.holds_idle:  # an idle elastic baseline holds nothing in the engine: no need to split it
                base += te * eo.frac
                total_frac += eo.frac
        if total_frac > 1.0:  # baselines oversubscribe the pool (elastic may): scale them into it
            base /= total_frac
            total_frac = 1.0
        m_all = sum(md.values())
        s_all = m_all + sum(sum(od.values()) for od in ods)
        w = min(1.0, prior / n + (1 - prior) * m_all / s_all) if s_all > 1e-9 else 1.0 / n
        t[POOL] = min(1.0, base + (1.0 - total_frac) * w)
        out[pool] = t
    return out


def merge_priorities(
    records: list[tuple[dict[str, dict[str, float]], dict[str, dict[str, list[float]]]]],
) -> dict[str, dict[str, list[float]]]:
    """Pool-wide debt and burst per entitlement: the share-weighted mean of every replica's own values.

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
        for name in ents:
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
