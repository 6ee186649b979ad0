"""Every manifest under k8s/ validates against the real schemas, and the manifests agree with one another."""

from __future__ import annotations

import subprocess

import pytest

from extproc.config import from_objects, load_file
from extproc.envoy.bootstrap import envoy_binary
from extproc.scaler.kube import _document

from . import schemas
from .schemas import K8S, REPO, SHARED, UPSTREAM, errors, load_all, manifest_files, validate

# Overlays replace same-named base objects; validated in test_tls_manifests.py and test_ha_manifests.py.
OVERLAYS = (K8S / "tls", K8S / "ha")
DOCS = [(p, i, d) for p in manifest_files() if not any(o in p.parents for o in OVERLAYS) for i, d in enumerate(load_all(p))]


def _id(item) -> str:
    path, i, doc = item
    return f"{path.relative_to(K8S)}#{i}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def by_kind(kind: str) -> list[dict]:
    return [d for _, _, d in DOCS if d["kind"] == kind]


def one(kind: str, name: str) -> dict:
    (doc,) = [d for d in by_kind(kind) if d["metadata"]["name"] == name]
    return doc


def test_the_manifests_are_there():
    kinds = {d["kind"] for _, _, d in DOCS}
    assert {
        "CustomResourceDefinition", "Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment",
        "Service", "NetworkPolicy", "ScaledObject", "GatewayClass", "Gateway", "HTTPRoute", "EnvoyExtensionPolicy",
        "TokenPool", "TokenEntitlement",
    } <= kinds  # fmt: skip
    assert len(DOCS) >= 25


@pytest.mark.parametrize("item", DOCS, ids=[_id(x) for x in DOCS])
def test_manifest_validates(item):
    validate(item[2])


def test_validation_can_fail():
    """The validators are not vacuous: typos, wrong types and bad enums are caught for every source."""
    so = one("ScaledObject", "vllm-qwen3-8b")
    assert errors({**so, "spec": {**so["spec"], "pollingIntervall": 5}})  # unknown field (strict)
    assert errors({**so, "spec": {**so["spec"], "triggers": [{"type": "external-push"}]}})  # metadata required
    pol = one("EnvoyExtensionPolicy", "tokenpools-ext-proc")
    ext = pol["spec"]["extProc"][0]
    assert errors({**pol, "spec": {**pol["spec"], "extProc": [{**ext, "processingMode": {"request": {"body": "Duplex"}}}]}})
    route = one("HTTPRoute", "openai")
    assert errors({**route, "spec": {**route["spec"], "rules": [{"timeouts": {"request": "forever"}}]}})
    dep = one("Deployment", "tokenpools")
    assert errors({**dep, "spec": {**dep["spec"], "replicas": "one"}})
    assert errors({**dep, "spec": {**dep["spec"], "replica": 1}})  # core kinds are strict too
    pool = one("TokenPool", "paper-spark")
    assert errors({**pool, "spec": {**pool["spec"], "perReplica": {"tokensPerSecond": 480, "concurrency": 16}}})  # oneOf
    ent = one("TokenEntitlement", "guaranteed-a")
    assert errors({**ent, "spec": {**ent["spec"], "qos": {"serviceClass": "gold"}}})


def test_upstream_schemas_are_unchanged_copies():
    copied = sorted(UPSTREAM.glob("*.yaml"))
    sources = (UPSTREAM / "SOURCES.md").read_text()
    assert copied and all(p.name in sources for p in copied)
    if not SHARED.is_dir():
        pytest.skip("../shared/schemas not present on this machine")
    for p in copied:
        assert p.read_bytes() == (SHARED / p.name).read_bytes(), p.name


def test_custom_resources_are_the_config_documents():
    """The CR examples load as tokenpools config, and the local demo configs validate as CRs."""
    crs = by_kind("TokenPool") + by_kind("TokenEntitlement")
    config = from_objects([_document(d) for d in crs])
    assert set(config.pools) == {"paper-spark"} and len(config.entitlements) == 3
    demo = REPO / "extproc" / "examples" / "exp1.yaml"
    assert load_file(demo).pools
    for raw in load_all(demo):  # the file documents as they are written
        validate(raw)


