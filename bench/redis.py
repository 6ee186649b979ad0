"""Added decision latency of shared state: in-memory vs Redis leases vs a Redis round trip per request.

Run: `python -m bench.redis` (starts its own redis-server on a free 127.0.0.1 port, or use --redis-url).
Prints one JSON document.

Three ways to decide one request, each driven the same way: open-loop arrivals at --rate per second on one
asyncio loop (as in `tokenpools serve`), each admitted request finishing 20–200 ms later. Decision latency =
from the request's arrival time to its verdict, so it includes any time the loop was busy with something else
(a store's periodic sync runs on the same loop and delays the requests that arrive meanwhile).

  memory   the engine alone (the default store)
  lease    the engine with a RedisStore syncing every --interval seconds (what extproc/state does), sharing
           the pool with two more replicas (their records are written into Redis, so each sync reads and
           merges three replicas' worth of entitlements)
  lua      the alternative: the engine decides, then one EVALSHA per request atomically checks and reserves
           the pool's concurrency, KV and token bucket in Redis (with a lease per reservation), and one more
           per finished request gives them back

Also `sync_ms`: what one sync costs (wall, and CPU of this process: what can hold up the loop; the observe
passes pause every 200 entitlements) for pools of 10 / 1,000 / 10,000 entitlements, 200 of them busy, with
three replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import orjson

from extproc.app import freeze_heap
from extproc.config import from_objects
from extproc.engine import Engine, Verdict
from extproc.state.redis_store import RedisStore
from extproc.state.shares import POOL

CLASSES = ("guaranteed", "elastic", "spot", "preemptible", "dedicated")

# The per-request alternative: one atomic check-and-reserve of the pool in Redis, with a lease per reservation
# so a crashed replica's reservations expire. KEYS: pool hash, reservations zset (score = lease expiry), KV per
# reservation hash. ARGV: rid, kv, cost, cap_conc, cap_kv, rate (tokens/s), depth, lease ms.
ADMIT_LUA = """
local tm = redis.call('TIME')
local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 16)
for _, r in ipairs(dead) do
  local kv = tonumber(redis.call('HGET', KEYS[3], r) or '0')
  redis.call('HINCRBY', KEYS[1], 'conc', -1)
  redis.call('HINCRBYFLOAT', KEYS[1], 'kv', -kv)
  redis.call('HDEL', KEYS[3], r)
  redis.call('ZREM', KEYS[2], r)
end
local kv, cost = tonumber(ARGV[2]), tonumber(ARGV[3])
local rate, depth = tonumber(ARGV[6]), tonumber(ARGV[7])
local st = redis.call('HMGET', KEYS[1], 'conc', 'kv', 'tokens', 't')
local conc, used_kv = tonumber(st[1] or '0'), tonumber(st[2] or '0')
local tokens, t = tonumber(st[3] or ARGV[7]), tonumber(st[4] or now)
tokens = math.min(depth, tokens + rate * (now - t) / 1000)
if conc + 1 > tonumber(ARGV[4]) or used_kv + kv > tonumber(ARGV[5]) or tokens < math.min(cost, depth) then
  redis.call('HSET', KEYS[1], 'tokens', tokens, 't', now)
  return 0
end
redis.call('HSET', KEYS[1], 'conc', conc + 1, 'kv', used_kv + kv, 'tokens', tokens - cost, 't', now)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[8]), ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], kv)
return 1
"""
RELEASE_LUA = """
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
  local kv = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
  redis.call('HINCRBY', KEYS[1], 'conc', -1)
  redis.call('HINCRBYFLOAT', KEYS[1], 'kv', -kv)
  redis.call('HDEL', KEYS[3], ARGV[1])
  return 1
