"""The token-pool engine: admission, queue, reconcile/release and the control tick. Pure: no I/O, no clock.

How a request is judged (see docs/ENGINE.md for the why):
1. The entitlement must be Bound or Degraded, the pool must have replicas, the request must fit the pool's KV.
2. Its own ceilings: concurrency and KV ceilings (guaranteed: its baseline; others: `burst`, else the pool),
   the token-rate ceiling (guaranteed: its own bucket; others: `burst.tokensPerSecond`). Blocked → queue.
3. *Protected* work is within the entitlement's effective allocation in every dimension and has tokens in its
   own bucket. It is admitted whenever the pool physically has room; if preemptible work holds that room, the
   engine evicts it; otherwise it waits at the front of the queue.
4. Everything else is *burst* work (spot, preemptible, and anyone above allocation). It may use capacity that
   is neither used nor held as headroom for active entitlements' allocations, and throughput from the pool's
   surplus bucket. When it does not fit, or others are already waiting, the pool is *contended* for it: if its
   weight beats the admission threshold (the lowest weight among admitted work) it queues, else 429.
"""

from __future__ import annotations

import heapq
import itertools
import math

from ..config import Config
from ..config.documents import ServiceClass, TokenEntitlementSpec, TokenPoolSpec
from .decisions import Decision, Events, Reason, Verdict
from .priority import burst_sample, ema, gap_sample, weight
from .state import INF, EntitlementState, Lifecycle, PoolState, QueuedRequest, Reservation

_EPS = 1e-9
_OWN = frozenset({Reason.OVER_CONCURRENCY, Reason.OVER_KV, Reason.OVER_THROUGHPUT})


