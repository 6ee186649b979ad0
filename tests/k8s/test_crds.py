"""Our CRDs say what extproc/config says: same fields (wire names), types, enums and required fields, and the
same documents are accepted or refused by both (the rules a schema cannot express aside)."""

from __future__ import annotations

import msgspec
import msgspec.inspect as mi
import pytest

from extproc.config import ConfigError, from_objects
from extproc.config.documents import TokenEntitlementSpec, TokenPoolSpec

from .schemas import OURS, errors, load_all


def _crd(kind: str) -> dict:
    for path in OURS.glob("*.yaml"):
        for crd in load_all(path):
            if crd["spec"]["names"]["kind"] == kind:
                return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    raise KeyError(kind)


def _unwrap(t):
    """Optional[X] -> X."""
    if isinstance(t, mi.UnionType):
        rest = [x for x in t.types if not isinstance(x, mi.NoneType)]
        assert len(rest) == 1, t
        return rest[0]
    return t


def _compare(t, schema: dict, where: str) -> None:
    t = _unwrap(t)
    if isinstance(t, mi.StructType):
        assert schema.get("type") == "object", where
        props = schema.get("properties", {})
        names = {f.encode_name for f in t.fields}
        assert set(props) == names, f"{where}: CRD {sorted(set(props) ^ names)} differ from the config type"
        required = {f.encode_name for f in t.fields if f.required}
        assert set(schema.get("required", [])) == required, where
        for f in t.fields:
            _compare(f.type, props[f.encode_name], f"{where}.{f.encode_name}")
    elif isinstance(t, mi.IntType):
        assert schema["type"] == "integer", where
    elif isinstance(t, mi.FloatType):
        assert schema["type"] == "number", where
    elif isinstance(t, mi.StrType):
        assert schema["type"] == "string", where
    elif isinstance(t, mi.BoolType):
        assert schema["type"] == "boolean", where
    elif isinstance(t, mi.EnumType):
        assert schema["type"] == "string" and set(schema["enum"]) == {m.value for m in t.cls}, where
    elif isinstance(t, mi.LiteralType):
        assert set(schema["enum"]) == set(t.values), where
    elif isinstance(t, mi.ListType):
        assert schema["type"] == "array", where
        _compare(t.item_type, schema["items"], f"{where}[]")
    elif isinstance(t, mi.DictType):
        assert schema["type"] == "object" and schema["additionalProperties"]["type"] == "string", where
    else:  # pragma: no cover - a new field type needs a rule here
        raise AssertionError(f"{where}: no rule for {t!r}")


@pytest.mark.parametrize("kind,spec", [("TokenPool", TokenPoolSpec), ("TokenEntitlement", TokenEntitlementSpec)])
def test_crd_spec_matches_the_config_type(kind, spec):
    _compare(mi.type_info(spec), _crd(kind)["properties"]["spec"], kind)


def test_the_comparison_notices_a_difference():
    schema = _crd("TokenPool")["properties"]["spec"]
    broken = {**schema, "properties": {k: v for k, v in schema["properties"].items() if k != "queue"}}
    with pytest.raises(AssertionError):
        _compare(mi.type_info(TokenPoolSpec), broken, "TokenPool")


POOL = {
    "apiVersion": "tokenpools.io/v1alpha1", "kind": "TokenPool", "metadata": {"name": "p"},
    "spec": {"model": "m", "perReplica": {"tokensPerSecond": 100, "concurrency": 4, "kvCacheTokens": 1000}},
}  # fmt: skip


def _ent(**spec):
    base = {"tenantId": "t", "poolRef": {"name": "p"}, "qos": {"serviceClass": "spot"}}
    return {"apiVersion": "tokenpools.io/v1alpha1", "kind": "TokenEntitlement", "metadata": {"name": "e"}, "spec": {**base, **spec}}


GOOD = [
    POOL,
    {**POOL, "spec": {**POOL["spec"], "perReplica": {"tokensPerSecond": 1, "concurrency": 1,
     "modelGeometry": {"layers": 32, "kvHeads": 8, "headDim": 128, "kvCacheGiB": 40}}}},  # fmt: skip
    {**POOL, "spec": {**POOL["spec"], "control": {"lendReserved": "idle", "gammaDebt": 0.5}, "queue": {"maxQueued": 0}}},
    _ent(burst={"concurrency": 3}),
    _ent(qos={"serviceClass": "guaranteed", "sloTargetMs": 200}, resources={"tokensPerSecond": 50.5}, defaults={"maxTokens": 8}),
    _ent(qos={"serviceClass": "elastic"}, resources={"concurrency": 2}, auth={"apiKeySha256": ["a" * 64]}, expiresAt=1.8e9),
]
BAD = [  # refused by the CRD schema and by the config loader alike
    {**POOL, "spec": {**POOL["spec"], "replicas": {"min": -1}}},
    {**POOL, "spec": {**POOL["spec"], "perReplica": {"tokensPerSecond": 100, "concurrency": 4}}},
    {**POOL, "spec": {**POOL["spec"], "control": {"lendReserved": "always"}}},
    {**POOL, "spec": {**POOL["spec"], "modle": "typo"}},
    {**POOL, "spec": {"perReplica": POOL["spec"]["perReplica"]}},
    _ent(qos={"serviceClass": "gold"}),
    _ent(auth={"apiKeySha256": ["not-hex"]}),
    _ent(resources={"concurrency": -1}),
    _ent(defaults={"maxTokens": 0}),
    {**_ent(), "spec": {"tenantId": "t", "qos": {"serviceClass": "spot"}}},
]


@pytest.mark.parametrize("doc", GOOD)
def test_good_documents_pass_both(doc):
    assert not errors(doc), errors(doc)
    docs = [doc] if doc["kind"] == "TokenPool" else [POOL, doc]
    from_objects(docs)


@pytest.mark.parametrize("doc", BAD)
def test_bad_documents_fail_both(doc):
    assert errors(doc)
    docs = [doc] if doc["kind"] == "TokenPool" else [POOL, doc]
    with pytest.raises((ConfigError, msgspec.ValidationError)):
        from_objects(docs)
