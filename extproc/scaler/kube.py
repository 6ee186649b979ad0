"""TokenPool and TokenEntitlement custom resources: list/watch them into a Config, write their status back.

Locally the config is a YAML file; in a cluster (`tokenpools serve --kube-namespace NS`) it is the custom
resources of one namespace (CRDs in k8s/crds/), read through the `kubernetes` client:

- `CustomResources` lists both kinds, then watches each from the list's resourceVersion (bookmarks on,
  server-side timeout, relist on 410 Gone). It runs in threads (the client is blocking) and keeps the objects
  under a lock; `changed` is called from the watch thread after every change.
- `build_config` validates each object on its own with the same rules as a file (extproc.config), so one bad
  object is reported in its own status and left out instead of failing the whole namespace. Pools first (in
  name order; a second pool for the same model is refused), then entitlements in creation order (dedicated
  and guaranteed bind in config order: first come, first bound).
- `pool_status` / `entitlement_status` say what the engine and controller make of each object; `KubeSync`
  applies config changes to the running server and patches `/status` (merge patch) when it differs from what
  the object already carries, so a restart writes nothing new and our own status writes do not loop.

Status (see the CRDs): TokenPool {phase: Ready | Scaling | Invalid, replicas, desiredReplicas, capacity,
required, conditions[Valid, Ready]}; TokenEntitlement {phase: Pending | Bound | Degraded | Expired | Invalid,
allocation, conditions[Valid, Bound]}; both with observedGeneration.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import structlog

from ..config import Config, ConfigError, from_objects

log = structlog.get_logger("tokenpools.kube")

GROUP = "tokenpools.io"
VERSION = "v1alpha1"
POOLS = "tokenpools"
ENTITLEMENTS = "tokenentitlements"
KIND = {POOLS: "TokenPool", ENTITLEMENTS: "TokenEntitlement"}
WATCH_TIMEOUT_S = 300  # the server ends each watch after this; we then watch again from the last version
MERGE_PATCH = "application/merge-patch+json"


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- objects -> Config --------------------------------------------------------------------------------------
def _document(obj: dict) -> dict:
    """The config document inside a custom resource: what the file format has (no status, no server fields)."""
    meta = obj.get("metadata") or {}
    doc_meta: dict[str, Any] = {"name": meta.get("name", "")}
    if meta.get("namespace"):
        doc_meta["namespace"] = meta["namespace"]
    if meta.get("labels"):
        doc_meta["labels"] = meta["labels"]
    return {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "metadata": doc_meta, "spec": obj.get("spec")}


def _created(obj: dict) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (meta.get("creationTimestamp") or "", meta.get("name") or "")


def build_config(objects: dict[str, dict[str, dict]], source: str = "kubernetes") -> tuple[Config, dict[tuple[str, str], str]]:
    """A Config from the valid objects, and {(plural, name): error} for the others."""
    errors: dict[tuple[str, str], str] = {}
    pools: list[dict] = []
    for name in sorted(objects.get(POOLS, {})):
        doc = _document(objects[POOLS][name])
        try:
            from_objects([*pools, doc], source=f"{source}: TokenPool {name}")
        except ConfigError as exc:
            errors[(POOLS, name)] = _short(str(exc))
            continue
        pools.append(doc)
    ents: list[dict] = []
    digests: dict[str, str] = {}  # an API key belongs to one entitlement: a later one reusing it is refused
    for obj in sorted(objects.get(ENTITLEMENTS, {}).values(), key=_created):
        name = obj["metadata"]["name"]
        doc = _document(obj)
        try:
            cfg = from_objects([*pools, doc], source=f"{source}: TokenEntitlement {name}")
        except ConfigError as exc:
            errors[(ENTITLEMENTS, name)] = _short(str(exc))
            continue
        auth = cfg.entitlements[name].spec.auth
        mine = set(auth.api_key_sha256) | {hashlib.sha256(k.encode()).hexdigest() for k in auth.api_keys}
        taken = sorted(digests[d] for d in mine if d in digests)
        if taken:
            errors[(ENTITLEMENTS, name)] = f"$.spec.auth: an API key of this entitlement is already held by {taken[0]}"
            continue
        digests.update((d, name) for d in mine)
        ents.append(doc)
    return from_objects([*pools, *ents], source=source), errors


def _short(message: str) -> str:
    """From the field on ('$.spec...: problem'): the object's own status already says which object it is."""
    at = message.find("$.")
    return message[at:] if at >= 0 else message


