"""Workload and experiment descriptions: who sends what, when, and what happens to the pool.

Everything here is data plus seeded sampling; the runners (virtual time in `runner.py`, real processes in
`live.py`) turn it into requests. Same experiment + same seed → the same request stream for every policy:
each closed-loop user and each open-loop tenant draws lengths, think times and arrival gaps from its own
`random.Random` seeded by (seed, tenant, load, user), so what one user sends never depends on how fast the
others were served.

Demand shapes (`Load`): a closed loop of N users (send, wait for the answer, think, send again), Poisson
arrivals at a rate, or bursty arrivals (a gamma renewal process with a given coefficient of variation; CV 1 is
Poisson, the Azure code trace has CV ≈ 13). Lengths: fixed, uniform, or lognormal (DESIGN.md §5), clipped.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from extproc.sim.profiles import Profile

API_VERSION = "tokenpools.io/v1alpha1"


# ---- lengths --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lengths:
    """Token-length distribution: kind 'fixed' (a), 'uniform' (a..b inclusive), 'lognormal' (mu, sigma; clipped
    to lo..hi)."""

    kind: str = "fixed"
    a: float = 64
    b: float = 64
    lo: int = 1
    hi: int = 4096

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        if self.kind == "lognormal":
            return int(min(self.hi, max(self.lo, round(rng.lognormvariate(self.a, self.b)))))
        raise ValueError(f"unknown length distribution {self.kind!r}")

    @property
    def mean(self) -> float:
        if self.kind == "fixed":
            return float(self.a)
        if self.kind == "uniform":
            return (self.a + self.b) / 2
        return min(self.hi, math.exp(self.a + self.b**2 / 2))

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"{int(self.a)}"
        if self.kind == "uniform":
            return f"U[{int(self.a)}, {int(self.b)}]"
        return f"lognormal(μ={self.a}, σ={self.b}) in [{self.lo}, {self.hi}]"


def fixed(n: int) -> Lengths:
    return Lengths("fixed", n, n)


def uniform(lo: int, hi: int) -> Lengths:
    return Lengths("uniform", lo, hi)


def lognormal(mu: float, sigma: float, lo: int = 1, hi: int = 4096) -> Lengths:
    return Lengths("lognormal", mu, sigma, lo, hi)


# ---- demand ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """One block of demand from a tenant during [start, end).

    kind 'closed': `users` users, each sends a request, waits for the whole answer, thinks (exponential with
      mean `think_s`, 0: none), and sends the next; user i starts at start + U(0, stagger_s).
    kind 'poisson': open loop, `rate` requests/s.
    kind 'bursty': open loop, `rate` requests/s on average, gamma inter-arrival gaps with coefficient of
      variation `cv` (> 1: clumps of requests separated by long gaps).
    A user or arrival that is still waiting (for a 429's Retry-After) when `end` passes gives up.
    """

    start: float
    end: float
    kind: str = "closed"
    users: int = 0
    think_s: float = 0.0
    stagger_s: float = 1.0
    rate: float = 0.0
    cv: float = 1.0

    def arrivals(self, rng: random.Random) -> list[float]:
        """Open-loop arrival times in [start, end)."""
        if self.kind not in ("poisson", "bursty") or self.rate <= 0:
            return []
        out = []
        t = self.start
        if self.kind == "poisson" or self.cv == 1.0:
            draw = lambda: rng.expovariate(self.rate)  # noqa: E731
        else:
            shape = 1.0 / (self.cv**2)
            scale = 1.0 / (self.rate * shape)
            draw = lambda: rng.gammavariate(shape, scale)  # noqa: E731
        while True:
            t += draw()
            if t >= self.end:
                return out
            out.append(t)


def closed(start: float, end: float, users: int, think_s: float = 0.0, stagger_s: float = 1.0) -> Load:
    return Load(start, end, "closed", users=users, think_s=think_s, stagger_s=stagger_s)


def poisson(start: float, end: float, rate: float) -> Load:
    return Load(start, end, "poisson", rate=rate)


def bursty(start: float, end: float, rate: float, cv: float) -> Load:
    return Load(start, end, "bursty", rate=rate, cv=cv)


# ---- tenants, phases, the experiment ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Tenant:
    """A tenant with one entitlement (named like the tenant) and its demand.

    `present`: when its entitlement exists, as (start, end) windows; None: the whole run. Outside them the
    entitlement is absent from the config (created and removed with Engine.apply), so requests get 403.
    `static`: the limits the `static` baseline gives it, {"concurrency": n, "tokens_per_minute": t}; None: derived
    from the entitlement (see policies.StaticLimits).
    """

    name: str
    service_class: str
    slo_ms: float
    loads: tuple[Load, ...]
    input: Lengths = fixed(64)
    output: Lengths = fixed(64)
    resources: dict[str, float] | None = None  # baseline (TokenEntitlement spec.resources)
    burst: dict[str, float] | None = None  # ceilings (spec.burst)
    present: tuple[tuple[float, float], ...] | None = None
    static: dict[str, float] | None = None

    @property
    def api_key(self) -> str:
        return f"exp-key-{self.name}"

    def doc(self, pool: str) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "tenantId": self.name,
            "poolRef": {"name": pool},
            "qos": {"serviceClass": self.service_class, "sloTargetMs": self.slo_ms},
            "defaults": {"maxTokens": int(self.output.mean)},
            "auth": {"apiKeys": [self.api_key]},
        }
        if self.resources:
            spec["resources"] = dict(self.resources)
        if self.burst:
            spec["burst"] = dict(self.burst)
        return {
            "apiVersion": API_VERSION,
            "kind": "TokenEntitlement",
            "metadata": {"name": self.name, "labels": {"tokenpools.io/demo": "true"}},
            "spec": spec,
        }

    def present_at(self, t: float) -> bool:
        return self.present is None or any(a <= t < b for a, b in self.present)


@dataclass(frozen=True)
class Phase:
    name: str
    start: float
    end: float


@dataclass
class Experiment:
    """A whole experiment: pool, tenants, phases, capacity changes, horizon.

    `replicas`: the pool's replica count over time as (time, n) steps, the first at 0. Each replica is one
    simulator `Scheduler` with `profile`; when the count drops, the removed replicas take no new requests and
    finish what they hold (drain), when it rises they come back empty.
    """

    name: str
    title: str
    description: str
    horizon: float
    phases: list[Phase]
    tenants: list[Tenant]
    profile: Profile
    per_replica: dict[str, float]  # TokenPool spec.perReplica
    replicas: list[tuple[float, int]] = field(default_factory=lambda: [(0.0, 1)])
    pool_name: str = "pool"
    model: str = "qwen3-8b"
    control: dict[str, Any] = field(default_factory=dict)
    queue: dict[str, Any] = field(default_factory=lambda: {"maxQueued": 1024, "maxQueuedPerEntitlement": 256, "timeoutSeconds": 10})
    paper: dict[str, Any] = field(default_factory=dict)  # the paper's numbers, for the report
    checks: list[str] = field(default_factory=list)  # names of acceptance checks (metrics.CHECKS)
    live_ok: bool = True  # can run through real Envoy (no capacity changes)
    notes: list[str] = field(default_factory=list)  # what a reader of the report must know

    def shortened(self, factor: float) -> "Experiment":
        """The same experiment with every time (horizon, phases, loads, presence, capacity changes) × factor; for
        quick tests. Request lengths, and so request durations, stay as they are."""
        import dataclasses

        def load(ld: Load) -> Load:
            return dataclasses.replace(ld, start=ld.start * factor, end=ld.end * factor)

        tenants = [
            dataclasses.replace(
                t,
                loads=tuple(load(ld) for ld in t.loads),
                present=tuple((a * factor, b * factor) for a, b in t.present) if t.present else None,
            )
            for t in self.tenants
        ]
        return dataclasses.replace(
            self,
            horizon=self.horizon * factor,
            phases=[Phase(p.name, p.start * factor, p.end * factor) for p in self.phases],
            tenants=tenants,
            replicas=[(t * factor, n) for t, n in self.replicas],
        )

    @property
    def max_replicas(self) -> int:
        return max(n for _, n in self.replicas)

    def replicas_at(self, t: float) -> int:
        n = self.replicas[0][1]
        for at, k in self.replicas:
            if at <= t:
                n = k
        return n

    def pool_doc(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "model": self.model,
            "replicas": {"min": 0, "max": max(4, self.max_replicas), "current": self.replicas[0][1]},
            "perReplica": dict(self.per_replica),
            "queue": dict(self.queue),
            "defaultMaxTokens": 256,
        }
        if self.control:
            spec["control"] = dict(self.control)
        return {"apiVersion": API_VERSION, "kind": "TokenPool", "metadata": {"name": self.pool_name}, "spec": spec}

    def docs_at(self, t: float) -> list[dict[str, Any]]:
        """The config documents in force at time t (entitlements whose tenants are present)."""
        return [self.pool_doc()] + [tn.doc(self.pool_name) for tn in self.tenants if tn.present_at(t)]

    def all_docs(self) -> list[dict[str, Any]]:
        return [self.pool_doc()] + [tn.doc(self.pool_name) for tn in self.tenants]

    def config_changes(self) -> list[float]:
        """Times (> 0) at which the set of present entitlements changes."""
        times = set()
        for tn in self.tenants:
            for a, b in tn.present or ():
                times.update(x for x in (a, b) if 0 < x < self.horizon)
        return sorted(times)

    def phase_of(self, t: float) -> str | None:
        for ph in self.phases:
            if ph.start <= t < ph.end:
                return ph.name
        return None

    def tenant(self, name: str) -> Tenant:
        return next(t for t in self.tenants if t.name == name)


def rng_for(seed: int, *parts: object) -> random.Random:
    """A generator of its own for one user / one arrival stream, independent of everything else."""
    return random.Random(":".join(str(p) for p in (seed, *parts)))
