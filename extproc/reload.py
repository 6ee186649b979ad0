"""Hot reload of the config file: watch it, validate a change, apply it atomically, or keep the old one.

A change is applied only when the whole file is valid (every document, every cross reference, no API key held
by two entitlements); then `TokenpoolsServer.reload` swaps it in at once (Engine.apply keeps in-flight and
queued requests, debt and counters; a reduced entitlement takes effect for new admissions). An invalid file
changes nothing: the running config stays, and the reason goes to the log, /status ("config") and the
`tokenpools_config_reloads_total{result="error"}` metric.

The file's directory is watched (not the file), so editors that save by writing a new file and renaming it
over the old one, and Kubernetes ConfigMap volumes (which swap a symlink), are seen too. SIGHUP re-reads the
file as well. A change that leaves the bytes as they were is ignored.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from .config import Config, ConfigError, load_text

log = structlog.get_logger("tokenpools.reload")


@dataclass
class ConfigState:
    """What the server says about its configuration: where it came from, which version runs, what failed."""

    source: str
    generation: int = 1  # bumped by every applied change
    digest: str = ""  # SHA-256 of the file as applied (file sources)
    loaded_at: float = 0.0  # wall clock of the last applied change
    reloads_ok: int = 0
    reloads_failed: int = 0
    last_error: str | None = None  # why the last attempt failed (cleared by a success)
    last_error_at: float | None = None

    def succeeded(self, digest: str = "") -> None:
        self.generation += 1
        self.digest = digest
        self.loaded_at = time.time()
        self.reloads_ok += 1
        self.last_error = self.last_error_at = None

    def failed(self, error: str) -> None:
        self.reloads_failed += 1
        self.last_error = error
        self.last_error_at = time.time()

    def status(self) -> dict:
        return {
            "source": self.source,
            "generation": self.generation,
            "sha256": self.digest or None,
            "loaded_at": self.loaded_at,
            "reloads": {"ok": self.reloads_ok, "error": self.reloads_failed},
            "ok": self.last_error is None,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ConfigWatcher:
    """Re-reads `path` when it changes and hands a valid config to `apply` (which may raise ValueError to
    refuse it, e.g. a key held by two entitlements); records the outcome in `state`."""

    def __init__(self, path: str | os.PathLike, apply: Callable[[Config], None], state: ConfigState, debounce_ms: int = 100) -> None:
        self.path = Path(path).absolute()
        self.apply = apply
        self.state = state
        self.debounce_ms = debounce_ms
        self._stop = asyncio.Event()

    def check(self) -> bool | None:
        """Read the file now. True: a new config was applied; False: it was refused; None: unchanged."""
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            return self._refuse(f"{self.path}: cannot read: {exc.strerror or exc}")
        digest = digest_of(data)
        if digest == self.state.digest:  # unchanged, or back to the running version after a refused edit
            if self.state.last_error is not None:
                log.info("config file is back to the running version", path=str(self.path))
                self.state.last_error = self.state.last_error_at = None
            return None
        try:
            config = load_text(data.decode("utf-8", "replace"), str(self.path))
            self.apply(config)
        except (ConfigError, ValueError) as exc:
            return self._refuse(str(exc))
        self.state.succeeded(digest)
        log.info(
            "config reloaded", path=str(self.path), generation=self.state.generation, pools=len(config.pools),
            entitlements=len(config.entitlements),
        )  # fmt: skip
        return True

    def _refuse(self, error: str) -> bool:
        if error != self.state.last_error:  # one line per distinct error, not one per save
            log.error("config reload refused, keeping the running config", path=str(self.path), error=error)
        self.state.failed(error)
        return False

    async def run(self) -> None:
        """Watch until stop(); each batch of file events becomes one check."""
        import watchfiles

        target = str(self.path)

        def ours(change: watchfiles.Change, changed: str) -> bool:
            # The file itself, or (ConfigMap volumes) the ..data symlink swap beside it.
            return changed == target or os.path.basename(changed).startswith("..")

        async for _ in watchfiles.awatch(
            self.path.parent, watch_filter=ours, debounce=self.debounce_ms, step=20, stop_event=self._stop,
            rust_timeout=500, yield_on_timeout=False,
        ):  # fmt: skip
            try:
                self.check()
            except Exception:  # never let the watcher die: the next save gets another chance
                log.exception("config reload failed", path=target)

    def stop(self) -> None:
        self._stop.set()