def test_references_between_manifests_agree():
    ns = one("Namespace", "tokenpools")["metadata"]["name"]
    for _, _, d in DOCS:
        if d["kind"] not in ("Namespace", "CustomResourceDefinition", "GatewayClass"):
            assert d["metadata"].get("namespace") == ns, _id((K8S, 0, d))
    svc = one("Service", "tokenpools")
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert ports == {"ext-proc": 9002, "scaler": 9003, "status": 9464}
    dep = one("Deployment", "tokenpools")
    pod = dep["spec"]["template"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["serviceAccountName"] == one("ServiceAccount", "tokenpools")["metadata"]["name"]
    container = pod["spec"]["containers"][0]
    cm = one("ConfigMap", "tokenpools")
    for env in container["env"]:
        ref = env.get("valueFrom", {}).get("configMapKeyRef")
        if ref:
            assert ref["name"] == "tokenpools" and ref["key"] in cm["data"]
    # KEDA talks to the scaler port of the tokenpools Service, about a pool that exists, scaling vLLM.
    so = one("ScaledObject", "vllm-qwen3-8b")
    trig = so["spec"]["triggers"][0]
    assert trig["type"] == "external-push" and trig.get("metricType", "AverageValue") == "AverageValue"
    assert trig["metadata"]["scalerAddress"] == f"tokenpools.{ns}.svc.cluster.local:{ports['scaler']}"
    pool = one("TokenPool", trig["metadata"]["pool"])
    assert trig["metadata"]["dimension"] in ("concurrency", "tokensPerSecond", "kvCacheTokens")
    assert so["spec"]["scaleTargetRef"]["name"] == one("Deployment", "vllm-qwen3-8b")["metadata"]["name"]
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (
        pool["spec"]["replicas"]["min"], pool["spec"]["replicas"]["max"])  # fmt: skip
    # The controller scrapes the headless vLLM Service; vLLM's --max-num-seqs is the pool's concurrency.
    headless = one("Service", "vllm-qwen3-8b-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert cm["data"]["BACKEND"] == f"{pool['metadata']['name']}=dns+http://vllm-qwen3-8b-headless.{ns}.svc.cluster.local:8000"
    vllm_args = one("Deployment", "vllm-qwen3-8b")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--max-num-seqs={pool['spec']['perReplica']['concurrency']}" in vllm_args
    assert f"--served-model-name={pool['spec']['model']}" in vllm_args
    # The gateway routes to the vLLM Service and sends every request through our ext_proc first.
    route = one("HTTPRoute", "openai")
    assert route["spec"]["rules"][0]["backendRefs"][0] == {"name": "vllm-qwen3-8b", "port": 8000}
    gw = one("Gateway", route["spec"]["parentRefs"][0]["name"])
    assert one("GatewayClass", gw["spec"]["gatewayClassName"])
    pol = one("EnvoyExtensionPolicy", "tokenpools-ext-proc")
    assert pol["spec"]["targetRefs"][0]["name"] == gw["metadata"]["name"]
    assert pol["spec"]["extProc"][0]["backendRefs"][0]["port"] == ports["ext-proc"]


def test_envoy_gateway_cel_rules_our_policy_relies_on():
    """The EnvoyExtensionPolicy CRD's CEL rules (not checked by jsonschema), evaluated by hand for our policy."""
    pol = one("EnvoyExtensionPolicy", "tokenpools-ext-proc")["spec"]
    assert all(r["group"] == "gateway.networking.k8s.io" and r["kind"] in ("Gateway", "HTTPRoute") for r in pol["targetRefs"])
    for ext in pol["extProc"]:
        assert "backendRef" not in ext
        assert all(b["kind"] == "Service" and b["group"] == "" for b in ext["backendRefs"])
        full_duplex = "FullDuplexStreamed" in (ext["processingMode"]["request"]["body"], ext["processingMode"]["response"]["body"])
        assert not (full_duplex and ext.get("failOpen")), "FullDuplexStreamed requires failOpen false"


def test_rbac_is_least_privilege():
    assert not by_kind("ClusterRole") and not by_kind("ClusterRoleBinding")
    (role,) = by_kind("Role")
    rules = {(tuple(r["apiGroups"]), tuple(sorted(r["resources"])), tuple(sorted(r["verbs"]))) for r in role["rules"]}
    assert rules == {
        (("tokenpools.io",), ("tokenentitlements", "tokenpools"), ("get", "list", "watch")),
        (("tokenpools.io",), ("tokenentitlements/status", "tokenpools/status"), ("patch",)),
    }
    crd_plurals = {d["spec"]["names"]["plural"] for d in by_kind("CustomResourceDefinition")}
    assert crd_plurals == {"tokenpools", "tokenentitlements"}


def test_every_container_runs_without_extra_privileges():
    """Ours run as non-root; the vLLM example stays root (its image needs it) but, like every container, can
    neither escalate nor keep a Linux capability, under the runtime's default seccomp profile."""
    deployments = by_kind("Deployment")
    assert deployments
    for d in deployments:
        pod = d["spec"]["template"]["spec"]
        assert pod.get("securityContext", {}).get("seccompProfile") == {"type": "RuntimeDefault"}, d["metadata"]
        for c in pod["containers"]:
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, (d["metadata"]["name"], c["name"])
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], (d["metadata"]["name"], c["name"])
        if not d["metadata"]["name"].startswith("vllm"):
            assert pod["securityContext"].get("runAsNonRoot") is True, d["metadata"]


def test_standalone_envoy_is_rendered_from_the_bootstrap_and_envoy_accepts_it(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("render", K8S / "standalone-envoy" / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    current = (K8S / "standalone-envoy" / "envoy.yaml").read_text()
    assert render.manifest() == current, "stale: run python k8s/standalone-envoy/render.py"
    bootstrap = tmp_path / "envoy.yaml"
    bootstrap.write_text(one("ConfigMap", "envoy-tokenpools")["data"]["envoy.yaml"])
    out = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(bootstrap), "--disable-hot-restart", "-l", "error"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0 and "OK" in out.stdout + out.stderr, out.stdout + out.stderr


def test_crd_schemas_are_structural_enough():
    """Our CRDs: status subresource, printer columns, and every object schema typed."""
    for crd in by_kind("CustomResourceDefinition"):
        (v,) = crd["spec"]["versions"]
        assert v["subresources"] == {"status": {}} and v["served"] and v["storage"]
        assert {"Phase", "Age"} <= {c["name"] for c in v["additionalPrinterColumns"]}

        def walk(s, where):
            if "properties" in s:
                assert s.get("type") == "object", where
                for k, sub in s["properties"].items():
                    assert "type" in sub, f"{where}.{k}"
                    walk(sub, f"{where}.{k}")
            if "items" in s:
                walk(s["items"], f"{where}[]")

        walk(v["schema"]["openAPIV3Schema"], crd["metadata"]["name"])
    assert schemas.crd_schemas()  # loaded without errors
