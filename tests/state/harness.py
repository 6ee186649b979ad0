"""In-process replicas for the shared-state tests: each has its own Engine and RedisStore, its own tick and
sync loops and its own users, all on one asyncio loop (so the books of all replicas can be read at one
instant), against a real redis-server.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass, field

import orjson
import redis

from extproc.config import Config, from_objects
from extproc.engine import Engine, Events, Verdict
from extproc.state import run_store
from extproc.state.redis_store import RedisStore

INTERVAL = 0.1  # store sync interval in these tests
LEASE = 0.5

_ids = itertools.count()


def pool_doc(name="pool", conc=32, kv=16384, tps=10_000_000, period=0.25, **extra) -> dict:
    spec = {
        "model": f"m-{name}",
        "perReplica": {"tokensPerSecond": tps, "concurrency": conc, "kvCacheTokens": kv},
        "control": {"periodSeconds": period},
        "queue": {"timeoutSeconds": 1.0},
        **extra,
    }
    return {"apiVersion": "tokenpools.io/v1alpha1", "kind": "TokenPool", "metadata": {"name": name}, "spec": spec}


def ent_doc(name, cls, pool="pool", slo=1000, resources=None, burst=None) -> dict:
    spec = {"tenantId": name, "poolRef": {"name": pool}, "qos": {"serviceClass": cls, "sloTargetMs": slo}}
    if resources:
        spec["resources"] = resources
    if burst:
        spec["burst"] = burst
    return {"apiVersion": "tokenpools.io/v1alpha1", "kind": "TokenEntitlement", "metadata": {"name": name}, "spec": spec}


def mixed_config() -> Config:
    """Pool "pool" (32 slots, 16k KV tokens) with one entitlement of each class but dedicated; pool "open"
    (the same size) with one spot entitlement that may fill it all."""
    return from_objects([
        pool_doc(),
        pool_doc("open"),
        ent_doc("so", "spot", pool="open"),
        ent_doc("bu", "elastic", pool="open", resources={"concurrency": 2}, burst={"concurrency": 12}),
        ent_doc("g", "guaranteed", slo=500, resources={"concurrency": 10}),
        ent_doc("el", "elastic", resources={"concurrency": 6}, burst={"concurrency": 12}),
        ent_doc("s", "spot", slo=5000),
        ent_doc("pe", "preemptible", slo=5000, burst={"concurrency": 16}),
    ])  # fmt: skip


@dataclass
class Stats:
    admitted: int = 0
    queued: int = 0
    rejected: int = 0
    evicted: int = 0
    by_ent: dict = field(default_factory=dict)


class Replica:
    def __init__(self, name: str, config: Config, url: str, **store_kw) -> None:
        self.name = name
        self.config = config
        self.engine = Engine(config, time.time())
        self.store = RedisStore(url, replica_id=name, interval=store_kw.pop("interval", INTERVAL),
                                lease=store_kw.pop("lease", LEASE), **store_kw)  # fmt: skip
        self.waiters: dict[str, asyncio.Future] = {}
        self.evicted: set[str] = set()
        self.tasks: list[asyncio.Task] = []
        self.users: list[asyncio.Task] = []
        self.alive = True
        self.stats = Stats()

    async def start(self) -> None:
        self.dispatch(await self.store.start(self.engine, time.time()))
        self.tasks = [
            asyncio.create_task(run_store(self.store, self.dispatch, time.time)),
            asyncio.create_task(self._ticker()),
        ]

    def dispatch(self, events: Events) -> None:
        if not self.alive or not events:
            return
        for rid in events.admitted:
            fut = self.waiters.pop(rid, None)
            if fut is None or fut.done():
                self.dispatch(self.engine.release(rid, time.time()))
            else:
                fut.set_result(True)
        for d in events.rejected:
            fut = self.waiters.pop(d.request_id, None)
            if fut is not None and not fut.done():
                fut.set_result(False)
        self.evicted.update(events.evicted)

    async def _ticker(self) -> None:
        while True:
            self.dispatch(self.engine.tick(time.time()))
            await asyncio.sleep(0.01)

    async def request(self, ent: str, inp: int, out: int, hold: float) -> bool:
        rid = f"{self.name}-{next(_ids)}"
        d = self.engine.admit(rid, ent, inp, out, time.time())
        self.evicted.update(d.evict)
        self.stats.evicted += len(d.evict)
        if d.verdict is Verdict.REJECT:
            self.stats.rejected += 1
            return False
        if d.verdict is Verdict.QUEUE:
            self.stats.queued += 1
            fut = asyncio.get_running_loop().create_future()
            self.waiters[rid] = fut
            try:
                ok = await asyncio.wait_for(fut, 5.0)
            except asyncio.TimeoutError:
                self.waiters.pop(rid, None)
                self.dispatch(self.engine.release(rid, time.time()))
                return False
            if not ok:
                self.stats.rejected += 1
                return False
        self.stats.admitted += 1
        self.stats.by_ent[ent] = self.stats.by_ent.get(ent, 0) + 1
        end = time.monotonic() + hold
        while time.monotonic() < end and rid not in self.evicted and self.alive:
            await asyncio.sleep(min(0.02, end - time.monotonic()))
        if self.alive and rid not in self.evicted:
            self.dispatch(self.engine.finish(rid, inp, out, time.time()))
        return True

    def add_users(self, ent: str, n: int, stop_at: float, seed: int, start_at: float = 0.0, hold=(0.02, 0.12)) -> None:
        for i in range(n):
            rng = random.Random(seed * 1000 + i)
            self.users.append(asyncio.create_task(self._user(ent, start_at, stop_at, rng, hold)))

    async def _user(self, ent: str, start_at: float, stop_at: float, rng: random.Random, hold) -> None:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        while time.monotonic() < stop_at and self.alive:
            ok = await self.request(ent, rng.randint(100, 400), rng.randint(50, 300), rng.uniform(*hold))
            if not ok:
                await asyncio.sleep(rng.uniform(0.01, 0.05))

    async def crash(self) -> None:
        """Die without a word: no deregistration; in-flight requests die with the process."""
        self.alive = False
        for t in self.tasks + self.users:
            t.cancel()
        await asyncio.gather(*self.tasks, *self.users, return_exceptions=True)
        if self.store.redis is not None:
            await self.store.redis.aclose()  # its connection drops; nothing is cleaned up

    async def stop(self) -> None:
        for t in self.users:
            t.cancel()
        await asyncio.gather(*self.users, return_exceptions=True)
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.store.close()


def capacity(engine: Engine, pool: str = "pool") -> tuple[float, float]:
    p = engine.pools[pool]
    per = p.spec.per_replica
    return p.replicas * per.concurrency, p.replicas * per.kv_cache_tokens


class Sampler:
    """Reads every live replica's books at one instant (one loop: nothing runs in between), every `every`
    seconds: Σ in-flight concurrency and reserved KV over replicas against the pool, and Σ of one entitlement's
    in-flight requests against its baseline."""

    def __init__(self, replicas: list[Replica], pool: str = "pool", every: float = 0.002, watch: dict | None = None):
        self.replicas = replicas
        self.pool = pool
        self.every = every
        self.watch = watch or {}  # entitlement -> its whole concurrency ceiling
        self.max_conc = 0.0
        self.max_kv = 0.0
        self.max_ent: dict[str, float] = {}
        self.samples = 0
        self.worst: dict | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def sample(self) -> None:
        live = [r for r in self.replicas if r.alive]
        if not live:
            return
        cap_conc, cap_kv = capacity(live[0].engine, self.pool)
        conc = sum(r.engine.pools[self.pool].used_conc for r in live) / cap_conc
        kv = sum(r.engine.pools[self.pool].used_kv for r in live) / cap_kv
        if conc > self.max_conc or kv > self.max_kv:
            self.worst = {
                r.name: {"conc": r.engine.pools[self.pool].used_conc, "kv": r.engine.pools[self.pool].used_kv,
                         "share": r.engine.pools[self.pool].share, "mode": r.store.mode} for r in live
            }  # fmt: skip
        self.max_conc = max(self.max_conc, conc)
        self.max_kv = max(self.max_kv, kv)
        for ent, ceiling in self.watch.items():
            v = sum(r.engine.ents[ent].in_flight for r in live) / ceiling
            self.max_ent[ent] = max(self.max_ent.get(ent, 0.0), v)
        self.samples += 1

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.every)


def claims(url: str, prefix: str = "tokenpools") -> dict[str, dict]:
    """The claim records in Redis, by replica."""
    r = redis.Redis.from_url(url, socket_timeout=1)
    try:
        return {k.decode(): orjson.loads(v) for k, v in r.hgetall("{" + prefix + "}:claims").items()}
    finally:
        r.close()


async def eventually(predicate, timeout: float, every: float = 0.02):
    """Await until predicate() is truthy; return the time it took, or raise AssertionError with the last value."""
    t0 = time.monotonic()
    value = None
    while time.monotonic() - t0 < timeout:
        value = predicate()
        if value:
            return time.monotonic() - t0
        await asyncio.sleep(every)
    raise AssertionError(f"not within {timeout}s (last: {value!r})")
