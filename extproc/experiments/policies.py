"""Admission policies behind one interface: ours (the engine) and the baselines users run today.

Every policy answers the calls the engine answers, so the virtual-time runner and the live ext_proc server
(`extproc.envoy.service.Gateway`) drive them alike:

    admit(rid, entitlement, input_tokens, max_tokens, now) -> Decision     ADMIT / QUEUE / REJECT (+ Retry-After)
    progress(rid, output_tokens, now)                                       tokens streamed so far
    finish(rid, input_tokens, output_tokens, now) -> Events                 done, real usage
    release(rid, now) -> Events                                             aborted / cancelled
    tick(now) -> Events, next_wakeup() -> float | None                      timers
    apply(config, now) -> Events, set_replicas(pool, n, now) -> Events      config and capacity changes
    snapshot(now) -> dict, plus the adapter's lookups (pool_for_model, entitlement_spec, concurrency_ceiling)

Policies:
- `tokenpools`: `extproc.engine.Engine`, unchanged.
- `none`: admit everything; the backends' own queues (vLLM's FIFO waiting list) absorb overload. The paper's
  baseline.
- `static`: per-tenant static limits, the way LiteLLM (`max_parallel_requests`, `tpm_limit`) or an Envoy
  rate-limit service is configured: a concurrency cap and a tokens-per-minute cap per tenant, each checked
  alone, never looking at the pool. Sized once, without overcommit (`static_limits`). Concurrency over the cap → 429 (no Retry-After from LiteLLM; the client
  waits 1 s). Tokens: LiteLLM's fixed one-minute windows — a request is refused while the tokens *used* in the
  current minute (input + output, counted when a request completes) are at or over the limit; Retry-After is
  the time to the next minute. Nothing is queued.
- `fairqueue`: a VTC-style fair queue (Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024):
  every tenant has a virtual counter charged input × 1 when its request is dispatched and output × 2 as tokens
  are generated; requests wait in one queue per tenant and the pool's free slots (replicas × concurrency) go to
  the backlogged tenant with the smallest counter (FIFO within a tenant). A tenant that becomes backlogged has
  its counter lifted to the smallest counter among backlogged tenants (or, with none backlogged, to the
  counter of the tenant served last), so idle time is not banked. Never rejects; the queue is unbounded.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from extproc.config import Config
from extproc.config.documents import BASELINE_CLASSES, TokenEntitlementSpec, TokenPoolSpec
from extproc.engine import Engine
from extproc.engine.decisions import Decision, Events, Reason, Verdict

POLICIES = ("tokenpools", "none", "static", "fairqueue")

# The static baseline's tokens-per-minute limit is set this much above the rate its concurrency implies, so it
# binds only on a tenant sending more than its share, not on a well-behaved one at full speed.
STATIC_TPM_SLACK = 1.25
STATIC_WINDOW_S = 60.0
FAIRQUEUE_INPUT_WEIGHT = 1.0
FAIRQUEUE_OUTPUT_WEIGHT = 2.0


@dataclass(slots=True)
class _Running:
    tenant: str
    pool: str
    input_tokens: int
    max_tokens: int
    output: int = 0  # output tokens reported so far (progress)


class BaselinePolicy:
    """What the baselines share: config lookups, in-flight books, the adapter-facing methods."""

    name = "baseline"

    def __init__(self, config: Config, now: float = 0.0) -> None:
        self.now = now
        self.running: dict[str, _Running] = {}
        self.admitted_total: dict[str, int] = {}
        self.rejected_total: dict[str, int] = {}
        self.replicas: dict[str, int] = {}
        self._load(config)

    # -- config --
    def _load(self, config: Config) -> None:
        self.config = config
        self.pools: dict[str, TokenPoolSpec] = {n: d.spec for n, d in config.pools.items()}
        self.by_model = {spec.model: n for n, spec in self.pools.items()}
        self.specs: dict[str, TokenEntitlementSpec] = {n: d.spec for n, d in config.entitlements.items()}
        for name, spec in self.pools.items():
            if name not in self.replicas:
                r = spec.replicas
                self.replicas[name] = r.current if r.current is not None else max(r.min, 1)

    def apply(self, config: Config, now: float) -> Events:
        self._clock(now)
        self._load(config)
        return self._dispatch_all(now)

    def set_replicas(self, pool: str, replicas: int, now: float) -> Events:
        self._clock(now)
        self.replicas[pool] = replicas
        return self._dispatch_all(now)

    def pool_capacity(self, pool: str) -> int:
        return self.replicas[pool] * self.pools[pool].per_replica.concurrency

    # -- adapter lookups (extproc.envoy.service.Gateway) --
    def pool_for_model(self, model: str) -> str | None:
        return self.by_model.get(model)

    def entitlement_spec(self, name: str) -> TokenEntitlementSpec | None:
        return self.specs.get(name)

    def pool_spec(self, name: str) -> TokenPoolSpec | None:
        return self.pools.get(name)

    def concurrency_ceiling(self, name: str) -> int | None:
        spec = self.specs.get(name)
        return None if spec is None else self.pool_capacity(spec.pool_ref.name)

    def max_tokens_default(self, spec: TokenEntitlementSpec) -> int:
        return spec.defaults.max_tokens or self.pools[spec.pool_ref.name].default_max_tokens

    # -- requests --
    def admit(self, rid: str, entitlement: str, input_tokens: int, max_tokens: int | None, now: float) -> Decision:
        self._clock(now)
        spec = self.specs.get(entitlement)
        if spec is None:
            return Decision(Verdict.REJECT, rid, Reason.NOT_BOUND, max_tokens=max_tokens or 0)
        mt = max_tokens if max_tokens is not None else self.max_tokens_default(spec)
        return self._admit(rid, entitlement, spec, input_tokens, mt, now)

    def _admit(self, rid, tenant, spec, input_tokens, mt, now) -> Decision:
        raise NotImplementedError

    def _start(self, rid: str, tenant: str, pool: str, input_tokens: int, mt: int) -> None:
        self.running[rid] = _Running(tenant, pool, input_tokens, mt)
        self.admitted_total[tenant] = self.admitted_total.get(tenant, 0) + 1

    def _reject(self, rid: str, tenant: str, reason: Reason, retry: float | None, mt: int) -> Decision:
        self.rejected_total[tenant] = self.rejected_total.get(tenant, 0) + 1
        return Decision(Verdict.REJECT, rid, reason, retry, max_tokens=mt)

    def progress(self, rid: str, output_tokens: int, now: float) -> None:
        r = self.running.get(rid)
        if r is not None:
            self._clock(now)
            self._charge(r, output_tokens)
            r.output = output_tokens

    def _charge(self, r: _Running, output_tokens: int) -> None:
        pass

    def finish(self, rid: str, input_tokens: int | None, output_tokens: int, now: float) -> Events:
        self._clock(now)
        r = self.running.pop(rid, None)
        if r is None:
            return self.release(rid, now)
        self._charge(r, output_tokens)
        self._finished(r, input_tokens if input_tokens is not None else r.input_tokens, output_tokens, now)
        return self._dispatch(r.pool, now)

    def _finished(self, r: _Running, input_tokens: int, output_tokens: int, now: float) -> None:
        pass

    def release(self, rid: str, now: float) -> Events:
        self._clock(now)
        r = self.running.pop(rid, None)
        if r is not None:
            return self._dispatch(r.pool, now)
        self._unqueue(rid)
        return Events()

    def _unqueue(self, rid: str) -> None:
        pass

    def tick(self, now: float) -> Events:
        self._clock(now)
        return Events()

    def next_wakeup(self) -> float | None:
        return None

    def _dispatch(self, pool: str, now: float) -> Events:
        return Events()

    def _dispatch_all(self, now: float) -> Events:
        ev = Events()
        for pool in self.pools:
            ev.extend(self._dispatch(pool, now))
        return ev

    def _clock(self, now: float) -> float:
        if now > self.now:
            self.now = now
        return self.now

    # -- views --
    def in_flight(self, tenant: str) -> int:
        return sum(1 for r in self.running.values() if r.tenant == tenant)

    def queued(self, tenant: str) -> int:
        return 0

    def tenant_state(self, now: float) -> dict[str, dict[str, float]]:
        """Per tenant: what this policy keeps about it (for the over-time plots)."""
        return {n: {"in_flight": self.in_flight(n), "queued": self.queued(n)} for n in self.specs}

    def snapshot(self, now: float) -> dict[str, Any]:
        pools = {}
        for name, spec in self.pools.items():
            used = sum(1 for r in self.running.values() if r.pool == name)
            pools[name] = {
                "model": spec.model,
                "replicas": self.replicas[name],
                "capacity": {"concurrency": self.pool_capacity(name)},
                "used": {"concurrency": used},
                "in_flight": used,
                "queued": sum(self.queued(n) for n, s in self.specs.items() if s.pool_ref.name == name),
            }
        ents = {}
        for name, spec in self.specs.items():
            ents[name] = {
                "tenant": spec.tenant_id,
                "pool": spec.pool_ref.name,
                "class": spec.qos.service_class.value,
                "in_flight": self.in_flight(name),
                "queued": self.queued(name),
                "admitted_total": self.admitted_total.get(name, 0),
                "rejected_total": self.rejected_total.get(name, 0),
                **{k: v for k, v in self.tenant_state(now).get(name, {}).items() if k not in ("in_flight", "queued")},
            }
        return {"policy": self.name, "pools": pools, "entitlements": ents}

    def check_invariants(self) -> None:
        pass


class NonePolicy(BaselinePolicy):
    """Admit everything at once."""

    name = "none"

    def _admit(self, rid, tenant, spec, input_tokens, mt, now) -> Decision:
        self._start(rid, tenant, spec.pool_ref.name, input_tokens, mt)
        return Decision(Verdict.ADMIT, rid, max_tokens=mt)


@dataclass(frozen=True, slots=True)
class StaticLimit:
    concurrency: float
    tokens_per_minute: float


def static_limits(config: Config) -> dict[str, StaticLimit]:
    """Each tenant's static limits, sized the way an operator who must keep promises sizes them without a
    scheduler: no overcommit of the pool's concurrency (at its configured replicas).

    - dedicated, guaranteed, elastic: their baseline concurrency (a static limit cannot lend and take back, so
      bursting is not expressible);
    - spot, preemptible: an equal split of what the baselines leave free, capped by their burst ceiling.
    Tokens per minute: the concurrency at the pool's per-sequence rate (or the entitlement's own
    tokensPerSecond) × 60 × STATIC_TPM_SLACK. Pass the config with *every* tenant ever sold (static limits
    are planned once, not when a tenant comes and goes).
    """
    out: dict[str, StaticLimit] = {}
    for pool_name, pool in config.pools.items():
        per = pool.spec.per_replica
        r = pool.spec.replicas
        cap = (r.current if r.current is not None else max(r.min, 1)) * per.concurrency
        seq_rate = per.tokens_per_second / per.concurrency
        ents = {n: d.spec for n, d in config.entitlements.items() if d.spec.pool_ref.name == pool_name}
        base: dict[str, float] = {}
        for name, spec in ents.items():
            if spec.qos.service_class in BASELINE_CLASSES:
                res = spec.resources
                shares = [v / c for v, c in ((res.concurrency, per.concurrency), (res.tokens_per_second, per.tokens_per_second),
                                            (res.kv_cache_tokens, per.kv_cache_tokens)) if v is not None and c]
                base[name] = max(shares) * per.concurrency if shares else 0.0
        rest = [n for n in ents if n not in base]
        left = max(0.0, cap - sum(base.values()))
        for name, spec in ents.items():
            if name in base:
                conc = base[name]
            else:
                conc = math.floor(left / len(rest))
                if spec.burst is not None and spec.burst.concurrency is not None:
                    conc = min(conc, spec.burst.concurrency)
            tps = spec.resources.tokens_per_second if name in base and spec.resources.tokens_per_second else conc * seq_rate
            out[name] = StaticLimit(float(conc), tps * 60.0 * STATIC_TPM_SLACK)
    return out


class StaticPolicy(BaselinePolicy):
    """Per-tenant static concurrency and tokens-per-minute limits (LiteLLM-style), blind to the pool."""

    name = "static"

    def __init__(self, config: Config, now: float = 0.0, limits: dict[str, StaticLimit] | None = None) -> None:
        self.fixed_limits = limits
        self.window_used: dict[str, tuple[int, float]] = {}  # tenant -> (window index, tokens used in it)
        super().__init__(config, now)

    def _load(self, config: Config) -> None:
        super()._load(config)
        self.limits = dict(self.fixed_limits) if self.fixed_limits is not None else static_limits(config)

    def concurrency_ceiling(self, name: str) -> int | None:
        lim = self.limits.get(name)
        return None if lim is None else int(lim.concurrency)

    def _used(self, tenant: str, now: float) -> float:
        w = int(now // STATIC_WINDOW_S)
        win, used = self.window_used.get(tenant, (w, 0.0))
        return used if win == w else 0.0

    def _admit(self, rid, tenant, spec, input_tokens, mt, now) -> Decision:
        lim = self.limits.get(tenant)
        if lim is None:
            return self._reject(rid, tenant, Reason.NOT_BOUND, None, mt)
        if self.in_flight(tenant) + 1 > lim.concurrency + 1e-9:
            return self._reject(rid, tenant, Reason.OVER_CONCURRENCY, None, mt)
        if self._used(tenant, now) >= lim.tokens_per_minute:
            retry = (math.floor(now / STATIC_WINDOW_S) + 1) * STATIC_WINDOW_S - now
            return self._reject(rid, tenant, Reason.OVER_THROUGHPUT, retry, mt)
        self._start(rid, tenant, spec.pool_ref.name, input_tokens, mt)
        return Decision(Verdict.ADMIT, rid, max_tokens=mt)

    def _finished(self, r: _Running, input_tokens: int, output_tokens: int, now: float) -> None:
        w = int(now // STATIC_WINDOW_S)
        self.window_used[r.tenant] = (w, self._used(r.tenant, now) + input_tokens + output_tokens)

    def tenant_state(self, now: float) -> dict[str, dict[str, float]]:
        return {
            n: {"in_flight": self.in_flight(n), "queued": 0, "tokens_this_minute": self._used(n, now)}
            for n in self.specs
        }


@dataclass(slots=True)
class _Waiter:
    rid: str
    tenant: str
    pool: str
    input_tokens: int
    max_tokens: int
    arrival: float


class FairQueuePolicy(BaselinePolicy):
    """VTC-style virtual token counters (input × 1, output × 2), smallest counter served first."""

    name = "fairqueue"

    def __init__(self, config: Config, now: float = 0.0) -> None:
        self.counters: dict[str, float] = {}
        self.queues: dict[str, deque[_Waiter]] = {}
        self.waiting: dict[str, _Waiter] = {}
        self.last_served: dict[str, str] = {}  # pool -> tenant dispatched last
        super().__init__(config, now)

    def _admit(self, rid, tenant, spec, input_tokens, mt, now) -> Decision:
        pool = spec.pool_ref.name
        q = self.queues.setdefault(tenant, deque())
        if not q:  # becomes backlogged: lift the counter so idle time is not banked
            backlogged = [self.counters.get(t, 0.0) for t, tq in self.queues.items() if tq and self._pool_of(t) == pool]
            if backlogged:
                floor = min(backlogged)
            else:
                last = self.last_served.get(pool)
                floor = self.counters.get(last, 0.0) if last is not None else 0.0
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)
        w = _Waiter(rid, tenant, pool, input_tokens, mt, now)
        q.append(w)
        self.waiting[rid] = w
        ev = self._dispatch(pool, now)
        if rid in ev.admitted:
            return Decision(Verdict.ADMIT, rid, max_tokens=mt)
        return Decision(Verdict.QUEUE, rid, Reason.POOL_CONTENDED, None, now + 3600.0, mt)

    def _pool_of(self, tenant: str) -> str | None:
        spec = self.specs.get(tenant)
        return spec.pool_ref.name if spec else None

    def _dispatch(self, pool: str, now: float) -> Events:
        ev = Events()
        cap = self.pool_capacity(pool)
        used = sum(1 for r in self.running.values() if r.pool == pool)
        while used < cap:
            cands = [t for t, q in self.queues.items() if q and q[0].pool == pool]
            if not cands:
                break
            t = min(cands, key=lambda x: (self.counters.get(x, 0.0), self.queues[x][0].arrival))
            w = self.queues[t].popleft()
            del self.waiting[w.rid]
            self.counters[t] = self.counters.get(t, 0.0) + FAIRQUEUE_INPUT_WEIGHT * w.input_tokens
            self.last_served[pool] = t
            self._start(w.rid, t, pool, w.input_tokens, w.max_tokens)
            ev.admitted.append(w.rid)
            used += 1
        return ev

    def _charge(self, r: _Running, output_tokens: int) -> None:
        if output_tokens > r.output:
            self.counters[r.tenant] = self.counters.get(r.tenant, 0.0) + FAIRQUEUE_OUTPUT_WEIGHT * (output_tokens - r.output)
            r.output = output_tokens

    def _unqueue(self, rid: str) -> None:
        w = self.waiting.pop(rid, None)
        if w is not None:
            self.queues[w.tenant].remove(w)

    def queued(self, tenant: str) -> int:
        return len(self.queues.get(tenant, ()))

    def tenant_state(self, now: float) -> dict[str, dict[str, float]]:
        return {
            n: {"in_flight": self.in_flight(n), "queued": self.queued(n), "counter": self.counters.get(n, 0.0)}
            for n in self.specs
        }


def make_policy(name: str, config: Config, now: float = 0.0, static: dict[str, StaticLimit] | None = None):
    if name == "tokenpools":
        return Engine(config, now)
    if name == "none":
        return NonePolicy(config, now)
    if name == "static":
        return StaticPolicy(config, now, static)
    if name == "fairqueue":
        return FairQueuePolicy(config, now)
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")


def tenant_state(policy: Any, now: float) -> dict[str, dict[str, float]]:
    """Per tenant state for the over-time series: debt, weight, burst and allocation for the engine; whatever
    the baseline keeps otherwise."""
    if isinstance(policy, Engine):
        out = {}
        for name, e in policy.ents.items():
            out[name] = {
                "in_flight": e.in_flight,
                "queued": len(e.queue),
                "debt": e.debt,
                "weight": e.weight,
                "burst": e.burst,
                "alloc_conc": e.a_conc,
            }
        return out
    return policy.tenant_state(now)
