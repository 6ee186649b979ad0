"""Redis slow (it answers nothing for 1.5 s: CLIENT PAUSE on a real redis-server), not down: nothing that admits
requests waits on it. Each replica's sync times out after its socket timeout, the replica fails static and keeps
admitting from its local share; once Redis answers again the replicas re-join. Redis *down* (stopped,
restarted empty) is tests/state/test_replicas.py::test_redis_down_fails_static_then_converges.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from tests.state.conftest import redis_server  # noqa: F401 (the fixture: a real redis-server on a free port)
from tests.state.harness import Replica, eventually, mixed_config

pytestmark = pytest.mark.integration

PAUSE_MS = 1500


def pause(port: int, ms: int) -> None:
    """CLIENT PAUSE ms ALL: the server stops answering every client's commands for ms (connections stay up)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(f"CLIENT PAUSE {ms} ALL\r\n".encode())
        assert s.recv(16).startswith(b"+OK")


def test_redis_slow_fails_static_and_admission_never_waits(redis_server):
    async def main():
        reps = [Replica(name, mixed_config(), redis_server.url) for name in "ab"]
        for r in reps:
            await r.start()
        await eventually(lambda: all(r.store.mode == "redis" and r.store.syncs > 3 for r in reps), 5.0)
        loop = asyncio.get_running_loop()
        lag = {"max": 0.0}

        async def watch_loop():  # how late a 10 ms sleep wakes up: a loop blocked on Redis would show here
            while True:
                t = loop.time()
                await asyncio.sleep(0.01)
                lag["max"] = max(lag["max"], loop.time() - t - 0.01)

        watcher = asyncio.create_task(watch_loop())
        stop_at = time.monotonic() + 4.0
        for i, r in enumerate(reps):
            r.add_users("so", 8, stop_at, 70 + i, hold=(0.05, 0.2))
        await asyncio.sleep(0.5)
        admitted_before = sum(r.stats.admitted for r in reps)
        paused_at = time.monotonic()
        await asyncio.to_thread(pause, redis_server.port, PAUSE_MS)
        await eventually(lambda: all(r.store.mode == "fail_static" for r in reps), 1.0)
        noticed = time.monotonic() - paused_at
        await asyncio.sleep(max(0.0, paused_at + PAUSE_MS / 1000 - 0.2 - time.monotonic()))
        admitted_while_paused = sum(r.stats.admitted for r in reps) - admitted_before
        await eventually(lambda: all(r.store.mode == "redis" for r in reps), 3.0)
        await asyncio.wait_for(asyncio.gather(*(u for r in reps for u in r.users)), 10)  # users end by themselves
        watcher.cancel()
        status = {r.name: r.store.status() for r in reps}
        engines = [r.engine for r in reps]
        for r in reps:
            await r.stop()
        return noticed, admitted_while_paused, lag["max"], status, engines

    noticed, admitted, lag, status, engines = asyncio.run(main())
    print(f"\nredis paused {PAUSE_MS} ms: fail static after {noticed:.3f} s, {admitted} admitted meanwhile, max loop lag {lag * 1000:.1f} ms")
    assert noticed < 1.0, noticed  # a sync times out after its socket timeout (0.1 s here) and fails static
    assert admitted > 20, admitted  # requests kept being admitted from the local share while Redis hung
    assert lag < 0.25, lag  # nothing on the event loop waited for Redis
    for name, st in status.items():
        assert st["fail_static_total"] == 1 and st["recoveries"] == 1, (name, st)
        assert "Timeout" in (st["last_error"] or ""), (name, st["last_error"])
    for eng in engines:  # every request ended: the books balance
        eng.check_invariants()
        assert not eng.inflight and not eng.waiting and eng.reserved_total == eng.released_total
