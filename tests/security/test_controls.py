"""The security controls of docs/SECURITY.md that need no running processes: key storage, constant-time key
comparison, what listens where by default, and least privilege in k8s/."""

from __future__ import annotations

import ast
import asyncio
import hashlib
import hmac
import inspect
import textwrap

import pytest
from click.testing import CliRunner

from extproc.app import TokenpoolsServer, serve_command
from extproc.config import ConfigError, load_text
from extproc.envoy import identity
from extproc.envoy.identity import KeyMap, digest
from tests.k8s.schemas import load_all, manifest_files


def k8s_docs() -> list[dict]:
    """Every manifest under k8s/ (the TLS variant included), not the upstream schemas."""
    return [d for p in manifest_files() for d in load_all(p)]

POOL = """
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {name: p}
spec: {model: m, perReplica: {tokensPerSecond: 100, concurrency: 4, kvCacheTokens: 1000}}
"""


def ent(name: str, auth: str, labels: str = "") -> str:
    return f"""---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {{name: {name}{labels}}}
spec: {{tenantId: t, poolRef: {{name: p}}, qos: {{serviceClass: spot}}, auth: {auth}}}
"""


# -- API keys: digests only, outside configs labelled demo ---------------------------------------------------
# The loader's rule is also tested in tests/engine/test_config.py (test_errors_name_document_and_field
# [plaintext ...] and test_digests_accepted_and_demo_label_allows_plaintext).


def test_plaintext_keys_only_in_demo_configs():
    with pytest.raises(ConfigError, match="plaintext keys are allowed only in demo configs"):
        load_text(POOL + ent("e", "{apiKeys: [k]}"))
    with pytest.raises(ConfigError):  # a label with another value is not the demo label
        load_text(POOL + ent("e", "{apiKeys: [k]}", ", labels: {tokenpools.io/demo: 'false'}"))
    assert load_text(POOL + ent("e", "{apiKeys: [k]}", ", labels: {tokenpools.io/demo: 'true'}")).entitlements
    cfg = load_text(POOL + ent("e", f"{{apiKeySha256: [{digest('k')}]}}"))
    assert KeyMap.from_config(cfg).lookup("k") == "e"


def test_manifests_for_a_cluster_hold_digests_only():
    ents = [d for d in k8s_docs() if d.get("kind") == "TokenEntitlement"]
    assert ents
    for d in ents:
        assert not d["spec"].get("auth", {}).get("apiKeys"), d["metadata"]["name"]
        assert "tokenpools.io/demo" not in d["metadata"].get("labels", {})


def test_the_key_map_holds_no_plaintext():
    cfg = load_text(POOL + ent("e", "{apiKeys: [plain-secret]}", ", labels: {tokenpools.io/demo: 'true'}"))
    keys = KeyMap.from_config(cfg)
    held = repr(keys._buckets)
    assert "plain-secret" not in held and hashlib.sha256(b"plain-secret").digest() in {d for b in keys._buckets.values() for d, _ in b}


# -- constant-time comparison ----------------------------------------------------------------------------------


def test_lookup_compares_full_digests_with_hmac_compare_digest(monkeypatch):
    calls = []
    real_compare = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(identity.hmac, "compare_digest", spy)
    real = hashlib.sha256(b"k").digest()
    # Two digests in the same 8-byte bucket, the matching one first: both are compared (no early exit).
    keys = KeyMap([(real.hex(), "real"), (real[:8].hex() + "00" * 24, "decoy")])
    assert keys.lookup("k") == "real"
    assert len(calls) == 2 and all(len(a) == len(b) == 32 for a, b in calls)
    assert all(real in pair for pair in calls)


def test_lookup_has_no_plain_comparison_or_early_exit():
    tree = ast.parse(textwrap.dedent(inspect.getsource(KeyMap.lookup)))
    compares = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)]
    assert not [c for c in compares if any(isinstance(op, (ast.Eq, ast.NotEq)) for op in c.ops)]
    (loop,) = [n for n in ast.walk(tree) if isinstance(n, ast.For)]
    assert not [n for n in ast.walk(loop) if isinstance(n, (ast.Return, ast.Break))]


# -- what listens where by default -----------------------------------------------------------------------------


def test_status_and_grpc_bind_loopback_by_default():
    params = inspect.signature(TokenpoolsServer).parameters
    assert params["host"].default == "127.0.0.1" and params["status_host"].default == "127.0.0.1"
    opts = {p.name: p.default for p in serve_command.params}
    assert opts["host"] == "127.0.0.1" and opts["status_host"] == "127.0.0.1"

    async def run():
        server = TokenpoolsServer(load_text(POOL), ext_proc_port=0, status_port=0)
        await server.start()
        try:
            (site,) = server._runner.sites  # type: ignore[union-attr]
            (sock,) = site._server.sockets
            return sock.getsockname()[0]
        finally:
            await server.stop(0.1)

    assert asyncio.run(run()) == "127.0.0.1"


def test_serve_help_says_so():
    text = " ".join(CliRunner().invoke(serve_command, ["--help"], terminal_width=200).output.split())
    assert "--status-host TEXT Address the status HTTP server binds (loopback by default" in text
    assert "[default: 127.0.0.1]" in text.split("--status-host", 1)[1].split("--ext-proc-port", 1)[0]
    assert "--tls-client-ca" in text and "mutual TLS" in text


def test_k8s_exposes_status_only_inside_the_namespace_and_to_prometheus():
    dep = [d for d in k8s_docs() if d.get("kind") == "Deployment" and d["metadata"]["name"] == "tokenpools"]
    assert len(dep) == 3  # base, TLS and HA variants
    (policy,) = [d for d in k8s_docs() if d.get("kind") == "NetworkPolicy" and d["metadata"]["name"] == "tokenpools"]
    status_rules = [r for r in policy["spec"]["ingress"] if {"port": 9464, "protocol": "TCP"} in r["ports"]]
    allowed = ({"podSelector": {}}, {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}})
    assert status_rules and all(src in allowed for r in status_rules for src in r["from"])  # own namespace + Prometheus
    for d in dep:
        args = d["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--status-host=0.0.0.0" in args  # the kubelet's liveness probe comes from outside the pod


# -- least privilege in k8s/ (exact rules: tests/k8s/test_manifests.py::test_rbac_is_least_privilege) -----------


def test_rbac_has_no_wildcards_secrets_or_cluster_rights():
    docs = k8s_docs()
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = [d for d in docs if d["kind"] == "Role"]
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], (role["metadata"]["name"], field)
            assert not {"secrets", "pods", "pods/exec", "configmaps", "serviceaccounts"} & set(rule["resources"])
            assert set(rule["apiGroups"]) == {"tokenpools.io"}
            assert not {"create", "delete", "deletecollection", "update", "escalate", "bind", "impersonate"} & set(rule["verbs"])
    for d in docs:
        if d["kind"] == "Deployment" and not d["metadata"]["name"].startswith("vllm"):  # ours: tokenpools, Envoy
            pod = d["spec"]["template"]["spec"]
            for c in pod["containers"]:
                sc = c.get("securityContext", {})
                assert sc.get("allowPrivilegeEscalation") is False and sc.get("capabilities", {}).get("drop") == ["ALL"], d["metadata"]["name"]
