"""Runtime state of pools, entitlements and requests. Plain slotted objects: cheap at 10,000 entitlements.

Dimensions are written out as three fields (tps, kv, conc) rather than a vector: the admission path touches
them on every request and attribute access is the cheapest thing Python has.
"""

from __future__ import annotations

import enum
import math
from collections import deque

from ..config.documents import (
    BASELINE_CLASSES,
    CLASS_WEIGHT,
    RESERVED_CLASSES,
    ServiceClass,
    TokenEntitlementSpec,
    TokenPoolSpec,
)
from .bucket import TokenBucket

INF = math.inf


class Lifecycle(str, enum.Enum):
    PENDING = "Pending"  # the pool cannot honour its reserved baseline (or the pool is missing)
    BOUND = "Bound"
    DEGRADED = "Degraded"  # bound, but currently given less than its baseline (capacity shrank)
    EXPIRED = "Expired"


class Reservation:
    """An admitted request: what it holds until finish or release."""

    __slots__ = ("rid", "ent", "cost", "kv", "protected", "input_tokens", "max_tokens", "output", "start", "end")

    def __init__(self, rid, ent, cost, kv, protected, input_tokens, max_tokens, start, end):
        self.rid = rid
        self.ent = ent
        self.cost = cost  # throughput tokens charged (input + max_tokens, reconciled at finish)
        self.kv = kv  # KV tokens held
        self.protected = protected  # charged to the entitlement's own bucket (True) or the pool surplus (False)
        self.input_tokens = input_tokens
        self.max_tokens = max_tokens
        self.output = 0
        self.start = start
        self.end = end  # expected completion, for Retry-After


class QueuedRequest:
    __slots__ = ("rid", "ent", "input_tokens", "max_tokens", "arrival", "deadline", "seq")

    def __init__(self, rid, ent, input_tokens, max_tokens, arrival, deadline, seq):
        self.rid = rid
        self.ent = ent
        self.input_tokens = input_tokens
        self.max_tokens = max_tokens
        self.arrival = arrival
        self.deadline = deadline
        self.seq = seq


class PoolState:
    __slots__ = (
        "name", "spec", "replicas", "cap_tps", "cap_kv", "cap_conc", "seq_rate",
        "used_kv", "used_conc", "head_kv", "head_conc", "surplus", "ents", "inflight",
        "queued", "queue_heap", "last_control", "threshold", "completions", "wake", "blocked_key", "strict", "rhead_kv", "rhead_conc", "share", "pre_kv", "pre_conc",
        "pending_shares", "mean_slo",
    )  # fmt: skip

    def __init__(self, name: str, spec: TokenPoolSpec, now: float) -> None:
        self.name = name
        self.spec = spec
        r = spec.replicas
        self.replicas = r.current if r.current is not None else max(r.min, 1)
        self.used_kv = 0
        self.used_conc = 0
        # Headroom held for active entitlements: Σ max(0, allocation − used). Burst work may not take it.
        self.head_kv = 0.0
        self.head_conc = 0.0
        self.rhead_kv = 0.0  # the part of it held for dedicated/guaranteed entitlements
        self.rhead_conc = 0.0
        self.pre_kv = 0  # KV and concurrency held by preemptible work (which may sit in others' headroom)
        self.pre_conc = 0
        self.ents: list[EntitlementState] = []
        self.strict = spec.control.lend_reserved == "preemptible"  # reserved headroom held even when idle
        self.inflight: dict[str, Reservation] = {}
        self.queued = 0
        self.queue_heap: list = []  # (-weight, -debt, head arrival, head seq, ent name) per entitlement with waiters
        self.last_control = now
        # Admission threshold: the lowest weight among admitted work (refreshed each tick, lowered on admit).
        self.threshold = INF
        self.completions: list = []  # heap of (expected end, rid) for Retry-After; stale entries skipped
        # Surplus bucket: throughput not allocated to active entitlements, plus what their full buckets spill.
        self.surplus = TokenBucket(0.0, 0.0, now)
        # The fraction of the pool this engine may hand out: 1 alone; less when several gateway replicas share
        # the pool (extproc/state/ leases each replica its share).
        self.share = 1.0
        self.mean_slo = 0.0  # mean SLO target of serving entitlements (set by each control step; for weights)
        self.pending_shares = None  # (share, {entitlement: share}) set_shares(defer=True) left for the next period
        self.set_capacity(self.replicas, now)
        self.blocked_key = None  # (-weight, -debt) of the best waiter blocked by the pool itself, if any
        self.wake = INF  # when a waiter blocked on a bucket can next be admitted (refill), for next_wakeup()

    def set_capacity(self, replicas: int, now: float, credit: bool = True) -> None:
        per = self.spec.per_replica
        kv_per = per.kv_cache_tokens if per.kv_cache_tokens is not None else per.model_geometry.kv_cache_tokens
        self.replicas = replicas
        self.cap_tps = replicas * per.tokens_per_second * self.share
        self.cap_kv = replicas * kv_per * self.share
        self.cap_conc = replicas * per.concurrency * self.share
        # One sequence's share of a replica's throughput: how fast a single request progresses.
        self.seq_rate = per.tokens_per_second / per.concurrency
        old_depth = self.surplus.depth
        self.surplus.set_rate(self.surplus.rate, self.cap_tps * self.spec.control.burst_seconds, now)
        if credit and self.surplus.depth > old_depth:  # a new replica arrives idle: its throughput is there at once
            self.surplus.level = min(self.surplus.depth, self.surplus.level + self.surplus.depth - old_depth)

    def expected_duration(self, cost: float) -> float:
        return cost / self.seq_rate


