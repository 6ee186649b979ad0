"""A small virtual-time driver for engine scenario tests: closed-loop tenants against a fixed-speed backend.

Each admitted request runs for (input + output) / per-sequence rate seconds, the pool's own model of a
sequence's speed. Tenants keep `users` requests outstanding; a rejected user retries after Retry-After.
Only the engine is real here; the vLLM-like simulator drives the full experiments.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Callable

from extproc.config import Config, from_objects
from extproc.engine import Engine, Events, Verdict


def pool_doc(name="pool", model="m", tps=480, conc=16, kv=32768, replicas=1, **control):
    spec = {
        "model": model,
        "replicas": {"min": 0, "max": 8, "current": replicas},
        "perReplica": {"tokensPerSecond": tps, "concurrency": conc, "kvCacheTokens": kv},
    }
    queue = control.pop("queue", None)
    if queue:
        spec["queue"] = queue
    if control:
        spec["control"] = control
    return {"apiVersion": "tokenpools.io/v1alpha1", "kind": "TokenPool", "metadata": {"name": name}, "spec": spec}


def ent_doc(name, cls, pool="pool", slo=1000, resources=None, burst=None, max_tokens=None):
    spec = {"tenantId": name, "poolRef": {"name": pool}, "qos": {"serviceClass": cls, "sloTargetMs": slo}}
    if resources:
        spec["resources"] = resources
    if burst:
        spec["burst"] = burst
    if max_tokens:
        spec["defaults"] = {"maxTokens": max_tokens}
    return {"apiVersion": "tokenpools.io/v1alpha1", "kind": "TokenEntitlement", "metadata": {"name": name}, "spec": spec}


def config(*docs) -> Config:
    return from_objects(list(docs))


@dataclass
class Tenant:
    entitlement: str
    users: int
    start: float
    end: float
    input_tokens: Callable[[int], int] | int = 64
    output_tokens: Callable[[int], int] | int = 64


@dataclass
class Record:
    tenant: str
    arrival: float
    admitted: float | None = None
    finished: float | None = None
    rejected: list[str] = field(default_factory=list)
    in_flight_at_arrival: int = 0


class Scenario:
    def __init__(self, engine: Engine, tenants: list[Tenant], horizon: float, min_retry: float = 0.05):
        self.engine = engine
        self.tenants = {t.entitlement: t for t in tenants}
        self.horizon = horizon
        self.min_retry = min_retry
        self.now = 0.0
        self.events: list = []
        self.seq = itertools.count()
        self.records: dict[str, Record] = {}
        self.samples: list[tuple[float, dict]] = []  # (time, in-flight per entitlement)
        self.debts: list[tuple[float, dict]] = []  # (time, debt per entitlement)
        self.actions: list[tuple[float, Callable[[float], Events | None]]] = []
        self._n = itertools.count()

    def at(self, t: float, action: Callable[[float], Events | None]) -> None:
        self._push(t, "action", action)

    def _push(self, t, kind, data):
        heapq.heappush(self.events, (t, next(self.seq), kind, data))

    def _duration(self, rid: str) -> float:
        r = self.engine.inflight[rid]
        return r.cost / r.ent.pool.seq_rate

    def _submit(self, name: str, t: float) -> None:
        tenant = self.tenants[name]
        if t >= tenant.end or t >= self.horizon:
            return
        n = next(self._n)
        rid = f"{name}-{n}"
        inp = tenant.input_tokens(n) if callable(tenant.input_tokens) else tenant.input_tokens
        out = tenant.output_tokens(n) if callable(tenant.output_tokens) else tenant.output_tokens
        ent = self.engine.ents.get(name)
        rec = Record(name, t, in_flight_at_arrival=ent.in_flight if ent else 0)
        self.records[rid] = rec
        d = self.engine.admit(rid, name, inp, out, t)
        for victim in d.evict:
            self._evicted(victim, t)
        if d.verdict is Verdict.ADMIT:
            self._start(rid, t)
        elif d.verdict is Verdict.REJECT:
            rec.rejected.append(d.reason.value)
            self._push(t + max(d.retry_after or 0.0, self.min_retry), "user", name)

    def _start(self, rid: str, t: float) -> None:
        self.records[rid].admitted = t
        self._push(t + self._duration(rid), "finish", rid)

    def _evicted(self, rid: str, t: float) -> None:
        rec = self.records[rid]
        rec.rejected.append("evicted")
        rec.finished = t
        self._push(t + self.min_retry, "user", rec.tenant)

    def _handle(self, ev: Events, t: float) -> None:
        for rid in ev.evicted:
            self._evicted(rid, t)
        for rid in ev.admitted:
            self._start(rid, t)
        for d in ev.rejected:
            rec = self.records[d.request_id]
            rec.rejected.append(d.reason.value)
            self._push(t + max(d.retry_after or 0.0, self.min_retry), "user", rec.tenant)

    def run(self, sample_every: float = 0.5) -> "Scenario":
        for t in self.tenants.values():
            for _ in range(t.users):
                self._push(t.start, "user", t.entitlement)
        t_sample = 0.0
        while True:
            wake = self.engine.next_wakeup()
            nxt = self.events[0][0] if self.events else self.horizon
            if wake is not None and wake < nxt:
                nxt = wake
                kind = "tick"
            else:
                kind = None
            while t_sample <= min(nxt, self.horizon):
                self.samples.append((t_sample, {n: e.in_flight for n, e in self.engine.ents.items()}))
                self.debts.append((t_sample, {n: e.debt for n, e in self.engine.ents.items()}))
                t_sample += sample_every
            if nxt >= self.horizon:
                break
            self.now = nxt
            if kind == "tick":
                self._handle(self.engine.tick(nxt), nxt)
                continue
            t, _, kind, data = heapq.heappop(self.events)
            if kind == "user":
                self._submit(data, t)
            elif kind == "finish":
                if data in self.engine.inflight:
                    r = self.engine.inflight[data]
                    self.records[data].finished = t
                    self._handle(self.engine.finish(data, r.input_tokens, r.max_tokens, t), t)
                    self._push(t, "user", self.records[data].tenant)
            elif kind == "action":
                ev = data(t)
                if ev:
                    self._handle(ev, t)
            self.engine.check_invariants()
        return self

    # ---- measurements ----

    def mean_in_flight(self, name: str, start: float, end: float) -> float:
        vals = [s[1].get(name, 0) for s in self.samples if start <= s[0] < end]
        return sum(vals) / len(vals) if vals else 0.0

    def debt_at(self, name: str, t: float) -> float:
        return min(self.debts, key=lambda s: abs(s[0] - t))[1].get(name, 0.0)

    def waits(self, name: str, start: float, end: float) -> list[float]:
        return [
            r.admitted - r.arrival
            for r in self.records.values()
            if r.tenant == name and r.admitted is not None and start <= r.arrival < end
        ]

    def rejections(self, name: str, start: float = 0.0, end: float = float("inf")) -> list[Record]:
        return [r for r in self.records.values() if r.tenant == name and r.rejected and start <= r.arrival < end]
