"""How many replicas a pool needs, from the same books the engine admits with. Pure: no I/O, no clock.

Per pool and dimension d (token throughput, KV cache, concurrency):

    required_d = reserved_d + elastic_d + min(burst_d, burstCap · perReplica_d)

    reserved_d = Σ baseline_d over dedicated and guaranteed entitlements (Pending ones too: they bind once the
                 capacity is there; Expired and removed ones not)
    elastic_d  = Σ over elastic entitlements of max(Ū_e,d, min(D_e,d, baseline_e,d))
                 Ū: time-averaged use of the baseline, an exponential average (time constant usageWindow) of
                    min(use, baseline) sampled each control period; D: demand now = in flight + queued
    burst_d    = Σ over all but guaranteed of max(0, min(D_e,d, ceiling_e,d) − baseline_e,d): spot and
                 preemptible demand, and dedicated/elastic demand above baseline, as far as the entitlement's
                 own ceilings would let it run (more replicas cannot help work blocked by its own ceiling;
                 a guaranteed entitlement's ceiling is its baseline, so it never adds burst)

    needed     = max over d of ceil(required_d / perReplica_d), clamped to [replicas.min, replicas.max]

Use and demand per dimension: concurrency = requests (in flight; + queued for demand); KV = tokens reserved
(+ input + max_tokens of the queued); throughput = concurrency × the pool's per-sequence rate
(perReplica.tokensPerSecond / perReplica.concurrency), the engine's own model of how fast one sequence runs.
Baselines are the configured ones. When this engine hands out only a share of the pool (several gateway
replicas, Engine.set_shares) it sees only its part of the traffic: use and demand are divided by the pool's
share, an estimate that holds when traffic splits like the shares.

`Hysteresis` turns `needed` into the replica count reported to KEDA: up at once, down only after a lower need
has held for `scaleDownDelay` and fits the smaller count with `scaleDownBand` of room to spare.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from ..config.documents import ServiceClass
from ..engine.state import EntitlementState, Lifecycle, PoolState, _fill_baseline

DIMENSIONS = ("tokensPerSecond", "kvCacheTokens", "concurrency")
_EPS = 1e-9

Vec = tuple[float, float, float]
_ZERO: Vec = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class ScalingPolicy:
    """Controller constants (one set per process; `tokenpools serve --help` names the options)."""

    burst_cap_replicas: float = 1.0  # spot/preemptible/above-baseline demand adds at most this many replicas
    usage_window_s: float = 60.0  # time constant of the elastic use average
    scale_down_delay_s: float = 60.0  # a lower need must hold this long before replicas are removed
    scale_down_band: float = 0.10  # ... and fit the smaller count with this fraction of it to spare

    def __post_init__(self) -> None:
        if self.burst_cap_replicas < 0 or self.usage_window_s <= 0 or self.scale_down_delay_s < 0:
            raise ValueError("burst cap >= 0, usage window > 0, scale-down delay >= 0 required")
        if not 0 <= self.scale_down_band < 1:
            raise ValueError("scale-down band must be in [0, 1)")


@dataclass
class Requirement:
    """One pool's required capacity at one instant, and the replica counts it implies."""

    pool: str
    per_replica: Vec
    reserved: Vec = _ZERO
    elastic: Vec = _ZERO
    burst: Vec = _ZERO  # after the cap
    burst_demand: Vec = _ZERO  # before the cap
    total: Vec = _ZERO
    needed: int = 0  # max over dimensions of ceil(total / per replica), clamped to [min, max]
    needed_with_band: int = 0  # the same with scale_down_band of each replica kept free (>= needed)
    binding: str = ""  # the dimension that sets `needed`
    queued: int = 0
    in_flight: int = 0

    def as_dict(self) -> dict:
        def named(v: Vec) -> dict[str, float]:
            return {d: round(x, 3) for d, x in zip(DIMENSIONS, v)}

        return {
            "perReplica": named(self.per_replica),
            "reserved": named(self.reserved),
            "elastic": named(self.elastic),
            "burst": named(self.burst),
            "burstDemand": named(self.burst_demand),
            "required": named(self.total),
            "needed": self.needed,
            "neededWithBand": self.needed_with_band,
            "binding": self.binding,
            "queued": self.queued,
            "inFlight": self.in_flight,
        }