end
return 0
"""


def make_config(entitlements: int, period: float = 1.0):
    """One pool far larger than the offered load (latency, not rejections, is measured here)."""
    docs = [{
        "apiVersion": "tokenpools.io/v1alpha1", "kind": "TokenPool", "metadata": {"name": "bench"},
        "spec": {
            "model": "bench-model", "replicas": {"min": 1, "max": 100_000, "current": max(4, entitlements)},
            "perReplica": {"tokensPerSecond": 1e7, "concurrency": 256, "kvCacheTokens": 4_000_000},
            "control": {"periodSeconds": period},
        },
    }]  # fmt: skip
    for i in range(entitlements):
        cls = CLASSES[i % len(CLASSES)]
        spec = {"tenantId": f"t{i}", "poolRef": {"name": "bench"}, "qos": {"serviceClass": cls, "sloTargetMs": 500}}
        if cls in ("dedicated", "guaranteed", "elastic"):
            spec["resources"] = {"concurrency": 8}
        if cls in ("elastic", "spot", "preemptible"):
            spec["burst"] = {"concurrency": 64}
        docs.append({"apiVersion": "tokenpools.io/v1alpha1", "kind": "TokenEntitlement", "metadata": {"name": f"e{i}"}, "spec": spec})
    return from_objects(docs)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _summary(lat_s: list[float]) -> dict:
    ms = [x * 1000 for x in lat_s]
    return {
        "decisions": len(ms),
        "p50_ms": round(_pct(ms, 0.50), 4),
        "p99_ms": round(_pct(ms, 0.99), 4),
        "p999_ms": round(_pct(ms, 0.999), 4),
        "max_ms": round(max(ms), 4) if ms else None,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _RedisProcess:
    def __init__(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.access(binary, os.X_OK):
            raise SystemExit("redis-server not found (apt-get install -y redis-server), or pass --redis-url")
        self.dir = tempfile.mkdtemp(prefix="tp-bench-redis-")
        self.port = _free_port()
        cores = sorted(os.sched_getaffinity(0))
        def pin() -> None:
            if len(cores) > 1:
                os.sched_setaffinity(0, {cores[-1]})
            try:  # Linux: SIGTERM when this process dies, so an interrupted benchmark leaves no redis behind
                import ctypes
                import signal

                ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
            except OSError:
                pass

        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=pin,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(8).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise SystemExit("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


async def _peers(store: RedisStore, engine: Engine, active: list[str], n: int = 2, demand: float = 1.0) -> None:
    """Write `n` more replicas' records, valid for an hour, so the measured replica syncs against three
    replicas' worth of data: each claims 1/(n+1) of the pool and of every entitlement in `active`, reports
    `demand` for those, and debt and burst for them."""
    r = store.redis
    sec, usec = await r.time()
    now_ms = int(sec) * 1000 + int(usec) // 1000
    part = 1.0 / (n + 1)
    active = [e for e in active if e in engine.ents]
    for i in range(n):
        claims = {"bench": {POOL: part, **dict.fromkeys(active, part)}}
        rec = {"exp": now_ms + 3_600_000, "since": 0, "c": claims, "g": claims}
        info = {"d": {"bench": dict.fromkeys(active, demand)}, "q": {"bench": {e: [0.1, 0.2] for e in active}}}
        await r.hset(store.keys[0], f"peer{i}", orjson.dumps(rec).decode())
        await r.hset(store.keys[1], f"peer{i}", orjson.dumps(info).decode())


async def _drive(engine: Engine, rate: float, seconds: float, names: list[str], seed: int, lua=None) -> list[float]:
    """Open-loop arrivals; returns the decision latencies (seconds)."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    lat: list[float] = []
    pending: set[asyncio.Task] = set()
    ids = iter(range(10**12))
    t0 = time.perf_counter()
    n_total = int(rate * seconds)

    def finish(rid: str, inp: int, out: int) -> None:
        engine.finish(rid, inp, out, time.time())
        if lua is not None:
            t = loop.create_task(lua.release(rid))
            pending.add(t)
            t.add_done_callback(pending.discard)

    async def decide_lua(rid, ent, inp, out, t_arr):
        d = engine.admit(rid, ent, inp, out, time.time())
        if d.verdict is Verdict.ADMIT:
            ok = await lua.admit(rid, inp + out)
            lat.append(time.perf_counter() - t_arr)
            if ok:
                loop.call_later(rng.uniform(0.02, 0.2), finish, rid, inp, out)
            else:
                engine.release(rid, time.time())
        else:
            lat.append(time.perf_counter() - t_arr)
            if d.verdict is Verdict.QUEUE:
                engine.release(rid, time.time())

    i = 0
    while i < n_total:
        now = time.perf_counter()
        # Every arrival due by now, each timed from its own arrival instant.
        while i < n_total and t0 + i / rate <= now:
            t_arr = t0 + i / rate
            rid = f"r{next(ids)}"
            ent = names[rng.randrange(len(names))]
            inp, out = rng.randint(16, 512), rng.randint(16, 256)
            i += 1
            if lua is None:
                d = engine.admit(rid, ent, inp, out, time.time())
                lat.append(time.perf_counter() - t_arr)
                if d.verdict is Verdict.ADMIT:
                    loop.call_later(rng.uniform(0.02, 0.2), finish, rid, inp, out)
                elif d.verdict is Verdict.QUEUE:
                    engine.release(rid, time.time())
            else:
                t = loop.create_task(decide_lua(rid, ent, inp, out, t_arr))
                pending.add(t)
                t.add_done_callback(pending.discard)
        await asyncio.sleep(0)  # let everything else on the loop run (store syncs, Redis replies)
    await asyncio.sleep(0.25)  # the last admitted requests finish (holds are ≤ 0.2 s) and give back
    while pending:
        await asyncio.gather(*list(pending), return_exceptions=True)
    return lat