class EntitlementState:
    __slots__ = (
        "name", "spec", "pool", "cls", "class_weight", "slo_ms", "order",
        "b_tps", "b_kv", "b_conc", "c_kv", "c_conc", "a_tps", "a_kv", "a_conc",
        "bucket", "ceiling", "in_flight", "kv", "_lifecycle", "serving", "reserved", "weight", "debt", "burst",
        "active", "last_arrival", "h_kv", "h_conc", "queue", "refused",
        "area_kv", "area_conc", "tokens", "t_mark", "admitted_total", "rejected_total", "rejected_by_reason",
        "max_tokens_default", "evicted_total", "retired", "measured", "share", "rate_tps",
        "shadow", "shadow_queued", "shadow_rejected", "shadow_by_reason",
    )  # fmt: skip

    def __init__(
        self, name: str, spec: TokenEntitlementSpec, pool: PoolState, order: int, now: float, share: float = 1.0
    ) -> None:
        self.name = name
        self.share = share  # fraction of its baseline and ceilings this engine hands out (see PoolState.share)
        self.spec = spec
        self.pool = pool
        self.order = order
        self.cls = spec.qos.service_class
        self.class_weight = CLASS_WEIGHT[self.cls]
        self.slo_ms = spec.qos.slo_target_ms
        self.max_tokens_default = spec.defaults.max_tokens or pool.spec.default_max_tokens
        self.ceiling = None
        self.rescale(share, now)
        # The control loop measures an entitlement in the units it is written in: dimensions filled in from the
        # pool's ratios are enforced but not measured (throughput sampled per period is lumpy, since requests
        # are charged at admission, and would read as bursting or credit where there is none).
        r = spec.resources
        self.measured = (r.tokens_per_second is not None, r.kv_cache_tokens is not None, r.concurrency is not None)
        depth_s = pool.spec.control.burst_seconds
        # Effective allocation (set by the control tick); starts at the baseline.
        self.a_tps, self.a_kv, self.a_conc = self.b_tps, self.b_kv, self.b_conc
        self.bucket = TokenBucket(self.b_tps, self.b_tps * depth_s, now) if self.cls in BASELINE_CLASSES else None
        self.in_flight = 0
        self.kv = 0
        self.reserved = self.cls in RESERVED_CLASSES
        self.lifecycle = Lifecycle.PENDING
        self.weight = 0.0
        self.debt = 0.0
        self.burst = 0.0
        self.active = False
        self.last_arrival = -INF
        self.h_kv = 0.0
        self.h_conc = 0.0
        self.queue: deque[QueuedRequest] = deque()
        self.refused = False  # a request was queued or rejected since the last control tick
        self.area_kv = 0.0  # ∫ kv dt since the last tick
        self.area_conc = 0.0
        self.tokens = 0.0  # throughput tokens charged since the last tick
        self.rate_tps = 0.0  # throughput tokens charged per second over the last control period (for /status)
        self.t_mark = now
        self.admitted_total = 0
        self.rejected_total = 0
        self.rejected_by_reason: dict[str, int] = {}
        self.evicted_total = 0
        self.retired = False  # removed from the config; kept only until its in-flight requests end
        self.shadow = spec.shadow or pool.spec.shadow  # decide and record, never enforce
        self.shadow_queued = 0  # shadow mode: requests admitted that enforcement would have queued
        self.shadow_rejected = 0  # ... or rejected
        self.shadow_by_reason: dict[str, int] = {}

    # What carries over when an entitlement's spec changes (hot reload): everything that is not config.
    CARRY = (
        "in_flight", "kv", "queue", "lifecycle", "weight", "debt", "burst", "active", "last_arrival", "h_kv",
        "h_conc", "refused", "area_kv", "area_conc", "tokens", "t_mark", "admitted_total", "rejected_total",
        "rejected_by_reason", "evicted_total", "rate_tps", "shadow_queued", "shadow_rejected", "shadow_by_reason",
    )  # fmt: skip

    def rescale(self, share: float, now: float) -> None:
        """Baseline and ceilings for handing out `share` of this entitlement (1 alone; less when gateway
        replicas split it). In place: requests, queue, debt and bucket levels stay; allocations follow at the
        next control step."""
        self.share = share
        spec, pool = self.spec, self.pool
        per = pool.spec.per_replica
        kv_per = per.kv_cache_tokens if per.kv_cache_tokens is not None else per.model_geometry.kv_cache_tokens
        b = _fill_baseline(spec, per.tokens_per_second, kv_per, per.concurrency)
        self.b_tps, self.b_kv, self.b_conc = b[0] * share, b[1] * share, b[2] * share
        # Hard ceilings: guaranteed never above baseline; others up to their burst ceilings (or the pool).
        burst = spec.burst
        if self.cls is ServiceClass.GUARANTEED:
            self.c_kv, self.c_conc, c_tps = self.b_kv, self.b_conc, None
        else:
            self.c_kv = burst.kv_cache_tokens * share if burst and burst.kv_cache_tokens is not None else INF
            self.c_conc = burst.concurrency * share if burst and burst.concurrency is not None else INF
            c_tps = burst.tokens_per_second * share if burst and burst.tokens_per_second is not None else None
        depth_s = pool.spec.control.burst_seconds
        if c_tps is None:
            self.ceiling = None
        elif self.ceiling is None:
            self.ceiling = TokenBucket(c_tps, c_tps * depth_s, now)
        else:
            self.ceiling.set_rate(c_tps, c_tps * depth_s, now)

    @property
    def lifecycle(self) -> Lifecycle:
        return self._lifecycle

    @lifecycle.setter
    def lifecycle(self, value: Lifecycle) -> None:
        # `serving` is read on every admission; keep it as a plain attribute.
        self._lifecycle = value
        self.serving = value is Lifecycle.BOUND or value is Lifecycle.DEGRADED


def _fill_baseline(spec: TokenEntitlementSpec, tps: float, kv: int, conc: int) -> tuple[float, float, float]:
    """Baseline per dimension. Dimensions left out follow the pool's per-sequence ratios from the largest share
    given: `concurrency: 6` on a 16-slot, 480 tok/s replica also means 180 tok/s and 6/16 of its KV."""
    if spec.qos.service_class not in BASELINE_CLASSES:
        return 0.0, 0.0, 0.0
    r = spec.resources
    shares = [
        v / cap
        for v, cap in ((r.tokens_per_second, tps), (r.kv_cache_tokens, kv), (r.concurrency, conc))
        if v is not None
    ]
    share = max(shares)
    return (
        float(r.tokens_per_second) if r.tokens_per_second is not None else share * tps,
        float(r.kv_cache_tokens) if r.kv_cache_tokens is not None else share * kv,
        float(r.concurrency) if r.concurrency is not None else share * conc,
    )