def per_replica(p: PoolState) -> Vec:
    per = p.spec.per_replica
    kv = per.kv_cache_tokens if per.kv_cache_tokens is not None else per.model_geometry.kv_cache_tokens
    return (float(per.tokens_per_second), float(kv), float(per.concurrency))


def _unshare(x: float, share: float) -> float:
    return x / share if 0.0 < share < 1.0 else x


def use(e: EntitlementState) -> Vec:
    """What the entitlement holds now: in-flight requests (scaled up from this engine's share of the pool)."""
    s = e.pool.share
    return (_unshare(e.in_flight * e.pool.seq_rate, s), _unshare(float(e.kv), s), _unshare(float(e.in_flight), s))


def demand(e: EntitlementState) -> Vec:
    """What it asks for now: in flight plus queued (scaled up from this engine's share of the pool)."""
    s = e.pool.share
    n = e.in_flight + len(e.queue)
    kv = e.kv + sum(q.input_tokens + q.max_tokens for q in e.queue)
    return (_unshare(n * e.pool.seq_rate, s), _unshare(float(kv), s), _unshare(float(n), s))


def _ceiling(e: EntitlementState) -> Vec:
    """The entitlement's own ceilings, as configured (not this engine's share of them)."""
    if e.cls is ServiceClass.GUARANTEED:
        return _baseline(e)
    tps = e.ceiling.rate if e.ceiling is not None else math.inf
    return (_unshare(tps, e.share), _unshare(e.c_kv, e.share), _unshare(e.c_conc, e.share))


def _baseline(e: EntitlementState) -> Vec:
    """The configured baseline (the engine's b_* are this engine's share of it)."""
    tps, kv, conc = per_replica(e.pool)
    return _fill_baseline(e.spec, tps, int(kv), int(conc))


def counts(e: EntitlementState) -> bool:
    """Does this entitlement count towards the pool's requirement? Not once Expired or removed."""
    return not e.retired and e.lifecycle is not Lifecycle.EXPIRED