class _Lua:
    def __init__(self, r, engine: Engine) -> None:
        p = engine.pools["bench"]
        self.r = r
        self.keys = ["{bench}:pool", "{bench}:res", "{bench}:reskv"]
        self.admit_s = r.register_script(ADMIT_LUA)
        self.release_s = r.register_script(RELEASE_LUA)
        self.args = [p.cap_conc, p.cap_kv, p.cap_tps, p.cap_tps * 5, 30_000]
        self.errors = 0

    async def admit(self, rid: str, kv: int) -> bool:
        try:
            return bool(await self.admit_s(keys=self.keys, args=[rid, kv, kv, *self.args]))
        except Exception:  # counted: a failed round trip is a refused request here
            self.errors += 1
            return False

    async def release(self, rid: str) -> None:
        try:
            await self.release_s(keys=self.keys, args=[rid])
        except Exception:
            self.errors += 1


async def _tick(engine: Engine) -> None:
    while True:
        engine.tick(time.time())
        await asyncio.sleep(0.05)


async def _run_mode(mode: str, url: str, entitlements: int, rate: float, seconds: float, interval: float, seed: int) -> dict:
    from redis import asyncio as aioredis

    engine = Engine(make_config(entitlements, period=interval), time.time())
    freeze_heap()  # as `tokenpools serve` does once its engine is built
    names = list(engine.ents)
    ticker = asyncio.create_task(_tick(engine))
    extra: dict = {}
    store = syncer = client = None
    try:
        if mode == "lease":
            store = RedisStore(url, replica_id="bench", interval=interval, lease=3 * interval, prefix="bench-lease")
            await store.start(engine, time.time())
            # Peers hold records for every entitlement but little demand: this replica's own load decides its
            # target, the room (1/3) its grant.
            await _peers(store, engine, names, demand=0.001)
            sync_times: list[tuple[float, float]] = []

            async def sync_loop():
                while True:
                    await asyncio.sleep(interval)
                    t, c = time.perf_counter(), time.process_time()
                    await store.sync(time.time())
                    sync_times.append((time.perf_counter() - t, time.process_time() - c))

            syncer = asyncio.create_task(sync_loop())
            # Warm-up under the same load (not measured): out of probation, the share follows the demand.
            await _drive(engine, rate, 4 * interval, names, seed + 1)
            if store.probation or engine.pools["bench"].share < 0.2:
                raise RuntimeError(f"the lease store did not settle: {store.status()}")
            sync_times.clear()
            lat = await _drive(engine, rate, seconds, names, seed)
            extra = {
                "sync_cpu_ms_per_interval": round(sum(c for _, c in sync_times) / max(1, len(sync_times)) * 1000, 3),
                "syncs": len(sync_times),
                "sync_wall_ms_max": round(max(w for w, _ in sync_times) * 1000, 3) if sync_times else None,
                "share": round(engine.pools["bench"].share, 4),
                "store_mode": store.mode,
            }
        elif mode == "lua":
            client = aioredis.Redis.from_url(url, max_connections=256)
            await client.flushdb()
            lua = _Lua(client, engine)
            rtt = []
            cpu0 = time.process_time()
            for i in range(500):  # one at a time, nothing else running: the round trip alone
                t = time.perf_counter()
                await lua.admit(f"w{i}", 10)
                rtt.append(time.perf_counter() - t)
                await lua.release(f"w{i}")
            client_cpu = (time.process_time() - cpu0) / 500 * 1e6
            lat = await _drive(engine, rate, seconds, names, seed, lua=lua)
            extra = {
                "unloaded_round_trip": _summary(rtt),
                "client_cpu_us_per_request": round(client_cpu, 1),  # admit + release calls, this process only
                "errors": lua.errors,  # failed round trips (counted as refusals)
            }
        else:
            lat = await _drive(engine, rate, seconds, names, seed)
    finally:
        ticker.cancel()
        if syncer is not None:
            syncer.cancel()
        if store is not None:
            await store.close()
        if client is not None:
            await client.aclose()
    return {**_summary(lat), **extra}


