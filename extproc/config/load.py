"""Loading and validating configuration: YAML files of TokenPool / TokenEntitlement documents.

Every error names the file, the document (index, kind and name) and the field, e.g.
`tenants.yaml: document 3 (TokenEntitlement spot-b): $.spec.qos.serviceClass: Invalid enum value 'gold'`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import msgspec
import yaml

from .documents import (
    API_VERSION,
    BASELINE_CLASSES,
    Document,
    TokenEntitlement,
    TokenPool,
)

DEMO_LABEL = "tokenpools.io/demo"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Config:
    pools: dict[str, TokenPool] = field(default_factory=dict)
    entitlements: dict[str, TokenEntitlement] = field(default_factory=dict)
    source: str = "<memory>"


def load_file(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from exc
    return load_text(text, source=str(path))


def load_text(text: str, source: str = "<text>") -> Config:
    try:
        raw = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    return from_objects(raw, source=source)


def _describe(index: int, raw: Any) -> str:
    if isinstance(raw, dict):
        kind = raw.get("kind", "?")
        name = (raw.get("metadata") or {}).get("name", "?") if isinstance(raw.get("metadata"), dict) else "?"
        return f"document {index} ({kind} {name})"
    return f"document {index}"


def from_objects(raw_documents: Iterable[Any], source: str = "<objects>") -> Config:
    """Validate already-parsed documents (dicts) into a Config; raises ConfigError on the first problem."""
    pools: dict[str, TokenPool] = {}
    entitlements: dict[str, TokenEntitlement] = {}
    for index, raw in enumerate(raw_documents, start=1):
        where = f"{source}: {_describe(index, raw)}"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping with apiVersion, kind, metadata, spec")
        if raw.get("apiVersion") != API_VERSION:
            raise ConfigError(f"{where}: $.apiVersion: expected {API_VERSION!r}, got {raw.get('apiVersion')!r}")
        try:
            doc = msgspec.convert(raw, Document)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{where}: {_field_first(str(exc))}") from exc
        registry: dict[str, Any] = pools if isinstance(doc, TokenPool) else entitlements
        if doc.metadata.name in registry:
            raise ConfigError(f"{where}: $.metadata.name: duplicate name {doc.metadata.name!r}")
        _check(doc, where)
        registry[doc.metadata.name] = doc
    models: dict[str, str] = {}
    for name, pool in pools.items():
        if pool.spec.model in models:
            raise ConfigError(
                f"{source}: TokenPool {name}: $.spec.model: model {pool.spec.model!r} already served by "
                f"TokenPool {models[pool.spec.model]}"
            )
        models[pool.spec.model] = name
    for name, ent in entitlements.items():
        if ent.spec.pool_ref.name not in pools:
            raise ConfigError(
                f"{source}: TokenEntitlement {name}: $.spec.poolRef.name: no TokenPool named {ent.spec.pool_ref.name!r}"
            )
    return Config(pools=pools, entitlements=entitlements, source=source)


def _field_first(message: str) -> str:
    """msgspec says 'problem - at `$.path`'; we say '$.path: problem'."""
    problem, sep, at = message.rpartition(" - at `")
    return f"{at.rstrip('`')}: {problem}" if sep else message


def _check(doc: Document, where: str) -> None:
    """Rules a schema cannot express."""
    if isinstance(doc, TokenPool):
        spec = doc.spec
        r = spec.replicas
        if r.min < 0 or r.max < r.min:
            raise ConfigError(f"{where}: $.spec.replicas: need 0 <= min <= max, got min={r.min} max={r.max}")
        if r.current is not None and not r.min <= r.current <= r.max:
            raise ConfigError(f"{where}: $.spec.replicas.current: {r.current} outside [{r.min}, {r.max}]")
        p = spec.per_replica
        if p.tokens_per_second <= 0 or p.concurrency <= 0:
            raise ConfigError(f"{where}: $.spec.perReplica: tokensPerSecond and concurrency must be > 0")
        if (p.kv_cache_tokens is None) == (p.model_geometry is None):
            raise ConfigError(f"{where}: $.spec.perReplica: give exactly one of kvCacheTokens or modelGeometry")
        if p.kv_cache_tokens is not None and p.kv_cache_tokens <= 0:
            raise ConfigError(f"{where}: $.spec.perReplica.kvCacheTokens: must be > 0")
        c = spec.control
        for fname in ("gamma_debt", "gamma_burst"):
            if not 0.0 <= getattr(c, fname) < 1.0:
                raise ConfigError(f"{where}: $.spec.control.{_camel(fname)}: must be in [0, 1)")
        for fname in ("period_seconds", "burst_seconds", "idle_seconds"):
            if getattr(c, fname) <= 0:
                raise ConfigError(f"{where}: $.spec.control.{_camel(fname)}: must be > 0")
        if spec.queue.max_queued < 0 or spec.queue.max_queued_per_entitlement < 0 or spec.queue.timeout_seconds < 0:
            raise ConfigError(f"{where}: $.spec.queue: sizes and timeout must be >= 0")
        if spec.default_max_tokens <= 0:
            raise ConfigError(f"{where}: $.spec.defaultMaxTokens: must be > 0")
        return
    spec = doc.spec
    res = spec.resources
    given = {k: v for k, v in msgspec.structs.asdict(res).items() if v is not None}
    for k, v in given.items():
        if v < 0:
            raise ConfigError(f"{where}: $.spec.resources.{_camel(k)}: must be >= 0")
    if spec.qos.service_class in BASELINE_CLASSES and not any(v > 0 for v in given.values()):
        raise ConfigError(
            f"{where}: $.spec.resources: a {spec.qos.service_class.value} entitlement needs a baseline "
            "(tokensPerSecond, kvCacheTokens or concurrency)"
        )
    if spec.qos.service_class not in BASELINE_CLASSES and any(v > 0 for v in given.values()):
        raise ConfigError(
            f"{where}: $.spec.resources: {spec.qos.service_class.value} has no baseline; "
            "set ceilings under spec.burst instead"
        )
    if spec.qos.slo_target_ms <= 0:
        raise ConfigError(f"{where}: $.spec.qos.sloTargetMs: must be > 0")
    if spec.defaults.max_tokens is not None and spec.defaults.max_tokens <= 0:
        raise ConfigError(f"{where}: $.spec.defaults.maxTokens: must be > 0")
    for i, digest in enumerate(spec.auth.api_key_sha256):
        if not _HEX64.match(digest):
            raise ConfigError(f"{where}: $.spec.auth.apiKeySha256[{i}]: not a lowercase hex SHA-256 digest")
    if spec.auth.api_keys and doc.metadata.labels.get(DEMO_LABEL) != "true":
        raise ConfigError(
            f"{where}: $.spec.auth.apiKeys: plaintext keys are allowed only in demo configs "
            f"(label {DEMO_LABEL}: \"true\"); store SHA-256 digests in apiKeySha256"
        )


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(p.title() for p in rest)
