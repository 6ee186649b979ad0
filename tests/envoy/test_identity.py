"""API keys → entitlements: digests, constant-time lookup, bearer parsing, trusted sources."""

from __future__ import annotations

import hashlib

import pytest

from extproc.config import load_text
from extproc.envoy.identity import KeyMap, TrustedSource, bearer_key, digest, trusted_entitlement

CONFIG = """
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {name: p}
spec: {model: m, perReplica: {tokensPerSecond: 100, concurrency: 4, kvCacheTokens: 1000}}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: hashed}
spec:
  tenantId: t1
  poolRef: {name: p}
  qos: {serviceClass: spot}
  auth: {apiKeySha256: [%s]}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: demo, labels: {tokenpools.io/demo: "true"}}
spec:
  tenantId: t2
  poolRef: {name: p}
  qos: {serviceClass: spot}
  auth: {apiKeys: [plain-key]}
""" % hashlib.sha256(b"s3cret").hexdigest()


def test_keys_from_config():
    keys = KeyMap.from_config(load_text(CONFIG))
    assert len(keys) == 2
    assert keys.lookup("s3cret") == "hashed"
    assert keys.lookup("plain-key") == "demo"
    assert keys.lookup("s3cret ") is None
    assert keys.lookup("") is None
    assert keys.lookup(digest("s3cret")) is None  # the digest itself is not a key


def test_one_digest_two_entitlements_is_an_error():
    with pytest.raises(ValueError):
        KeyMap([(digest("k"), "a"), (digest("k"), "b")])
    assert KeyMap([(digest("k"), "a"), (digest("k").upper(), "a")]).lookup("k") == "a"


@pytest.mark.parametrize(
    "header, key",
    [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("BEARER abc", "abc"), ("Basic abc", None), ("Bearer", None),
     ("Bearer   ", None), ("", None), (None, None)],
)  # fmt: skip
def test_bearer_parsing(header, key):
    assert bearer_key(header) == key


def test_trusted_sources_only_when_configured():
    headers = {"x-auth-entitlement": "demo"}
    assert trusted_entitlement(None, headers, None) is None
    assert trusted_entitlement(TrustedSource(header="X-Auth-Entitlement"), headers, None) == "demo"
    meta = {"authn": {"entitlement": "hashed", "other": None}}
    src = TrustedSource(metadata_namespace="authn")
    assert trusted_entitlement(src, {}, meta) == "hashed"
    assert trusted_entitlement(TrustedSource(metadata_namespace="authn", metadata_key="other"), {}, meta) is None


def test_bucket_collisions_still_compare_the_full_digest():
    a = "00" * 8 + "11" * 24
    b = "00" * 8 + "22" * 24  # same 8-byte prefix, different digest
    keys = KeyMap([(a, "A"), (b, "B")])
    assert len(keys) == 2
    assert keys._buckets[bytes(8)] == [(bytes.fromhex(a), "A"), (bytes.fromhex(b), "B")]
    import hashlib as _h

    real = _h.sha256(b"k").hexdigest()
    keys = KeyMap([(real[:16] + "0" * 48, "fake"), (real, "real")])
    assert keys.lookup("k") == "real"
