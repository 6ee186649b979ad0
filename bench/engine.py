"""Engine throughput and memory: admit + finish pairs per second on one core, bytes per entitlement.

Run: `tokenpools bench engine --json` (or `python -m bench.engine`). Prints one JSON document.
"""

from __future__ import annotations

import gc
import os
import platform
import random
import time
import tracemalloc

from extproc.config import from_objects
from extproc.engine import Engine, Verdict

CLASSES = ("dedicated", "guaranteed", "elastic", "spot", "preemptible")


def make_config(entitlements: int):
    """One pool big enough for every baseline; entitlements cycle through the five classes."""
    docs = [
        {
            "apiVersion": "tokenpools.io/v1alpha1",
            "kind": "TokenPool",
            "metadata": {"name": "bench"},
            "spec": {
                "model": "bench-model",
                "replicas": {"min": 1, "max": 10_000, "current": max(1, entitlements // 4)},
                "perReplica": {"tokensPerSecond": 1e9, "concurrency": 256, "kvCacheTokens": 4_000_000},
            },
        }
    ]
    for i in range(entitlements):
        cls = CLASSES[i % len(CLASSES)]
        spec = {"tenantId": f"t{i}", "poolRef": {"name": "bench"}, "qos": {"serviceClass": cls, "sloTargetMs": 500}}
        if cls in ("dedicated", "guaranteed", "elastic"):
            spec["resources"] = {"concurrency": 8}
        docs.append(
            {"apiVersion": "tokenpools.io/v1alpha1", "kind": "TokenEntitlement", "metadata": {"name": f"e{i}"}, "spec": spec}
        )
    return from_objects(docs)


def decisions_per_second(entitlements: int, pairs: int, window: int = 64, seed: int = 1) -> dict:
    """`pairs` admit+finish pairs with `window` requests kept in flight; ticks once per simulated second."""
    engine = Engine(make_config(entitlements), 0.0)
    rng = random.Random(seed)
    names = [f"e{i}" for i in range(entitlements)]
    picks = [names[rng.randrange(entitlements)] for _ in range(pairs)]
    inputs = [rng.randint(16, 512) for _ in range(1024)]
    outputs = [rng.randint(16, 256) for _ in range(1024)]
    ids = [f"r{i}" for i in range(pairs)]
    admit, finish, tick = engine.admit, engine.finish, engine.tick
    pending: list[str] = []
    admitted = 0
    now = 0.0
    dt = 1e-5  # 100,000 requests per simulated second
    next_tick = 1.0
    gc.collect()
    start = time.perf_counter()
    for i in range(pairs):
        now += dt
        d = admit(ids[i], picks[i], inputs[i & 1023], outputs[i & 1023], now)
        if d.verdict is Verdict.ADMIT:
            admitted += 1
            pending.append(ids[i])
        if len(pending) > window:
            finish(pending.pop(0), None, outputs[i & 1023] // 2, now)
        if now >= next_tick:
            tick(now)
            next_tick += 1.0
    elapsed = time.perf_counter() - start
    for rid in pending:
        finish(rid, None, 1, now)
    engine.check_invariants()
    return {
        "entitlements": entitlements,
        "pairs": pairs,
        "admitted_fraction": round(admitted / pairs, 4),
        "seconds": round(elapsed, 4),
        "decisions_per_s": round(pairs / elapsed),
        "us_per_pair": round(elapsed / pairs * 1e6, 3),
    }


def bytes_per_entitlement(entitlements: int = 10_000) -> dict:
    """Memory the engine holds per entitlement (config documents included), by tracemalloc difference."""
    cfg_small, cfg_big = make_config(1), make_config(entitlements)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    small = Engine(cfg_small, 0.0)
    mid = tracemalloc.get_traced_memory()[0]
    big = Engine(cfg_big, 0.0)
    end = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    engine_only = (end - mid) - (mid - base)
    # The config documents are parsed once and shared with the engine: count them too.
    tracemalloc.start()
    b0 = tracemalloc.get_traced_memory()[0]
    cfg_again = make_config(entitlements)
    b1 = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del small, big, cfg_again
    return {
        "entitlements": entitlements,
        "bytes_per_entitlement": round(engine_only / entitlements),
        "config_bytes_per_entitlement": round((b1 - b0) / entitlements),
    }


def run(sizes=(10, 1_000, 10_000), pairs: int = 200_000, one_core: bool = True) -> dict:
    if one_core and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    results = [decisions_per_second(n, pairs) for n in sizes]
    mem = bytes_per_entitlement(max(sizes))
    return {
        "benchmark": "engine",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus_used": 1 if one_core else os.cpu_count(),
        "runs": results,
        "decisions_per_s": {str(r["entitlements"]): r["decisions_per_s"] for r in results},
        **mem,
        "targets": {"decisions_per_s_at_10000": 100_000, "bytes_per_entitlement": 2048},
    }


if __name__ == "__main__":
    import orjson

    print(orjson.dumps(run(), option=orjson.OPT_INDENT_2).decode())