class UsageAverager:
    """Time-weighted exponential average per entitlement of min(use, baseline), per dimension.

    x ← x + (1 − exp(−dt/τ)) · (sample − x): the same average whatever the sampling period, so the controller
    may sample more often when it is woken early (scale from zero) without skewing it.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._avg: dict[str, tuple[float, Vec]] = {}  # entitlement -> (last sample time, average)

    def update(self, name: str, sample: Vec, now: float) -> Vec:
        prev = self._avg.get(name)
        if prev is None:
            avg = sample
        else:
            t0, old = prev
            dt = max(0.0, now - t0)
            k = 1.0 - math.exp(-dt / self.window_s)
            avg = tuple(o + k * (s - o) for o, s in zip(old, sample))  # type: ignore[assignment]
        self._avg[name] = (now, avg)
        return avg

    def get(self, name: str) -> Vec:
        prev = self._avg.get(name)
        return prev[1] if prev is not None else _ZERO

    def forget_except(self, names: set[str]) -> None:
        for name in [n for n in self._avg if n not in names]:
            del self._avg[name]


def requirement(p: PoolState, averager: UsageAverager, policy: ScalingPolicy, now: float) -> Requirement:
    """The pool's required capacity now (and update the elastic use averages with a sample taken now)."""
    per = per_replica(p)
    reserved = [0.0, 0.0, 0.0]
    elastic = [0.0, 0.0, 0.0]
    burst = [0.0, 0.0, 0.0]
    queued = in_flight = 0
    for e in p.ents:
        queued += len(e.queue)
        in_flight += e.in_flight
        if not counts(e):
            continue
        base = _baseline(e)
        d = demand(e)
        if e.reserved:
            for i in range(3):
                reserved[i] += base[i]
        if e.cls is ServiceClass.ELASTIC:
            u = use(e)
            avg = averager.update(e.name, tuple(min(u[i], base[i]) for i in range(3)), now)  # type: ignore[arg-type]
            for i in range(3):
                elastic[i] += max(avg[i], min(d[i], base[i]))
        if e.cls is not ServiceClass.GUARANTEED:
            ceil = _ceiling(e)
            for i in range(3):
                burst[i] += max(0.0, min(d[i], ceil[i]) - base[i])
    cap = [policy.burst_cap_replicas * per[i] for i in range(3)]
    capped = [min(burst[i], cap[i]) for i in range(3)]
    total = [reserved[i] + elastic[i] + capped[i] for i in range(3)]
    r = p.spec.replicas
    needed = max(_replicas(total[i], per[i], 0.0) for i in range(3))
    with_band = max(_replicas(total[i], per[i], policy.scale_down_band) for i in range(3))
    # The dimension that binds: the largest share of a replica. Dimensions an entitlement leaves out follow the
    # pool's ratios, so ties are common: they go to concurrency, then KV, then throughput.
    binding, best = "", 0.0
    for i in (2, 1, 0):
        ratio = total[i] / per[i] if per[i] > 0 else 0.0
        if ratio > best * (1 + 1e-9) + _EPS:
            binding, best = DIMENSIONS[i], ratio
    clamp = lambda n: min(max(n, r.min), r.max)  # noqa: E731
    return Requirement(
        pool=p.name,
        per_replica=per,
        reserved=tuple(reserved),  # type: ignore[arg-type]
        elastic=tuple(elastic),  # type: ignore[arg-type]
        burst=tuple(capped),  # type: ignore[arg-type]
        burst_demand=tuple(burst),  # type: ignore[arg-type]
        total=tuple(total),  # type: ignore[arg-type]
        needed=clamp(needed),
        needed_with_band=clamp(with_band),
        binding=binding,
        queued=queued,
        in_flight=in_flight,
    )


def _replicas(required: float, per: float, band: float) -> int:
    """Replicas that hold `required` with `band` of each one left free."""
    if required <= _EPS or per <= 0:
        return 0
    return max(1, math.ceil(required / (per * (1.0 - band)) - 1e-6))


@dataclass
class Hysteresis:
    """The replica count to ask for: up at once, down slowly and only with room to spare.

    - Up: when `needed` exceeds the current answer it becomes the answer immediately (a capacity shortage
      degrades guarantees now).
    - Down: only when the answer has not changed for `delay` seconds, and then to the largest
      `needed_with_band` seen over that window (never below `needed` now). So one step down needs a lower
      need sustained for the whole window, and the smaller count keeps `band` of every replica free: going
      back up then takes a rise of more than band/(1 − band) (11 % at the default 10 %) of the required
      capacity, not noise around a replica boundary. Two steps down are at least `delay` apart.
    """

    delay_s: float
    band: float
    desired: int | None = None
    changed_at: float = -math.inf
    window: deque = field(default_factory=deque)  # (time, needed_with_band)

    def step(self, needed: int, needed_with_band: int, now: float, current: int | None = None) -> int:
        self.window.append((now, needed_with_band))
        while self.window and self.window[0][0] <= now - self.delay_s + _EPS:
            self.window.popleft()
        if self.desired is None:
            # First answer: start from what runs now, so a restarted controller does not scale down at once.
            self.desired = max(needed, current if current is not None else needed)
            self.changed_at = now
            return self.desired
        if needed > self.desired:
            self.desired = needed
            self.changed_at = now
        elif now - self.changed_at >= self.delay_s - _EPS:
            lower = max(needed, max(n for _, n in self.window))
            if lower < self.desired:
                self.desired = lower
                self.changed_at = now
        return self.desired
