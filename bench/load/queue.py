"""Engine-only probe: RSS and decision latency with and without 100,000 requests queued.

Holding 100,000 queued requests through Envoy would need 100,000 client connections; the engine holds its
queue without any I/O, so this measures what the server's process pays for it: one pool, one entitlement
("q", guaranteed, 1 slot) whose slot is taken and behind which N requests wait, and one entitlement ("d",
dedicated, 64 slots) whose admit + finish pairs are timed one by one (perf_counter_ns), with a tick every
1,000 pairs (timed apart: the tick walks deadlines and pools). `python -m bench.load.queue '{"queued": N}'`.
"""

from __future__ import annotations

import gc
import os
import sys
import time

import orjson

from extproc.config import from_objects
from extproc.engine import Engine, Verdict

from .gen import rss_kib


def config(queued: int):
    return from_objects([
        {"apiVersion": "tokenpools.io/v1alpha1", "kind": "TokenPool", "metadata": {"name": "p"},
         "spec": {"model": "m", "replicas": {"min": 1, "max": 1, "current": 1},
                  "perReplica": {"tokensPerSecond": 1e9, "concurrency": 256, "kvCacheTokens": 100_000_000},
                  "queue": {"maxQueued": max(1024, queued + 10), "maxQueuedPerEntitlement": max(256, queued + 10),
                            "timeoutSeconds": 3600}}},
        {"apiVersion": "tokenpools.io/v1alpha1", "kind": "TokenEntitlement", "metadata": {"name": "q"},
         "spec": {"tenantId": "tq", "poolRef": {"name": "p"}, "qos": {"serviceClass": "guaranteed", "sloTargetMs": 500},
                  "resources": {"concurrency": 1}}},
        {"apiVersion": "tokenpools.io/v1alpha1", "kind": "TokenEntitlement", "metadata": {"name": "d"},
         "spec": {"tenantId": "td", "poolRef": {"name": "p"}, "qos": {"serviceClass": "dedicated", "sloTargetMs": 500},
                  "resources": {"concurrency": 64}}},
    ])


def pct(values: list[int], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q / 100 * len(s)))] / 1000, 3)  # ns → µs


def main() -> None:
    spec = orjson.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    queued, pairs = spec.get("queued", 0), spec.get("pairs", 100_000)
    cpu = spec.get("cpu")
    if hasattr(os, "sched_setaffinity") and cpu is not None and cpu >= 0:  # -1: not pinned (--server-cpu -1)
        os.sched_setaffinity(0, {cpu})
    gc.collect()
    rss0 = rss_kib()
    engine = Engine(config(queued), 0.0)
    now = 1.0
    engine.admit("hold", "q", 100, 100, now)
    verdicts = {}
    for i in range(queued):
        d = engine.admit(f"q{i:06d}", "q", 100, 100, now)
        verdicts[d.verdict.name] = verdicts.get(d.verdict.name, 0) + 1
    gc.collect()
    rss1 = rss_kib()
    admit, finish, tick = engine.admit, engine.finish, engine.tick
    ns = time.perf_counter_ns
    decide: list[int] = []
    ticks: list[int] = []
    not_admitted = 0
    for i in range(pairs):
        now += 1e-5
        rid = f"d{i}"
        t0 = ns()
        d = admit(rid, "d", 100, 100, now)
        t1 = ns()
        if d.verdict is not Verdict.ADMIT:
            not_admitted += 1
        else:
            finish(rid, 100, 50, now)
        t2 = ns()
        decide.append(t1 - t0)
        decide.append(t2 - t1) if d.verdict is Verdict.ADMIT else None
        if i % 1000 == 999:
            t3 = ns()
            tick(now)
            ticks.append(ns() - t3)
    print(orjson.dumps({
        "queued": queued,
        "queued_verdicts": verdicts,
        "still_queued": len(engine.waiting),
        "rss_before_kib": rss0,
        "rss_kib": rss1,
        "rss_added_kib": rss1 - rss0,
        "bytes_per_queued": round((rss1 - rss0) * 1024 / queued) if queued else None,
        "pairs": pairs,
        "not_admitted": not_admitted,
        "decision_us": {"p50": pct(decide, 50), "p99": pct(decide, 99), "p99.9": pct(decide, 99.9)},
        "tick_us": {"p50": pct(ticks, 50), "p99": pct(ticks, 99), "max": pct(ticks, 100)} if ticks else None,
    }).decode())


if __name__ == "__main__":
    main()
