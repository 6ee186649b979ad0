"""The control loop beside the engine: follow the replicas that are really up, and decide how many are needed.

Every `period` seconds:
1. scrape each pool's backends (`/metrics`, see backends.py); once every backend has answered or failed for
   good, the number that are up is the pool's replica count in the engine (`engine.set_replicas`), which
   re-binds entitlements (Bound ↔ Degraded, Pending → Bound) and admits what now fits; the adapter carries out
   the events. A pool without configured backends keeps the replica count its config gives.
2. compute each pool's required capacity and the replica count to ask for (capacity.py: formula, hysteresis);
   KEDA reads it through the external scaler (service.py).

Between periods a light check runs every `wake_interval` seconds: a pool that asks for no replicas but has
work queued or in flight is recomputed at once, so scale-from-zero is pushed to StreamIsActive within that
interval instead of a period.

Runs on the server's event loop like everything that touches the engine, so no locks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import structlog

from ..engine import Engine
from ..engine.decisions import Events
from .backends import BackendSet
from .capacity import DIMENSIONS, Hysteresis, Requirement, ScalingPolicy, UsageAverager, per_replica, requirement

log = structlog.get_logger("tokenpools.scaler")

HISTORY = 64  # desired-replica changes kept per pool for /status/scaler


@dataclass(frozen=True)
class ControllerOptions:
    policy: ScalingPolicy = ScalingPolicy()
    backends: dict[str, list[str]] = field(default_factory=dict)  # pool -> backend URLs
    period_s: float = 1.0  # control period: scrape, follow replicas, recompute
    wake_interval_s: float = 0.1  # scale-from-zero check between periods
    scrape_timeout_s: float = 2.0


@dataclass
class PoolControl:
    hysteresis: Hysteresis
    backends: BackendSet | None = None
    requirement: Requirement | None = None
    desired: int = 0
    active: bool = False
    changes: list[tuple[float, int]] = field(default_factory=list)  # (time, desired) at each change
    followed: int | None = None  # replica count last set in the engine from live backends


class Controller:
    def __init__(
        self,
        engine: Engine,
        dispatch: Callable[[Events], None] = lambda events: None,
        clock: Callable[[], float] = time.time,
        options: ControllerOptions | None = None,
    ) -> None:
        self.engine = engine
        self.dispatch = dispatch
        self.clock = clock
        self.options = options or ControllerOptions()
        self.policy = self.options.policy
        self.averager = UsageAverager(self.policy.usage_window_s)
        self.pools: dict[str, PoolControl] = {}
        self._subscribers: dict[str, set[asyncio.Queue]] = {}
        self._tasks: list[asyncio.Task] = []
        self._session: aiohttp.ClientSession | None = None
        self.steps = 0

    # ---- the pure-ish part: decide from engine state (tests call these directly) ---------------------------

    def _pool(self, name: str) -> PoolControl:
        pc = self.pools.get(name)
        if pc is None:
            pc = PoolControl(Hysteresis(self.policy.scale_down_delay_s, self.policy.scale_down_band))
            urls = self.options.backends.get(name)
            if urls:
                pc.backends = BackendSet(urls)
            self.pools[name] = pc
        return pc

    def step(self, now: float | None = None, only: str | None = None) -> None:
        """Recompute required capacity and desired replicas (all pools, or one); publish activity changes."""
        now = self.clock() if now is None else now
        self.steps += 1
        names = [only] if only is not None else list(self.engine.pools)
        for name in names:
            p = self.engine.pools.get(name)
            if p is None:
                continue
            pc = self._pool(name)
            req = requirement(p, self.averager, self.policy, now)
            r = p.spec.replicas
            current = min(max(p.replicas, r.min), r.max)
            if pc.backends is not None and not pc.backends.settled and pc.hysteresis.desired is None:
                # Not yet known what runs: answer, but start the hysteresis from the replicas really up.
                desired = max(req.needed, current)
            else:
                desired = pc.hysteresis.step(req.needed, req.needed_with_band, now, current)
            pc.requirement = req
            if desired != pc.desired or not pc.changes:
                pc.changes.append((now, desired))
                del pc.changes[:-HISTORY]
                if pc.changes[:-1]:
                    log.info("desired replicas", pool=name, desired=desired, was=pc.desired, binding=req.binding)
            pc.desired = desired
            self._set_active(name, pc, desired > 0)
        if only is None:
            for gone in [n for n in self.pools if n not in self.engine.pools]:
                self._set_active(gone, self.pools.pop(gone), False)
            self.averager.forget_except(set(self.engine.ents))

    def _set_active(self, name: str, pc: PoolControl, active: bool) -> None:
        if active == pc.active:
            return
        pc.active = active
        for q in self._subscribers.get(name, ()):
            q.put_nowait(active)

    def follow(self, name: str, live: int, now: float | None = None) -> None:
        """The pool really has `live` replicas: move the engine's capacity there and carry out the events."""
        p = self.engine.pools.get(name)
        if p is None:
            return
        pc = self._pool(name)
        pc.followed = live
        if p.replicas == live:
            return
        now = self.clock() if now is None else now
        was = p.replicas
        events = self.engine.set_replicas(name, live, now)
        log.info("replicas changed", pool=name, replicas=live, was=was)
        self.dispatch(events)

    def wake_check(self, now: float | None = None) -> None:
        """A pool asking for nothing while work waits or runs: recompute it now (scale from zero)."""
        for name, p in self.engine.pools.items():
            pc = self.pools.get(name)
            if (pc is None or not pc.active) and (p.queued or p.inflight):
                self.step(now, only=name)

    # ---- what KEDA asks --------------------------------------------------------------------------------------

    def known(self, pool: str) -> bool:
        return pool in self.engine.pools

    def watched(self, pool: str) -> None:
        """KEDA asks about this pool, so an autoscaler serves it: at zero replicas its requests now wait for
        the first replica (Engine.autoscaled) instead of a 503."""
        if pool not in self.engine.autoscaled:
            self.engine.autoscaled.add(pool)
            log.info("pool autoscaled by KEDA", pool=pool)

    def active(self, pool: str) -> bool:
        pc = self.pools.get(pool)
        if pc is None and pool in self.engine.pools:
            self.step(only=pool)
            pc = self.pools.get(pool)
        return bool(pc and pc.active)

    def desired(self, pool: str) -> int:
        pc = self.pools.get(pool)
        if pc is None and pool in self.engine.pools:
            self.step(only=pool)
            pc = self.pools.get(pool)
        return pc.desired if pc else 0

    def per_replica(self, pool: str, dimension: str) -> float:
        return per_replica(self.engine.pools[pool])[DIMENSIONS.index(dimension)]

    def subscribe(self, pool: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self._subscribers.setdefault(pool, set()).add(q)
        return q

    def unsubscribe(self, pool: str, q: asyncio.Queue) -> None:
        subs = self._subscribers.get(pool)
        if subs is not None:
            subs.discard(q)
            if not subs:
                del self._subscribers[pool]

    # ---- the loop ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        self.step()
        self._tasks = [
            asyncio.create_task(self._control_loop(), name="tokenpools-controller"),
            asyncio.create_task(self._wake_loop(), name="tokenpools-controller-wake"),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def scrape(self) -> None:
        """Scrape every pool's backends once and follow the live replica counts."""
        assert self._session is not None
        names = [n for n in self.engine.pools if self.options.backends.get(n)]
        sets = [self._pool(n).backends for n in names]
        await asyncio.gather(*(s.refresh(self._session, self.options.scrape_timeout_s) for s in sets if s))
        for name, bset in zip(names, sets):
            if bset is not None and bset.settled:
                self.follow(name, bset.live)

    async def _control_loop(self) -> None:
        while True:
            started = self.clock()
            try:
                await self.scrape()
                self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad period must not stop the controller
                log.exception("control step failed")
            await asyncio.sleep(max(0.01, self.options.period_s - (self.clock() - started)))

    async def _wake_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.wake_interval_s)
            try:
                self.wake_check()
            except Exception:
                log.exception("wake check failed")

    # ---- views ------------------------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        pools = {}
        for name, pc in self.pools.items():
            p = self.engine.pools.get(name)
            doc: dict = {
                "desiredReplicas": pc.desired,
                "active": pc.active,
                "engineReplicas": p.replicas if p else None,
                "requirement": pc.requirement.as_dict() if pc.requirement else None,
                "changes": [{"time": round(t, 3), "desiredReplicas": d} for t, d in pc.changes[-16:]],
            }
            if pc.backends is not None:
                tot = pc.backends.totals()
                doc["backends"] = {
                    "liveReplicas": pc.backends.live,
                    "settled": pc.backends.settled,
                    "running": tot.running,
                    "waiting": tot.waiting,
                    "kvCacheUsage": round(tot.kv_usage, 4),
                    "endpoints": [b.as_dict() for b in pc.backends.backends.values()],
                }
            pools[name] = doc
        policy = self.policy
        return {
            "policy": {
                "burstCapReplicas": policy.burst_cap_replicas,
                "usageWindowSeconds": policy.usage_window_s,
                "scaleDownDelaySeconds": policy.scale_down_delay_s,
                "scaleDownBand": policy.scale_down_band,
                "periodSeconds": self.options.period_s,
            },
            "pools": pools,
        }