class Engine:
    def __init__(self, config: Config, now: float = 0.0) -> None:
        self._now = now
        self.pools: dict[str, PoolState] = {}
        self._by_model: dict[str, PoolState] = {}
        for name, doc in config.pools.items():
            pool = PoolState(name, doc.spec, now)
            self.pools[name] = pool
            self._by_model[doc.spec.model] = pool
        self.ents: dict[str, EntitlementState] = {}
        for order, (name, doc) in enumerate(config.entitlements.items()):
            pool = self.pools[doc.spec.pool_ref.name]
            ent = EntitlementState(name, doc.spec, pool, order, now)
            self.ents[name] = ent
            pool.ents.append(ent)
        self.inflight: dict[str, Reservation] = {}
        self.waiting: dict[str, QueuedRequest] = {}
        self._deadlines: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        # Exactly-once accounting, checked by tests: every reservation taken is released once.
        self.reserved_total = 0
        self.released_total = 0
        self.duplicate_releases = 0
        # Pools an autoscaler brings replicas to (the KEDA scaler adds a pool once KEDA asks about it): at zero
        # replicas their requests wait in the queue for the first replica instead of a 503 (scale from zero).
        self.autoscaled: set[str] = set()
        for pool in self.pools.values():
            self._control(pool, now, measure=False)

    # ---- configuration changes -----------------------------------------------------------------------------

    def apply(self, config: Config, now: float) -> Events:
        """Swap in a new configuration without dropping in-flight or queued requests.

        A changed entitlement keeps its requests, debt and counters; new limits apply to new admissions. A
        removed one stops admitting, its waiters get 429 (entitlement_removed), its in-flight requests run to
        the end and are released normally. A removed pool stops receiving requests for its model.
        """
        now = self._clock(now)
        events = Events()
        for name, doc in config.pools.items():
            p = self.pools.get(name)
            if p is None:
                self.pools[name] = PoolState(name, doc.spec, now)
            elif p.spec != doc.spec:
                old_replicas = p.replicas
                p.spec = doc.spec
                p.strict = doc.spec.control.lend_reserved == "preemptible"
                r = doc.spec.replicas
                replicas = r.current if r.current is not None else min(max(old_replicas, r.min), r.max)
                p.set_capacity(replicas, now)
        self._by_model = {doc.spec.model: self.pools[name] for name, doc in config.pools.items()}
        for name in [n for n in self.ents if n not in config.entitlements]:
            self._retire(self.ents.pop(name), Reason.ENTITLEMENT_REMOVED, events)
        replaced: dict[EntitlementState, EntitlementState] = {}  # old state -> its successor, same pool
        for order, (name, doc) in enumerate(config.entitlements.items()):
            old = self.ents.get(name)
            if old is not None and old.spec == doc.spec:
                old.order = order
                continue
            pool = self.pools[doc.spec.pool_ref.name]
            share = old.share if old is not None and old.pool is pool else pool.share
            new = EntitlementState(name, doc.spec, pool, order, now, share)
            if old is not None and old.pool is pool:
                self._carry_over(old, new)
                replaced[old] = new
            elif old is not None:  # moved to another pool: the old one drains where it is
                self._retire(old, Reason.ENTITLEMENT_REMOVED, events)
                pool.ents.append(new)
            else:
                pool.ents.append(new)
            self.ents[name] = new
        if replaced:  # one pass over what points at the old states, however many changed (O(n), not O(n²))
            for r in self.inflight.values():
                r.ent = replaced.get(r.ent, r.ent)
            for p in self.pools.values():
                p.ents = [replaced.get(e, e) for e in p.ents]
        for p in self.pools.values():
            p.ents.sort(key=lambda e: (e.retired, e.order))
            for e in p.ents:
                e.shadow = e.spec.shadow or p.spec.shadow
            self._control(p, now, measure=False, events=events)
            self._dispatch(p, now, events)
        return events

    def set_shares(
        self, pool: str, share: float, entitlement_shares: dict[str, float], now: float, defer: bool = False
    ) -> Events:
        """Hand out only a fraction of the pool: `share` of its capacity, and per entitlement its own fraction
        of baseline and ceilings (default: `share`). Used when several gateway replicas share one pool; the
        fractions of all replicas sum to at most 1, so together they never admit more than the pool has.

        defer: take effect at the pool's next control period instead of now (a control step is O(entitlements);
        folding small share moves into the step that runs anyway keeps them off the admission path). Safe for
        the shared pool because a replica's claim covers the share it still applies."""
        now = self._clock(now)
        if not 0.0 <= share <= 1.0 or any(not 0.0 <= v <= 1.0 for v in entitlement_shares.values()):
            raise ValueError("shares must be within [0, 1]")
        p = self.pools[pool]
        if defer:
            p.pending_shares = (share, dict(entitlement_shares))
            return Events()
        p.pending_shares = None
        self._rescale(p, share, entitlement_shares, now)
        events = Events()
        self._control(p, now, measure=False, events=events)
        self._dispatch(p, now, events)
        return events

    @staticmethod
    def _rescale(p: PoolState, share: float, entitlement_shares: dict[str, float], now: float) -> None:
        p.share = share
        p.set_capacity(p.replicas, now, credit=False)  # a share moved between replicas is not new capacity
        for e in p.ents:
            want = entitlement_shares.get(e.name, share)
            if not e.retired and want != e.share:
                e.rescale(want, now)

    def set_priorities(
        self, pool: str, values: dict[str, tuple[float, float]], now: float, defer: bool = False
    ) -> Events:
        """Adopt pool-wide debt and burst, {entitlement: (debt, burst)}, merged from several gateway replicas,
        so every replica ranks tenants alike; weights, allocations and the queue order follow at once. defer:
        only the weights of these entitlements now (O(len(values))), allocations and queue order at the pool's
        next control period. This is not a control period: the next period's measurement window is left as it is."""
        now = self._clock(now)
        p = self.pools[pool]
        for name, (debt, burst) in values.items():
            e = self.ents.get(name)
            if e is not None and e.pool is p:
                e.debt, e.burst = float(debt), max(0.0, float(burst))
                if defer and e.lifecycle is not Lifecycle.EXPIRED:
                    ctl = p.spec.control
                    e.weight = weight(
                        e.class_weight, e.slo_ms, p.mean_slo, e.burst, e.debt, ctl.alpha_slo, ctl.alpha_burst, ctl.alpha_debt
                    )  # fmt: skip
        events = Events()
        if defer:
            return events
        self._control(p, now, measure=False, events=events)
        self._dispatch(p, now, events)
        return events

    @staticmethod
    def _carry_over(old: EntitlementState, new: EntitlementState) -> None:
        """Requests, queue, debt and counters move to the new state (apply re-points reservations and lists)."""
        for attr in EntitlementState.CARRY:
            setattr(new, attr, getattr(old, attr))
        for mine, theirs in ((new.bucket, old.bucket), (new.ceiling, old.ceiling)):
            if mine is not None and theirs is not None:
                mine.level = min(theirs.level, mine.depth)
        for qr in new.queue:
            qr.ent = new

    def _retire(self, e: EntitlementState, reason: Reason, events: Events) -> None:
        e.lifecycle = Lifecycle.EXPIRED
        e.retired = True
        for qr in list(e.queue):
            self._unqueue(qr)
            events.rejected.append(self._reject(e, qr.rid, reason, None, qr.max_tokens))
        self._set_head(e)
        if not e.in_flight:
            e.pool.ents.remove(e)

    # ---- lookups for adapters -------------------------------------------------------------------------------

    def pool_for_model(self, model: str) -> str | None:
        pool = self._by_model.get(model)
        return pool.name if pool else None

    def entitlement_spec(self, name: str) -> TokenEntitlementSpec | None:
        ent = self.ents.get(name)
        return ent.spec if ent else None

    def concurrency_ceiling(self, name: str) -> int | None:
        """The most requests the entitlement may have in flight now (its ceiling, bounded by the pool)."""
        e = self.ents.get(name)
        if e is None:
            return None
        return int(min(e.c_conc, e.pool.cap_conc))

    def pool_spec(self, name: str) -> TokenPoolSpec | None:
        pool = self.pools.get(name)
        return pool.spec if pool else None

    # ---- admission ------------------------------------------------------------------------------------------

    def admit(
        self, request_id: str, entitlement: str, input_tokens: int, max_tokens: int | None, now: float
    ) -> Decision:
        if now < self._now:  # inlined _clock(): this is the hot path
            now = self._now
        self._now = now
        if request_id in self.inflight or request_id in self.waiting:
            raise ValueError(f"request id {request_id!r} is already known to the engine")
        if input_tokens < 0 or (max_tokens is not None and max_tokens < 0):  # 0: no output (embeddings)
            raise ValueError(f"bad token counts: input={input_tokens} max_tokens={max_tokens}")
        e = self.ents.get(entitlement)
        if e is None:
            return Decision(Verdict.REJECT, request_id, Reason.NOT_BOUND, max_tokens=max_tokens or 0)
        mt = max_tokens if max_tokens is not None else e.max_tokens_default
        if e.shadow:
            return self._admit_shadow(e, request_id, input_tokens, mt, now)
        if not e.serving:
            return self._reject(e, request_id, Reason.NOT_BOUND, None, mt)
        p = e.pool
        e.last_arrival = now
        if not e.active:
            e.active = True
            self._set_head(e)
        kv = input_tokens + mt
        if p.replicas == 0:  # (a replica with share 0 of a live pool is merely contended, below)
            return self._no_capacity(e, request_id, input_tokens, mt, now)
        if kv * p.share > p.cap_kv or kv * e.share > e.c_kv:
            # Larger than the whole pool or the entitlement's ceiling (not just this replica's share of
            # them): it can never fit, no retry helps. One that fits the whole but not the share is contended.
            return self._reject(e, request_id, Reason.OVER_KV, None, mt)

        reason, protected = self._check(e, kv, kv, now)
        behind = False
        if reason is None and (e.queue or (not protected and self._outranked(e, p))):
            reason, behind = Reason.POOL_CONTENDED, True  # others wait already: no jumping the queue
        evict: tuple[str, ...] | list[str] = ()
        if reason is Reason.POOL_CONTENDED and protected and not behind:
            evict = self._evict_for(e, kv, now)
            if evict:
                reason = None
        if reason is None:
            self._reserve(e, request_id, input_tokens, mt, kv, protected, now)
            return Decision(Verdict.ADMIT, request_id, max_tokens=mt, evict=evict)
        if reason in _OWN or protected or e.weight > p.threshold:
            return self._enqueue(e, request_id, input_tokens, mt, reason, now)
        return self._reject(e, request_id, Reason.POOL_CONTENDED, self._retry(e, reason, kv, now), mt)

    def _admit_shadow(self, e: EntitlementState, rid: str, input_tokens: int, mt: int, now: float) -> Decision:
        """Shadow mode: admit() decides as always and records what it would have done, but the request is
        admitted whatever the answer (and nobody is evicted for it). Its reservation counts like any other, so
        the books show the real load and everyone else's decisions stay true."""
        p = e.pool
        e.last_arrival = now
        if not e.active:
            e.active = True
            self._set_head(e)
        kv = input_tokens + mt
        would, reason, protected = Verdict.REJECT, None, False
        if not e.serving:
            reason = Reason.NOT_BOUND
        elif p.replicas == 0:
            reason = Reason.NO_CAPACITY
            if p.name in self.autoscaled:
                would = Verdict.QUEUE
        elif kv * p.share > p.cap_kv or kv * e.share > e.c_kv:
            reason = Reason.OVER_KV
        else:
            reason, protected = self._check(e, kv, kv, now)
            if reason is None and not protected and self._outranked(e, p):
                reason = Reason.POOL_CONTENDED
            if reason is Reason.POOL_CONTENDED and protected and self._evict_for(e, kv, now, dry=True):
                reason = None  # enforcement would admit it by evicting preemptible work: shadow evicts nobody
            if reason is not None and (reason in _OWN or protected or e.weight > p.threshold):
                q = p.spec.queue
                if p.queued < q.max_queued and q.timeout_seconds > 0:
                    would = Verdict.QUEUE
                else:
                    reason = Reason.QUEUE_FULL
        if reason is None:
            would = None
        else:
            e.refused = True  # counts for debt as a real refusal would
            if would is Verdict.QUEUE:
                e.shadow_queued += 1
            else:
                e.shadow_rejected += 1
            e.shadow_by_reason[reason.value] = e.shadow_by_reason.get(reason.value, 0) + 1
        self._reserve(e, rid, input_tokens, mt, kv, protected, now)
        return Decision(Verdict.ADMIT, rid, reason, max_tokens=mt, would=would)

    def _no_capacity(self, e: EntitlementState, rid: str, input_tokens: int, mt: int, now: float) -> Decision:
        """The pool has no replica. If an autoscaler serves it, the request fits one replica and the queue has
        room, it waits for the first replica (the controller sees the queue and asks for one); else 503."""
        p = e.pool
        q = p.spec.queue
        per = p.spec.per_replica
        kv_one = (per.kv_cache_tokens if per.kv_cache_tokens is not None else per.model_geometry.kv_cache_tokens) * p.share
        if (
            p.name in self.autoscaled
            and p.spec.replicas.max > 0
            and input_tokens + mt <= min(kv_one, e.c_kv)
            and q.timeout_seconds > 0
            and p.queued < q.max_queued
            and len(e.queue) < q.max_queued_per_entitlement
        ):
            return self._enqueue(e, rid, input_tokens, mt, Reason.NO_CAPACITY, now)
        return self._reject(e, rid, Reason.NO_CAPACITY, p.spec.control.scale_up_seconds, mt)

    def _check(self, e: EntitlementState, kv: float, cost: float, now: float) -> tuple[Reason | None, bool]:
        """Can `e` start a request of this size now? Returns (blocking reason or None, protected)."""
        p = e.pool
        if e.in_flight + 1 > e.c_conc:
            return Reason.OVER_CONCURRENCY, False
        if e.kv + kv > e.c_kv:
            return Reason.OVER_KV, False
        if e.ceiling is not None:
            e.ceiling.refill(now)
            if not e.ceiling.can_take(cost):
                return Reason.OVER_THROUGHPUT, False
        b = e.bucket
        if b is not None:
            spill = b.refill(now)
            if spill:
                p.surplus.refill(now)
                p.surplus.level = min(p.surplus.depth, p.surplus.level + spill)
            if e.cls is ServiceClass.GUARANTEED and not b.can_take(cost):
                return Reason.OVER_THROUGHPUT, False
            if e.in_flight + 1 <= e.a_conc + _EPS and e.kv + kv <= e.a_kv + _EPS and b.can_take(cost):
                # Protected work uses its own held headroom, never another's (an elastic tenant back from idle
                # waits for what was lent out while it was away; it must not take a guaranteed tenant's slot).
                conc_short, kv_short = self._shortfall(e, kv)
                if conc_short <= _EPS and kv_short <= _EPS:
                    return None, True
                return Reason.POOL_CONTENDED, True
        # Burst work: only what is neither used nor held for others' allocations. Preemptible work may borrow the
        # held part too: it is evicted when the owner needs it back.
        free_conc = p.cap_conc - p.used_conc
        free_kv = p.cap_kv - p.used_kv
        if e.cls is not ServiceClass.PREEMPTIBLE:
            # Preemptible work may sit inside that headroom (it is evicted when the owner comes back): count
            # it there, not twice, so the held part is what headroom preemptible work does not already fill.
            held_conc = p.head_conc - e.h_conc - p.pre_conc
            held_kv = p.head_kv - e.h_kv - p.pre_kv
            free_conc -= held_conc if held_conc > 0.0 else 0.0
            free_kv -= held_kv if held_kv > 0.0 else 0.0
        if free_conc < 1 - _EPS or free_kv < kv - _EPS:
            return Reason.POOL_CONTENDED, False
        p.surplus.refill(now)
        if not p.surplus.can_take(cost):
            return Reason.POOL_CONTENDED, False
        return None, False

    @staticmethod
    def _outranked(e: EntitlementState, p: PoolState) -> bool:
        """Is a waiter blocked by the pool (not by its own ceiling) ahead of `e`: at least its weight, and
        there first? Then `e` must queue behind it rather than take the capacity it is waiting for."""
        key = p.blocked_key
        return key is not None and key <= (-e.weight, -e.debt)

    def _reserve(self, e, rid, input_tokens, max_tokens, kv, protected, now) -> None:
        p = e.pool
        dt = now - e.t_mark  # _mark(), inlined on the hot path
        if dt > 0:
            e.area_kv += e.kv * dt
            e.area_conc += e.in_flight * dt
            e.t_mark = now
        cost = kv
        if protected:
            e.bucket.level -= cost
        else:
            p.surplus.level -= cost
        if e.ceiling is not None:
            e.ceiling.level -= cost
        e.tokens += cost
        e.in_flight += 1
        e.kv += kv
        p.used_conc += 1
        p.used_kv += kv
        if e.cls is ServiceClass.PREEMPTIBLE:
            p.pre_conc += 1
            p.pre_kv += kv
        end = now + p.expected_duration(cost)
        r = Reservation(rid, e, cost, kv, protected, input_tokens, max_tokens, now, end)
        p.inflight[rid] = r
        self.inflight[rid] = r
        heapq.heappush(p.completions, (end, rid))
        if e.weight < p.threshold:
            p.threshold = e.weight
        e.admitted_total += 1
        self.reserved_total += 1
        if e.bucket is not None:  # only baseline holders have headroom to update
            self._set_head(e)

    @staticmethod
    def _shortfall(e: EntitlementState, kv: float) -> tuple[float, float]:
        """How much concurrency and KV a protected request of `e` lacks.

        Dedicated and guaranteed work within baseline needs only physical room: Σ of their baselines fits the
        pool, so one of them within its own baseline can never take what another is owed, and the capacity
        they are owed but burst work still holds (an entitlement created, or capacity lost, while spot ran)
        is won back from that burst work as it drains, not from each other. Elastic work must also leave
        others' held headroom alone: an elastic tenant back from idle waits for what was lent out meanwhile.
        """
        p = e.pool
        conc = p.used_conc + 1 - p.cap_conc
        kv_ = p.used_kv + kv - p.cap_kv
        if not e.reserved:
            return conc + p.head_conc - e.h_conc, kv_ + p.head_kv - e.h_kv
        others_c, others_k = p.rhead_conc - e.h_conc, p.rhead_kv - e.h_kv
        if conc + others_c <= _EPS and kv_ + others_k <= _EPS:
            return conc + others_c, kv_ + others_k  # the common case: every reserved headroom is backed
        # Burst work still holds capacity some are owed: free room backs reserved headroom in binding order,
        # so an entitlement never loses its own freed slot to one bound after it (rare path: O(reserved)).
        before_c = before_k = 0.0
        for r in p.ents:
            if r is e:
                break
            if r.reserved:
                before_c += r.h_conc
                before_k += r.h_kv
        return conc + min(before_c, max(0.0, -conc + 1)), kv_ + min(before_k, max(0.0, -kv_ + kv))

    def _evict_for(self, e: EntitlementState, kv: float, now: float, dry: bool = False) -> list[str]:
        """Preemptible requests of lower weight to terminate so that protected work of `e` fits; [] if none do.
        dry: only say which (shadow mode), terminate nothing."""
        p = e.pool
        need_conc, need_kv = self._shortfall(e, kv)
        victims = sorted(
            (r for r in p.inflight.values() if r.ent.cls is ServiceClass.PREEMPTIBLE and r.ent.weight < e.weight),
            key=lambda r: (r.ent.weight, -r.start),  # lowest priority first, then the one with least work done
        )
        chosen: list[Reservation] = []
        for r in victims:
            if need_conc <= _EPS and need_kv <= _EPS:
                break
            chosen.append(r)
            need_conc -= 1
            need_kv -= r.kv
        if need_conc > _EPS or need_kv > _EPS:
            return []
        if dry:
            return [r.rid for r in chosen]
        for r in chosen:
            r.ent.evicted_total += 1
            self._free(r, r.input_tokens + r.output, now)
        return [r.rid for r in chosen]

    # ---- queue ----------------------------------------------------------------------------------------------

    def _enqueue(self, e, rid, input_tokens, mt, reason, now) -> Decision:
        p = e.pool
        q = p.spec.queue
        e.refused = True
        if p.queued >= q.max_queued or len(e.queue) >= q.max_queued_per_entitlement or q.timeout_seconds <= 0:
            return self._reject(e, rid, Reason.QUEUE_FULL, self._retry(e, reason, input_tokens + mt, now), mt)
        seq = next(self._seq)
        deadline = now + q.timeout_seconds
        qr = QueuedRequest(rid, e, input_tokens, mt, now, deadline, seq)
        e.queue.append(qr)
        if len(e.queue) == 1:
            heapq.heappush(p.queue_heap, (-e.weight, -e.debt, now, seq, e.name))
        if reason is Reason.POOL_CONTENDED:
            key = (-e.weight, -e.debt)
            if p.blocked_key is None or key < p.blocked_key:
                p.blocked_key = key
        self.waiting[rid] = qr
        p.queued += 1
        heapq.heappush(self._deadlines, (deadline, seq, rid))
        self._set_head(e)
        retry = self._retry(e, reason, input_tokens + mt, now)
        if reason is Reason.OVER_THROUGHPUT:
            p.wake = min(p.wake, now + self._refill_time(e, reason, input_tokens + mt))
        return Decision(Verdict.QUEUE, rid, reason, retry, deadline, mt)

    @staticmethod
    def _refill_time(e: EntitlementState, reason: Reason, cost: float) -> float:
        """When the bucket blocking this request will hold enough (for waking the queue, not for clients)."""
        if reason is Reason.OVER_THROUGHPUT:
            if e.ceiling is not None and not e.ceiling.can_take(cost):
                return e.ceiling.time_until(cost)
            return e.bucket.time_until(cost) if e.bucket is not None else INF
        return e.pool.surplus.time_until(cost)

    def _unqueue(self, qr: QueuedRequest) -> None:
        e = qr.ent
        was_head = e.queue[0] is qr
        e.queue.remove(qr)
        del self.waiting[qr.rid]
        e.pool.queued -= 1
        if was_head and e.queue:
            head = e.queue[0]
            heapq.heappush(e.pool.queue_heap, (-e.weight, -e.debt, head.arrival, head.seq, e.name))

    def _dispatch(self, p: PoolState, now: float, events: Events) -> None:
        """Admit waiters in priority order while they fit. A waiter blocked by its own ceiling steps aside; one
        blocked by the pool keeps its place and nobody behind it goes first (no starvation of large requests)."""
        p.wake = INF
        p.blocked_key = None
        if not p.queued:
            return
        heap = p.queue_heap
        aside = []
        while heap:
            entry = heap[0]
            e = self.ents[entry[4]]
            if not e.queue or e.queue[0].seq != entry[3]:
                heapq.heappop(heap)
                continue
            qr = e.queue[0]
            kv = qr.input_tokens + qr.max_tokens
            reason, protected = self._check(e, kv, kv, now)
            if reason is Reason.POOL_CONTENDED and protected:
                evicted = self._evict_for(e, kv, now)
                if evicted:
                    events.evicted.extend(evicted)
                    reason = None
            if reason is None:
                heapq.heappop(heap)
                self._unqueue(qr)
                self._reserve(e, qr.rid, qr.input_tokens, qr.max_tokens, kv, protected, now)
                events.admitted.append(qr.rid)
                continue
            if reason is Reason.OVER_THROUGHPUT or (reason is Reason.POOL_CONTENDED and not p.surplus.can_take(kv)):
                p.wake = min(p.wake, now + self._refill_time(e, reason, kv))
            if reason in _OWN or (protected and e.reserved):
                # Blocked by its own ceiling, or owed capacity burst work still holds (it comes back as that
                # drains, and burst cannot take more meanwhile): step aside rather than block the queue.
                aside.append(heapq.heappop(heap))
                continue
            p.blocked_key = (entry[0], entry[1])
            break
        for entry in aside:
            heapq.heappush(heap, entry)

    # ---- reconcile and release ------------------------------------------------------------------------------

    def progress(self, request_id: str, output_tokens: int, now: float) -> None:
        """Output streamed so far. KV grows only if the request outgrows its reservation (an underestimated
        prompt, or an upstream ignoring max_tokens), so the books match what the GPU really holds."""
        r = self.inflight.get(request_id)
        if r is None:
            return
        now = self._clock(now)
        r.output = output_tokens
        grow = r.input_tokens + output_tokens - r.kv
        if grow > 0:
            e = r.ent
            self._mark(e, now)
            r.kv += grow
            e.kv += grow
            e.pool.used_kv += grow
            if e.cls is ServiceClass.PREEMPTIBLE:
                e.pool.pre_kv += grow
            self._set_head(e)

    def finish(self, request_id: str, input_tokens: int | None, output_tokens: int, now: float) -> Events:
        """The request ended with real usage: charge the difference to the buckets it used, release the rest."""
        now = self._clock(now)
        r = self.inflight.get(request_id)
        if r is None:
            return self.release(request_id, now)
        used = (input_tokens if input_tokens is not None else r.input_tokens) + output_tokens
        return self._free(r, used, now, dispatch=True)

    def release(self, request_id: str, now: float) -> Events:
        """Abort (client gone, upstream error, queued request cancelled). Idempotent: a second call is counted
        in `duplicate_releases` and does nothing else."""
        now = self._clock(now)
        r = self.inflight.get(request_id)
        if r is not None:
            return self._free(r, r.input_tokens + r.output, now, dispatch=True)
        qr = self.waiting.get(request_id)
        if qr is not None:
            self._unqueue(qr)
            self._set_head(qr.ent)
            return Events()
        self.duplicate_releases += 1
        return Events()

    def _free(self, r: Reservation, used_tokens: float, now: float, dispatch: bool = False) -> Events:
        e = r.ent
        p = e.pool
        dt = now - e.t_mark  # _mark(), inlined on the hot path
        if dt > 0:
            e.area_kv += e.kv * dt
            e.area_conc += e.in_flight * dt
            e.t_mark = now
        diff = used_tokens - r.cost  # > 0: real usage beyond the reservation puts the bucket into debt
        if r.protected:
            e.bucket.level -= diff
        else:
            p.surplus.level -= diff
        if e.ceiling is not None:
            e.ceiling.level -= diff
        e.tokens += diff
        e.in_flight -= 1
        e.kv -= r.kv
        p.used_conc -= 1
        p.used_kv -= r.kv
        if e.cls is ServiceClass.PREEMPTIBLE:
            p.pre_conc -= 1
            p.pre_kv -= r.kv
        del p.inflight[r.rid]
        del self.inflight[r.rid]
        self.released_total += 1
        if e.bucket is not None or e.h_conc or e.h_kv:
            self._set_head(e)
        if e.retired and not e.in_flight:
            p.ents.remove(e)
        if len(p.completions) > 2 * len(p.inflight) + 64:  # drop stale entries so the heap stays bounded
            p.completions = [(x.end, x.rid) for x in p.inflight.values()]
            heapq.heapify(p.completions)
        events = Events()
        if dispatch:
            self._dispatch(p, now, events)
        return events

    # ---- control tick ---------------------------------------------------------------------------------------

    def tick(self, now: float) -> Events:
        """Expire queue deadlines and entitlements; run each pool's control step when its period is due."""
        now = self._clock(now)
        events = Events()
        dl = self._deadlines
        while dl and dl[0][0] <= now:
            _, seq, rid = heapq.heappop(dl)
            qr = self.waiting.get(rid)
            if qr is None or qr.seq != seq:
                continue
            self._unqueue(qr)
            e = qr.ent
            self._set_head(e)
            kv = qr.input_tokens + qr.max_tokens
            retry = self._retry(e, Reason.POOL_CONTENDED, kv, now)
            events.rejected.append(self._reject(e, rid, Reason.QUEUE_TIMEOUT, retry, qr.max_tokens))
        for p in self.pools.values():
            if now - p.last_control >= p.spec.control.period_seconds - _EPS:
                self._control(p, now, measure=True, events=events)
            self._dispatch(p, now, events)
        return events

    def next_wakeup(self) -> float | None:
        """Earliest engine time at which tick() has work: a queue deadline or a control period."""
        times = [min(p.last_control + p.spec.control.period_seconds, p.wake) for p in self.pools.values()]
        dl = self._deadlines
        while dl and (dl[0][2] not in self.waiting or self.waiting[dl[0][2]].seq != dl[0][1]):
            heapq.heappop(dl)
        if dl:
            times.append(dl[0][0])
        return min(times) if times else None

    def set_replicas(self, pool: str, replicas: int, now: float) -> Events:
        """Capacity changed (autoscaler, outage): re-bind, re-allocate, and admit what now fits."""
        now = self._clock(now)
        p = self.pools[pool]
        p.set_capacity(replicas, now)
        events = Events()
        self._control(p, now, measure=False, events=events)
        self._dispatch(p, now, events)
        return events

    def _control(self, p: PoolState, now: float, measure: bool, events: Events | None = None) -> None:
        ctl = p.spec.control
        dt = now - p.last_control
        if measure:  # only a real control period restarts the measurement window
            if dt > 0:
                self._measure(p, now, dt)
            p.last_control = now
        if p.pending_shares is not None:  # deferred by set_shares: measured with the old shares, applied now
            share, named = p.pending_shares
            p.pending_shares = None
            self._rescale(p, share, named, now)
        for e in p.ents:
            if e.spec.expires_at is not None and now >= e.spec.expires_at and e.lifecycle is not Lifecycle.EXPIRED:
                e.lifecycle = Lifecycle.EXPIRED
                for qr in list(e.queue):
                    self._unqueue(qr)
                    if events is not None:
                        events.rejected.append(self._reject(e, qr.rid, Reason.NOT_BOUND, None, qr.max_tokens))
        serving = [e for e in p.ents if e.lifecycle is not Lifecycle.EXPIRED]
        p.mean_slo = mean_slo = sum(e.slo_ms for e in serving) / len(serving) if serving else 0.0
        for e in serving:
            e.weight = weight(
                e.class_weight, e.slo_ms, mean_slo, e.burst, e.debt, ctl.alpha_slo, ctl.alpha_burst, ctl.alpha_debt
            )
        self._allocate(p, serving, now)
        # Weights moved: re-key the queue; refresh the admission threshold from what is admitted now.
        p.queue_heap = [
            (-e.weight, -e.debt, e.queue[0].arrival, e.queue[0].seq, e.name) for e in p.ents if e.queue
        ]
        heapq.heapify(p.queue_heap)
        p.threshold = min((e.weight for e in p.ents if e.in_flight), default=INF)

    def _measure(self, p: PoolState, now: float, dt: float) -> None:
        """Eq. 2 and 3 from what each entitlement really used over the period (time-averaged)."""
        ctl = p.spec.control
        for e in p.ents:
            if not (e.active or e.in_flight or e.refused or e.tokens or e.area_kv or e.area_conc or e.burst or e.debt
                    or e.rate_tps):  # fmt: skip
                continue  # idle with nothing to measure or decay: every value below would stay as it is
            self._mark(e, now)
            usage = (e.tokens / dt, e.area_kv / dt, e.area_conc / dt)
            e.rate_tps = usage[0]
            e.tokens = e.area_kv = e.area_conc = 0.0
            if e.bucket is not None:
                m = e.measured
                base = (e.b_tps if m[0] else 0.0, e.b_kv if m[1] else 0.0, e.b_conc if m[2] else 0.0)
                e.burst = ema(e.burst, burst_sample(usage, base), ctl.gamma_burst)
                gap = gap_sample(usage, base, e.refused) if (e.active or e.refused) else 0.0
                e.debt = ema(e.debt, gap, ctl.gamma_debt)
            else:  # no baseline: burst is measured against the ceilings, when there are any
                ceil = (e.ceiling.rate if e.ceiling else 0.0, _finite(e.c_kv), _finite(e.c_conc))
                e.burst = ema(e.burst, burst_sample(usage, ceil), ctl.gamma_burst)
            e.refused = False
            if e.active and not e.in_flight and not e.queue and now - e.last_arrival >= ctl.idle_seconds:
                e.active = False

    def _allocate(self, p: PoolState, serving: list[EntitlementState], now: float) -> None:
        """Binding and effective allocations per dimension.

        Reserved classes (dedicated, guaranteed) bind in config order while Σ baselines fits the capacity; one
        that no longer fits after capacity shrank is Degraded and shares what is left pro rata. Elastic
        entitlements share what the reserved classes leave; when active elastic baselines exceed it they are
        shrunk by weighted water-filling on w_e · baseline (so debt, through the weight, wins share back).
        """
        caps = (p.cap_tps, p.cap_kv, p.cap_conc)
        c_tps, c_kv, c_conc = caps[0] + _EPS, caps[1] + _EPS, caps[2] + _EPS
        u_tps = u_kv = u_conc = 0.0  # Σ baselines bound so far (scalars: this loop runs over every entitlement)
        degraded: list[EntitlementState] = []
        for e in serving:
            if not e.reserved:
                continue
            base = (e.b_tps, e.b_kv, e.b_conc)
            if u_tps + base[0] <= c_tps and u_kv + base[1] <= c_kv and u_conc + base[2] <= c_conc:
                u_tps += base[0]
                u_kv += base[1]
                u_conc += base[2]
                if e.lifecycle is not Lifecycle.BOUND:
                    # Newly bound, or whole again after capacity came back (e.g. from zero replicas, where its
                    # bucket had no depth): it starts with a full bucket, as at creation, not an empty one.
                    e.bucket.set_rate(e.b_tps, e.b_tps * p.spec.control.burst_seconds, now)
                    e.bucket.level = e.bucket.depth
                e.lifecycle = Lifecycle.BOUND
                e.a_tps, e.a_kv, e.a_conc = base
            elif e.lifecycle is Lifecycle.PENDING:
                e.a_tps = e.a_kv = e.a_conc = 0.0
            else:
                e.lifecycle = Lifecycle.DEGRADED
                degraded.append(e)
        rest = [max(0.0, caps[0] - u_tps), max(0.0, caps[1] - u_kv), max(0.0, caps[2] - u_conc)]
        if degraded:
            for i, attr in enumerate(("tps", "kv", "conc")):
                total = sum(getattr(e, "b_" + attr) for e in degraded)
                for e in degraded:
                    b = getattr(e, "b_" + attr)
                    setattr(e, "a_" + attr, min(b, rest[i] * b / total) if total else 0.0)
                rest[i] -= sum(getattr(e, "a_" + attr) for e in degraded)
        elastic = [e for e in serving if e.cls is ServiceClass.ELASTIC]
        for i, attr in enumerate(("tps", "kv", "conc")):
            active = [e for e in elastic if e.active]
            shares = _water_fill(rest[i], [(getattr(e, "b_" + attr), e.weight) for e in active])
            for e, share in zip(active, shares):
                setattr(e, "a_" + attr, share)
            for e in elastic:
                if not e.active:
                    setattr(e, "a_" + attr, getattr(e, "b_" + attr))  # nominal; an idle one holds nothing
        for e in elastic:
            shrunk = e.a_tps < e.b_tps - _EPS or e.a_kv < e.b_kv - _EPS or e.a_conc < e.b_conc - _EPS
            e.lifecycle = Lifecycle.DEGRADED if shrunk else Lifecycle.BOUND
        for e in serving:
            if e.cls is ServiceClass.SPOT or e.cls is ServiceClass.PREEMPTIBLE:
                e.lifecycle = Lifecycle.BOUND
        depth_s = p.spec.control.burst_seconds
        reserved_rate = 0.0
        spill = 0.0
        for e in p.ents:
            if e.bucket is not None:
                spill += e.bucket.set_rate(e.a_tps, e.a_tps * depth_s, now)
            elif not e.h_conc and not e.h_kv:
                continue  # spot and preemptible hold no headroom (the _set_head early return, without the call)
            if e.serving and e.bucket is not None and (e.active or (e.reserved and p.strict)):
                reserved_rate += e.a_tps  # the same entitlements that hold headroom (see _set_head)
            self._set_head(e)
        surplus = p.surplus
        surplus.set_rate(max(0.0, p.cap_tps - reserved_rate), p.cap_tps * depth_s, now)
        surplus.level = min(surplus.depth, surplus.level + spill)

    # ---- bookkeeping ----------------------------------------------------------------------------------------

    def _clock(self, now: float) -> float:
        """The engine's time never runs backwards: a wall clock stepped back is held at the last time seen."""
        if now < self._now:
            return self._now
        self._now = now
        return now

    @staticmethod
    def _mark(e: EntitlementState, now: float) -> None:
        dt = now - e.t_mark
        if dt > 0:
            e.area_kv += e.kv * dt
            e.area_conc += e.in_flight * dt
            e.t_mark = now

    @staticmethod
    def _set_head(e: EntitlementState) -> None:
        """Keep the pool's held headroom equal to Σ max(0, allocation − used) over the entitlements that hold
        it: dedicated and guaranteed always (unless lendReserved is "idle" and they are idle), elastic while
        active. Burst work other than preemptible may not use held headroom."""
        if e.bucket is None and not e.h_conc and not e.h_kv:
            return  # spot and preemptible hold nothing: the common case, kept cheap
        if e.serving and e.bucket is not None and (e.active or (e.reserved and e.pool.strict)):
            hk = e.a_kv - e.kv
            hc = e.a_conc - e.in_flight
            hk = hk if hk > 0.0 else 0.0
            hc = hc if hc > 0.0 else 0.0
        else:
            hk = hc = 0.0
        p = e.pool
        p.head_kv += hk - e.h_kv
        p.head_conc += hc - e.h_conc
        if e.reserved:
            p.rhead_kv += hk - e.h_kv
            p.rhead_conc += hc - e.h_conc
        e.h_kv = hk
        e.h_conc = hc

    def _reject(self, e, rid, reason: Reason, retry: float | None, mt: int) -> Decision:
        if e is not None:
            e.refused = True
            e.rejected_total += 1
            e.rejected_by_reason[reason.value] = e.rejected_by_reason.get(reason.value, 0) + 1
        return Decision(Verdict.REJECT, rid, reason, retry, max_tokens=mt)

    def _retry(self, e: EntitlementState, reason: Reason, cost: float, now: float) -> float | None:
        """Seconds until the capacity this request needs is expected to be free: bucket refill time for
        throughput, expected completions (plus the waiters ahead) for slots and KV."""
        p = e.pool
        if p.replicas == 0:  # nothing runs until a replica comes up
            return p.spec.control.scale_up_seconds
        if p.cap_conc == 0:  # this gateway replica holds no share now: shares are re-leased every period
            return p.spec.control.period_seconds
        if reason is Reason.OVER_THROUGHPUT:
            bucket = e.ceiling if e.ceiling is not None and not e.ceiling.can_take(cost) else e.bucket
            t = bucket.time_until(cost) if bucket is not None else math.inf
            return t if math.isfinite(t) else None
        if reason in (Reason.OVER_CONCURRENCY, Reason.OVER_KV):
            ends = [r.end for r in p.inflight.values() if r.ent is e]
            return max(0.0, min(ends) - now) if ends else 0.0
        # Pool-wide: the next completion, then one more service slot per waiter ahead.
        comp = p.completions
        while comp and comp[0][1] not in p.inflight:
            heapq.heappop(comp)
        first = max(0.0, comp[0][0] - now) if comp else 0.0
        per_slot = p.expected_duration(cost) / max(p.cap_conc, 1)
        t = first + p.queued * per_slot
        if e.bucket is None or not e.bucket.can_take(cost):
            st = p.surplus.time_until(cost)
            if math.isfinite(st):
                t = max(t, st)
        return t

    # ---- views ----------------------------------------------------------------------------------------------

    def snapshot(self, now: float) -> dict:
        """The /status document: per pool capacity and use per dimension, per entitlement its state."""
        now = self._clock(now)
        pools = {}
        for p in self.pools.values():
            p.surplus.refill(now)
            pools[p.name] = {
                "model": p.spec.model,
                "replicas": p.replicas,
                "capacity": {"tokens_per_second": p.cap_tps, "kv_cache_tokens": p.cap_kv, "concurrency": p.cap_conc},
                "used": {
                    "tokens_per_second": round(sum(e.rate_tps for e in p.ents), 3),
                    "kv_cache_tokens": p.used_kv,
                    "concurrency": p.used_conc,
                },
                "held_headroom": {"kv_cache_tokens": round(p.head_kv, 3), "concurrency": round(p.head_conc, 3)},
                "surplus_tokens": round(p.surplus.level, 3),
                "surplus_rate": round(p.surplus.rate, 3),
                "queued": p.queued,
                "in_flight": len(p.inflight),
                "admission_threshold": p.threshold if math.isfinite(p.threshold) else None,
                "shadow": p.spec.shadow,
            }
        ents = {}
        for e in self.ents.values():
            ents[e.name] = {
                "tenant": e.spec.tenant_id,
                "pool": e.pool.name,
                "class": e.cls.value,
                "state": e.lifecycle.value,
                "active": e.active,
                "in_flight": e.in_flight,
                "reserved_kv_tokens": e.kv,
                "queued": len(e.queue),
                # In use now (KV, concurrency) and charged per second over the last control period (throughput).
                "used": {"tokens_per_second": round(e.rate_tps, 3), "kv_cache_tokens": e.kv, "concurrency": e.in_flight},
                "baseline": {"tokens_per_second": e.b_tps, "kv_cache_tokens": e.b_kv, "concurrency": e.b_conc},
                "ceiling": {
                    "tokens_per_second": e.ceiling.rate if e.ceiling else (e.b_tps if e.cls is ServiceClass.GUARANTEED else None),
                    "kv_cache_tokens": _finite_or_none(e.c_kv),
                    "concurrency": _finite_or_none(e.c_conc),
                },
                "allocation": {"tokens_per_second": e.a_tps, "kv_cache_tokens": e.a_kv, "concurrency": e.a_conc},
                "debt": round(e.debt, 6),
                "burst": round(e.burst, 6),
                "weight": round(e.weight, 6),
                "admitted_total": e.admitted_total,
                "rejected_total": e.rejected_total,
                "rejected_by_reason": dict(e.rejected_by_reason),
                "evicted_total": e.evicted_total,
                "shadow": e.shadow,
                # Shadow mode: admitted although enforcement would have queued / rejected them (and why).
                "shadow_would": {"queue": e.shadow_queued, "reject": e.shadow_rejected, "by_reason": dict(e.shadow_by_reason)},
            }
        return {"pools": pools, "entitlements": ents}

    def check_invariants(self) -> None:
        """Raise AssertionError when the books do not balance (used by tests and the simulator)."""
        for p in self.pools.values():
            assert p.used_conc == sum(e.in_flight for e in p.ents), "pool concurrency != Σ entitlements"
            assert abs(p.used_kv - sum(e.kv for e in p.ents)) < 1e-6, "pool KV != Σ entitlements"
            assert p.used_conc == len(p.inflight)
            assert p.queued == sum(len(e.queue) for e in p.ents)
            assert abs(p.head_conc - sum(e.h_conc for e in p.ents)) < 1e-6
            assert p.pre_conc == sum(e.in_flight for e in p.ents if e.cls is ServiceClass.PREEMPTIBLE)
            assert abs(p.rhead_conc - sum(e.h_conc for e in p.ents if e.reserved)) < 1e-6
            for e in p.ents:
                assert e.in_flight >= 0 and e.kv >= 0
        assert len(self.inflight) == self.reserved_total - self.released_total


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def _water_fill(capacity: float, claims: list[tuple[float, float]]) -> list[float]:
    """Split `capacity` among (cap, weight) claims in proportion to weight · cap, none above its cap."""
    shares = [0.0] * len(claims)
    open_ = [i for i, (cap, _) in enumerate(claims) if cap > 0]
    left = capacity
    while open_ and left > _EPS:
        total = sum(claims[i][1] * claims[i][0] for i in open_)
        if total <= 0:
            break
        capped = [i for i in open_ if left * claims[i][1] * claims[i][0] / total >= claims[i][0] - shares[i]]
        if not capped:
            for i in open_:
                shares[i] += left * claims[i][1] * claims[i][0] / total
            break
        for i in capped:
            left -= claims[i][0] - shares[i]
            shares[i] = claims[i][0]
        open_ = [i for i in open_ if i not in capped]
    return shares