# ---- status documents ---------------------------------------------------------------------------------------
def _condition(type_: str, ok: bool, reason: str, message: str, generation: int | None, previous: dict | None,
               stamp: str) -> dict:  # fmt: skip
    status = "True" if ok else "False"
    old = next((c for c in (previous or {}).get("conditions", []) if c.get("type") == type_), None)
    changed = old is None or old.get("status") != status
    cond = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": stamp if changed else old.get("lastTransitionTime", stamp),
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def _dims(values) -> dict:
    tps, kv, conc = values
    return {"tokensPerSecond": round(float(tps), 3), "kvCacheTokens": round(float(kv), 3), "concurrency": round(float(conc), 3)}


def _status_base(obj: dict, error: str | None, stamp: str) -> tuple[dict[str, Any], str, Any, Any, dict | None]:
    """What every CR status starts with: observedGeneration, and the Valid condition (phase Invalid on error).
    Returns (status, name, generation, previous status, the Valid condition or None when invalid)."""
    meta = obj.get("metadata") or {}
    name, gen, prev = meta.get("name"), meta.get("generation"), obj.get("status")
    status: dict[str, Any] = {}
    if gen is not None:
        status["observedGeneration"] = gen
    if error is not None:
        status["phase"] = "Invalid"
        status["conditions"] = [_condition("Valid", False, "InvalidSpec", error, gen, prev, stamp)]
        return status, name, gen, prev, None
    return status, name, gen, prev, _condition("Valid", True, "Accepted", "spec accepted", gen, prev, stamp)


def pool_status(obj: dict, error: str | None, engine, controller, stamp: str) -> dict:
    status, name, gen, prev, valid = _status_base(obj, error, stamp)
    if valid is None:
        return status
    p = engine.pools.get(name) if engine is not None else None
    if p is None:
        status["phase"] = "Invalid"
        status["conditions"] = [valid]
        return status
    desired = controller.desired(name) if controller is not None else p.replicas
    status["replicas"] = p.replicas
    status["desiredReplicas"] = desired
    status["capacity"] = _dims((p.cap_tps, p.cap_kv, p.cap_conc))
    req = controller.pools[name].requirement if controller is not None and name in controller.pools else None
    if req is not None:
        status["required"] = _dims(req.total)
    ready = p.replicas >= desired
    status["phase"] = "Ready" if ready else "Scaling"
    msg = f"{p.replicas} of {desired} replicas up" if not ready else f"{p.replicas} replicas up, {desired} desired"
    status["conditions"] = [valid, _condition("Ready", ready, "Ready" if ready else "ScalingUp", msg, gen, prev, stamp)]
    return status


def entitlement_status(obj: dict, error: str | None, engine, stamp: str) -> dict:
    status, name, gen, prev, valid = _status_base(obj, error, stamp)
    if valid is None:
        return status
    e = engine.ents.get(name) if engine is not None else None
    if e is None:
        status["phase"] = "Pending"
        status["conditions"] = [valid]
        return status
    phase = e.lifecycle.value
    status["phase"] = phase
    status["allocation"] = _dims((e.a_tps, e.a_kv, e.a_conc))
    messages = {
        "Bound": "baseline allocated",
        "Degraded": "bound, but given less than its baseline (pool capacity below what is reserved)",
        "Pending": "the pool cannot hold this baseline yet",
        "Expired": "expiresAt has passed",
    }
    bound = phase in ("Bound", "Degraded")
    status["conditions"] = [valid, _condition("Bound", bound, phase, messages.get(phase, phase), gen, prev, stamp)]
    return status


def _strip_times(status: dict | None) -> Any:
    if not status:
        return status
    out = dict(status)
    if "conditions" in out:
        out["conditions"] = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in out["conditions"]]
    return out