async def _sync_cost(url: str, sizes: tuple[int, ...], repeats: int = 20) -> dict:
    """CPU + round trips of one sync (what blocks or occupies the loop once per interval)."""
    out = {}
    for n in sizes:
        engine = Engine(make_config(n), time.time())
        store = RedisStore(url, replica_id="cost", interval=1.0, lease=3.0, prefix=f"bench-cost-{n}")
        await store.start(engine, time.time())
        rng = random.Random(n)
        busy = [f"e{rng.randrange(n)}" for _ in range(min(n, 200))]
        await _peers(store, engine, [f"e{rng.randrange(n)}" for _ in range(min(n, 200))])
        for i, ent in enumerate(busy):  # some in flight here, so there is demand to report
            engine.admit(f"c{i}", ent, 100, 100, time.time())
        times = []
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            await store.sync(time.time())
            times.append((time.perf_counter() - t, time.process_time() - c))
        await store.close()
        wall = [w for w, _ in times]
        cpu = [c for _, c in times]
        out[str(n)] = {
            "wall_p50_ms": round(_pct(wall, 0.5) * 1000, 3), "wall_max_ms": round(max(wall) * 1000, 3),
            "cpu_p50_ms": round(_pct(cpu, 0.5) * 1000, 3), "cpu_max_ms": round(max(cpu) * 1000, 3),
        }  # fmt: skip
    return out


def run(
    url: str | None = None, entitlements: int = 100, rate: float = 1000.0, seconds: float = 5.0,
    interval: float = 1.0, sync_sizes: tuple[int, ...] = (10, 1000, 10000), seed: int = 1,
) -> dict:  # fmt: skip
    proc = None
    if url is None:
        proc = _RedisProcess()  # on the last core
        url = proc.url
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > 1:
        os.sched_setaffinity(0, {cores[0]})  # this process (client, engine, store) on the first
    try:
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        modes = {}
        for mode in ("memory", "lease", "lua"):
            modes[mode] = runner(_run_mode(mode, url, entitlements, rate, seconds, interval, seed))
        sync_cost = runner(_sync_cost(url, sync_sizes)) if sync_sizes else {}
    finally:
        if proc is not None:
            proc.stop()
    base = modes["memory"]
    return {
        "benchmark": "redis",
        "what": "decision latency (arrival -> verdict) on one asyncio loop, open-loop arrivals, loopback Redis",
        "params": {"entitlements": entitlements, "rate_per_s": rate, "seconds": seconds, "sync_interval_s": interval},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "modes": modes,
        "added_ms": {
            m: {"p50": round(modes[m]["p50_ms"] - base["p50_ms"], 4), "p99": round(modes[m]["p99_ms"] - base["p99_ms"], 4)}
            for m in ("lease", "lua")
        },
        "target_added_p99_ms": 1.0,
        "sync_ms": sync_cost,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis-url", default=None, help="use this Redis (default: start redis-server on a free port)")
    ap.add_argument("--entitlements", type=int, default=100)
    ap.add_argument("--rate", type=float, default=1000.0, help="arrivals per second")
    ap.add_argument("--seconds", type=float, default=5.0, help="per mode")
    ap.add_argument("--interval", type=float, default=1.0, help="store sync interval (s)")
    ap.add_argument("--sync-sizes", default="10,1000,10000", help="entitlement counts for sync_ms ('' to skip)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args(argv)
    import structlog

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout is the JSON document
    sizes = tuple(int(x) for x in a.sync_sizes.split(",") if x)
    result = run(a.redis_url, a.entitlements, a.rate, a.seconds, a.interval, sizes)
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
