"""Where pool state lives: in this process (memory, the default: one replica holds the whole pool) or shared
by several replicas through Redis (short leases of capacity per replica). See docs/state.md."""

from __future__ import annotations

from .base import MemoryStore, StateStore, run_store

__all__ = ["MemoryStore", "StateStore", "open_store", "run_store"]


def open_store(url: str | None, **kwargs) -> StateStore:
    """`memory` (or None / empty) → MemoryStore; `redis://HOST:PORT/DB?...` → RedisStore (options in the URL
    or as keyword arguments, see redis_store.py)."""
    if not url or url == "memory":
        return MemoryStore()
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis_store import RedisStore

        return RedisStore(url, **kwargs)
    raise ValueError(f"unknown state store {url!r}: use 'memory' or 'redis://HOST:PORT/DB'")