# ---- list / watch ---------------------------------------------------------------------------------------------
class CustomResources:
    """TokenPool and TokenEntitlement objects of one namespace, kept current by list + watch (blocking calls)."""

    def __init__(self, api, namespace: str, watch_factory: Callable[[], Any] | None = None) -> None:
        self.api = api  # kubernetes.client.CustomObjectsApi
        self.namespace = namespace
        self.objects: dict[str, dict[str, dict]] = {POOLS: {}, ENTITLEMENTS: {}}
        self.resource_version: dict[str, str] = {POOLS: "", ENTITLEMENTS: ""}
        self.lock = threading.Lock()
        self.generation = 0  # bumped on every change of the objects
        self.changed: Callable[[], None] = lambda: None
        self._watch_factory = watch_factory
        self._watches: dict[str, Any] = {}
        self.relists = 0

    def _new_watch(self):
        if self._watch_factory is not None:
            return self._watch_factory()
        from kubernetes import watch

        return watch.Watch()

    def list(self, plural: str) -> None:
        resp = self.api.list_namespaced_custom_object(GROUP, VERSION, self.namespace, plural)
        items = {i["metadata"]["name"]: i for i in resp.get("items") or []}
        with self.lock:
            self.objects[plural] = items
            self.resource_version[plural] = (resp.get("metadata") or {}).get("resourceVersion", "")
            self.generation += 1
        self.relists += 1
        self.changed()

    def list_all(self) -> None:
        for plural in (POOLS, ENTITLEMENTS):
            self.list(plural)

    def snapshot(self) -> tuple[int, dict[str, dict[str, dict]]]:
        with self.lock:
            return self.generation, {k: dict(v) for k, v in self.objects.items()}

    def apply_event(self, plural: str, event: dict) -> None:
        kind = event.get("type")
        obj = event.get("raw_object") or event.get("object") or {}
        meta = obj.get("metadata") or {}
        rv = meta.get("resourceVersion")
        if kind == "BOOKMARK":
            if rv:
                self.resource_version[plural] = rv
            return
        name = meta.get("name")
        if not name or kind not in ("ADDED", "MODIFIED", "DELETED"):
            return
        with self.lock:
            if kind == "DELETED":
                self.objects[plural].pop(name, None)
            else:
                self.objects[plural][name] = obj
            if rv:
                self.resource_version[plural] = rv
            self.generation += 1
        self.changed()

    def watch_once(self, plural: str, timeout_seconds: int = WATCH_TIMEOUT_S) -> int:
        """Consume one watch (until the server ends it); relist on 410 Gone. Returns events handled."""
        from kubernetes.client.exceptions import ApiException

        w = self._new_watch()
        self._watches[plural] = w
        handled = 0
        try:
            for event in w.stream(
                self.api.list_namespaced_custom_object, GROUP, VERSION, self.namespace, plural,
                resource_version=self.resource_version[plural], timeout_seconds=timeout_seconds,
                allow_watch_bookmarks=True,
            ):  # fmt: skip
                self.apply_event(plural, event)
                handled += 1
        except ApiException as exc:
            if exc.status != 410:
                raise
            log.info("watch expired; listing again", plural=plural)
            self.list(plural)
        finally:
            self._watches.pop(plural, None)
        return handled

    def run(self, plural: str, stop: threading.Event) -> None:
        """Thread body: watch forever, with backoff and a relist after errors."""
        backoff = 1.0
        while not stop.is_set():
            try:
                started = time.monotonic()
                if self.watch_once(plural) == 0 and time.monotonic() - started < 1.0:
                    stop.wait(1.0)  # a watch the server ended at once: do not spin on it
                backoff = 1.0
            except Exception as exc:  # network, 5xx, RBAC: keep the last good state, retry
                if stop.is_set():
                    return
                log.warning("watch failed", plural=plural, error=str(exc)[:300], retry_in=backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                try:
                    self.list(plural)
                except Exception as exc2:
                    log.warning("list failed", plural=plural, error=str(exc2)[:300])

    def stop_watches(self) -> None:
        for w in list(self._watches.values()):
            try:
                w.stop()
            except Exception:
                pass

    def patch_status(self, plural: str, name: str, status: dict) -> None:
        self.api.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, plural, name, {"status": status}, _content_type=MERGE_PATCH
        )


