"""Config documents: validation errors name file, document and field; unknown fields are errors."""

import hashlib
import subprocess
import sys

import pytest

from extproc.config import ConfigError, load_file, load_text
from extproc.config.documents import ModelGeometry

POOL = """
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {name: p}
spec:
  model: m
  perReplica: {tokensPerSecond: 480, concurrency: 16, kvCacheTokens: 32768}
"""


def ent(body: str, name: str = "e") -> str:
    return f"""---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {{name: {name}}}
spec:
  tenantId: t
  poolRef: {{name: p}}
{body}"""


def test_packaged_example_loads():
    from importlib.resources import files

    cfg = load_file(str(files("extproc") / "examples" / "exp1.yaml"))
    assert set(cfg.entitlements) == {"guaranteed-a", "spot-b", "guaranteed-c"}
    assert cfg.pools["paper-spark"].spec.control.gamma_debt == 0.7  # the paper's default


@pytest.mark.parametrize(
    "body, expected",
    [
        ("  qos: {serviceClass: gold}\n", "document 2 (TokenEntitlement e): $.spec.qos.serviceClass: Invalid enum value 'gold'"),
        ("  qos: {serviceClass: spot}\n  colour: red\n", "document 2 (TokenEntitlement e): $.spec: Object contains unknown field `colour`"),
        ("  qos: {serviceClass: guaranteed}\n", "$.spec.resources: a guaranteed entitlement needs a baseline"),
        ("  qos: {serviceClass: spot}\n  resources: {concurrency: 2}\n", "$.spec.resources: spot has no baseline"),
        ("  qos: {serviceClass: elastic}\n  resources: {concurrency: '2'}\n", "$.spec.resources.concurrency: Expected `int | null`, got `str`"),
        ("  qos: {serviceClass: spot}\n  auth: {apiKeys: [k]}\n", "plaintext keys are allowed only in demo configs"),
        ("  qos: {serviceClass: spot}\n  auth: {apiKeySha256: [abc]}\n", "$.spec.auth.apiKeySha256[0]: not a lowercase hex SHA-256 digest"),
    ],
)
def test_errors_name_document_and_field(body, expected):
    with pytest.raises(ConfigError) as err:
        load_text(POOL + ent(body), source="tenants.yaml")
    assert str(err.value).startswith("tenants.yaml: ") and expected in str(err.value)


def test_cross_document_errors():
    with pytest.raises(ConfigError, match=r"\$.spec.poolRef.name: no TokenPool named 'nope'"):
        load_text(POOL + ent("  qos: {serviceClass: spot}\n").replace("poolRef: {name: p}", "poolRef: {name: nope}"))
    with pytest.raises(ConfigError, match="duplicate name 'e'"):
        load_text(POOL + ent("  qos: {serviceClass: spot}\n") + ent("  qos: {serviceClass: spot}\n"))
    with pytest.raises(ConfigError, match="apiVersion"):
        load_text(POOL.replace("v1alpha1", "v2"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_text("a: [")


def test_digests_accepted_and_demo_label_allows_plaintext():
    digest = hashlib.sha256(b"secret").hexdigest()
    cfg = load_text(POOL + ent(f"  qos: {{serviceClass: spot}}\n  auth: {{apiKeySha256: [{digest}]}}\n"))
    assert cfg.entitlements["e"].spec.auth.api_key_sha256 == [digest]
    demo = ent("  qos: {serviceClass: spot}\n  auth: {apiKeys: [k]}\n").replace(
        "metadata: {name: e}", "metadata: {name: e, labels: {tokenpools.io/demo: 'true'}}"
    )
    assert load_text(POOL + demo).entitlements["e"].spec.auth.api_keys == ["k"]


def test_kv_from_model_geometry():
    # Llama-3-8B: 32 layers, 8 KV heads, head_dim 128, BF16 -> 128 KiB per token.
    g = ModelGeometry(layers=32, kv_heads=8, head_dim=128, kv_cache_gi_b=64.0)
    assert g.kv_cache_tokens == 64 * 2**30 // (128 * 1024)


def test_validate_command_exit_codes(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(POOL + ent("  qos: {serviceClass: spot}\n"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(POOL + ent("  qos: {serviceClass: gold}\n"))
    ok = subprocess.run([sys.executable, "-m", "extproc.cli", "validate", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and "ok (1 pools, 1 entitlements)" in ok.stdout
    ko = subprocess.run([sys.executable, "-m", "extproc.cli", "validate", str(bad)], capture_output=True, text=True)
    assert ko.returncode == 1 and f"{bad}: document 2 (TokenEntitlement e): $.spec.qos.serviceClass" in ko.stderr
