"""The state-store interface, the in-memory store (the default), and the loop that drives a store.

A store decides what fraction of each pool this replica's engine may hand out (engine.set_shares) and keeps
priorities (debt, burst) in agreement across replicas. The engine keeps all strategy; a store only moves numbers
and enforces that the replicas together never hold more than the pool. Admission never waits on a store.

    store = open_store("memory" | "redis://HOST:PORT/DB?...", ...)
    events = await store.start(engine, now)     # before serving: the first shares are applied
    ...  run_store(store, dispatch, clock)      # every store.interval seconds: sync, dispatch engine events
    await store.close()
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from ..engine.decisions import Events

log = structlog.get_logger("tokenpools.state")


class StateStore(Protocol):
    kind: str
    interval: float  # seconds between syncs

    async def start(self, engine: Any, now: float) -> Events: ...

    async def sync(self, now: float) -> Events: ...

    async def close(self) -> None: ...

    def status(self) -> dict: ...

    def ready(self) -> bool:
        """Holds capacity to admit with (a replica that does not should not be sent traffic)."""
        ...


class MemoryStore:
    """One replica alone: it holds the whole pool (share 1), its own debt and burst. Nothing to share."""

    kind = "memory"
    interval = 3600.0

    def __init__(self) -> None:
        self.engine: Any = None

    async def start(self, engine: Any, now: float) -> Events:
        self.engine = engine
        return Events()

    async def sync(self, now: float) -> Events:
        return Events()

    async def close(self) -> None:
        pass

    def ready(self) -> bool:
        return True

    def status(self) -> dict:
        return {"kind": self.kind, "mode": "memory", "share": {name: 1.0 for name in (self.engine.pools if self.engine else {})}}


async def run_store(store: StateStore, dispatch: Callable[[Events], None], clock: Callable[[], float]) -> None:
    """Sync every `store.interval` seconds until cancelled; engine events (queued requests a larger share now
    admits, evictions) go to `dispatch` (the Gateway's). A failing sync is the store's business (fail static);
    an exception here is a bug, logged, and the loop goes on."""
    if store.kind == "memory":
        return
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    next_at = loop.time()
    while True:
        next_at += store.interval
        await asyncio.sleep(max(0.0, next_at - loop.time()))
        if loop.time() - next_at > store.interval:  # fell far behind (a stalled loop): don't try to catch up
            next_at = loop.time()
        try:
            events = await store.sync(clock())
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("state sync failed")
            events = None
        if task is not None and task.cancelling():
            # Cancelled while a Redis call was timing out: the cancellation came back as a timeout (asyncio
            # timeouts on 3.11 can do that) and the store failed static on it. Stop anyway.
            raise asyncio.CancelledError
        if events:
            dispatch(events)