def status_patches(objects: dict[str, dict[str, dict]], errors: dict[tuple[str, str], str], engine, controller,
                   stamp: str | None = None) -> list[tuple[str, str, dict]]:  # fmt: skip
    """(plural, name, status) for every object whose status should change."""
    stamp = stamp or now_rfc3339()
    out = []
    for name, obj in sorted(objects.get(POOLS, {}).items()):
        st = pool_status(obj, errors.get((POOLS, name)), engine, controller, stamp)
        if _strip_times(st) != _strip_times(obj.get("status")):
            out.append((POOLS, name, _clearing(st, obj.get("status"))))
    for name, obj in sorted(objects.get(ENTITLEMENTS, {}).items()):
        st = entitlement_status(obj, errors.get((ENTITLEMENTS, name)), engine, stamp)
        if _strip_times(st) != _strip_times(obj.get("status")):
            out.append((ENTITLEMENTS, name, _clearing(st, obj.get("status"))))
    return out


def _clearing(status: dict, previous: dict | None) -> dict:
    """A merge patch keeps keys it does not mention: name the ones to drop with null."""
    return {**{k: None for k in (previous or {}) if k not in status}, **status}


# ---- the running server side ------------------------------------------------------------------------------
@dataclass
class KubeSync:
    """Keep a running server's config equal to the namespace's custom resources, and their status current."""

    resources: CustomResources
    reload: Callable[[Config], None]  # swap a new config into the server (engine.apply + adapter keys)
    engine: Any
    controller: Any = None
    status_period_s: float = 2.0
    debounce_s: float = 0.2
    errors: dict[tuple[str, str], str] = field(default_factory=dict)
    config: Config | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _tasks: list = field(default_factory=list)
    _threads: list = field(default_factory=list)
    _wake: asyncio.Event | None = None
    _seen: int = -1

    def initial(self) -> Config:
        """List once (blocking) and return the config to start the server with."""
        self.resources.list_all()
        gen, objects = self.resources.snapshot()
        self.config, self.errors = build_config(objects, source=f"kubernetes:{self.resources.namespace}")
        self._seen = gen
        for (plural, name), err in self.errors.items():
            log.warning("invalid custom resource", kind=KIND[plural], name=name, error=err)
        return self.config

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        wake = self._wake
        self.resources.changed = lambda: loop.call_soon_threadsafe(wake.set)
        for plural in (POOLS, ENTITLEMENTS):
            t = threading.Thread(target=self.resources.run, args=(plural, self._stop), name=f"watch-{plural}", daemon=True)
            t.start()
            self._threads.append(t)
        self._tasks = [asyncio.create_task(self._reload_loop()), asyncio.create_task(self._status_loop())]

    async def stop(self) -> None:
        self._stop.set()
        self.resources.stop_watches()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def sync(self) -> bool:
        """Rebuild the config if the objects changed; reload the server when the config differs."""
        gen, objects = self.resources.snapshot()
        if gen == self._seen:
            return False
        self._seen = gen
        config, errors = build_config(objects, source=f"kubernetes:{self.resources.namespace}")
        for key, err in errors.items():
            if self.errors.get(key) != err:
                log.warning("invalid custom resource", kind=KIND[key[0]], name=key[1], error=err)
        self.errors = errors
        if self.config is not None and config.pools == self.config.pools and config.entitlements == self.config.entitlements:
            return False  # e.g. our own status write came back as MODIFIED
        self.config = config
        self.reload(config)
        log.info("config applied", pools=len(config.pools), entitlements=len(config.entitlements), invalid=len(errors))
        return True

    def pending_status(self, stamp: str | None = None) -> list[tuple[str, str, dict]]:
        _, objects = self.resources.snapshot()
        return status_patches(objects, self.errors, self.engine, self.controller, stamp)

    async def write_status(self) -> int:
        patches = self.pending_status()
        for plural, name, status in patches:
            try:
                await asyncio.to_thread(self.resources.patch_status, plural, name, status)
            except Exception as exc:
                log.warning("status write failed", kind=KIND[plural], name=name, error=str(exc)[:300])
        return len(patches)

    async def _reload_loop(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.debounce_s)  # a burst of events becomes one reload
            self._wake.clear()
            try:
                self.sync()
            except Exception:
                log.exception("config sync failed")

    async def _status_loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.write_status()
            except Exception:
                log.exception("status loop failed")
            await asyncio.sleep(max(0.1, self.status_period_s - (time.monotonic() - started)))
