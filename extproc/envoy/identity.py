"""Who is calling: API key → entitlement (and, when configured, a trusted header or Envoy dynamic metadata).

Keys live in the config as SHA-256 hex digests (`spec.auth.apiKeySha256`); plaintext `spec.auth.apiKeys`
are accepted only in configs labelled demo (the config loader enforces that) and are digested on load, so
the adapter never holds or compares plaintext. A presented key is digested once; its first 8 bytes select a
bucket (a dict lookup) and the full digest is compared with each stored one in the bucket using
hmac.compare_digest. Timing can then reveal at most a prefix of SHA-256(presented key), which says nothing
about any stored key (turning a digest into a key is a preimage attack), and lookup stays O(1) with
thousands of tenants.

Trusted sources (off unless configured): a header set by an authentication filter in front of ext_proc
(Envoy must strip any client-sent copy of it — jwt_authn's claim_to_headers does), or a key in Envoy dynamic
metadata forwarded through `metadata_options.forwarding_namespaces`. Either names the entitlement directly.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Iterable, Mapping

from ..config import Config


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class TrustedSource:
    """Where an upstream authn filter puts the entitlement name: a header, or metadata namespace + key."""

    header: str | None = None
    metadata_namespace: str | None = None
    metadata_key: str = "entitlement"


class KeyMap:
    # Digests are bucketed by their first bytes (a dict lookup), then compared in full in constant time.
    _PREFIX = 8

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._buckets: dict[bytes, list[tuple[bytes, str]]] = {}
        owner: dict[bytes, str] = {}
        for hexdigest, entitlement in pairs:
            d = bytes.fromhex(hexdigest)
            if len(d) != 32:
                raise ValueError(f"not a SHA-256 digest: {hexdigest[:12]}…")
            if d in owner:
                if owner[d] != entitlement:
                    raise ValueError(f"API key digest {hexdigest[:12]}… is held by both {owner[d]} and {entitlement}")
                continue
            owner[d] = entitlement
            self._buckets.setdefault(d[: self._PREFIX], []).append((d, entitlement))
        self._count = len(owner)

    @classmethod
    def from_config(cls, config: Config) -> KeyMap:
        pairs: list[tuple[str, str]] = []
        for name, doc in config.entitlements.items():
            pairs.extend((d, name) for d in doc.spec.auth.api_key_sha256)
            pairs.extend((digest(k), name) for k in doc.spec.auth.api_keys)
        return cls(pairs)

    def __len__(self) -> int:
        return self._count

    def lookup(self, key: str) -> str | None:
        presented = hashlib.sha256(key.encode("utf-8")).digest()
        found: str | None = None
        for stored, entitlement in self._buckets.get(presented[: self._PREFIX], ()):
            if hmac.compare_digest(stored, presented):
                found = entitlement
        return found


def bearer_key(authorization: str | None) -> str | None:
    """The key from `Authorization: Bearer <key>` (scheme case-insensitive), or None."""
    if not authorization:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return None
    return key


def trusted_entitlement(
    source: TrustedSource | None, headers: Mapping[str, str], metadata: Mapping[str, Mapping[str, object]] | None
) -> str | None:
    if source is None:
        return None
    if source.header:
        value = headers.get(source.header.lower())
        if value:
            return value.strip()
    if source.metadata_namespace and metadata:
        value = (metadata.get(source.metadata_namespace) or {}).get(source.metadata_key)
        if isinstance(value, str) and value:
            return value
    return None
