"""The TLS variant (k8s/tls/): validates against the schemas, and stays the base manifests plus TLS only."""

from __future__ import annotations

import copy

import pytest

from .schemas import K8S, load_all, validate

TLS = K8S / "tls"
OVERLAY = [(p, d) for p in sorted(TLS.glob("*.yaml")) for d in load_all(p)]
BASE = {(d["kind"], d["metadata"]["name"]): d for p in sorted(K8S.rglob("*.yaml"))
        if not {TLS, K8S / "ha", K8S / "schemas"} & set(p.parents) for d in load_all(p)}  # fmt: skip


def one(kind: str) -> dict:
    (doc,) = [d for _, d in OVERLAY if d["kind"] == kind]
    return copy.deepcopy(doc)


@pytest.mark.parametrize("doc", [d for _, d in OVERLAY], ids=[f"{p.name}:{d['kind']}" for p, d in OVERLAY])
def test_tls_manifest_validates(doc):
    validate(doc)
    assert doc["metadata"]["namespace"] == "tokenpools"


def test_tls_deployment_is_the_base_plus_tls():
    tls, base = one("Deployment"), copy.deepcopy(BASE[("Deployment", "tokenpools")])
    c = tls["spec"]["template"]["spec"]["containers"][0]
    args = c["args"]
    assert {"--tls-cert=/etc/tokenpools/tls/tls.crt", "--tls-key=/etc/tokenpools/tls/tls.key",
            "--tls-client-ca=/etc/tokenpools/tls/ca.crt"} <= set(args)  # fmt: skip  (mutual TLS)
    assert c["volumeMounts"] == [{"name": "tls", "mountPath": "/etc/tokenpools/tls", "readOnly": True}]
    (vol,) = tls["spec"]["template"]["spec"]["volumes"]
    assert vol["name"] == "tls" and vol["secret"]["secretName"] == "tokenpools-tls"
    assert "grpc" not in c["readinessProbe"] and c["readinessProbe"]["httpGet"]["path"] == "/healthz"  # kubelet: no gRPC TLS
    # Everything else as in the base.
    bc = base["spec"]["template"]["spec"]["containers"][0]
    assert [a for a in args if not a.startswith("--tls-")] == bc["args"]
    for k in ("args", "volumeMounts", "readinessProbe"):
        c.pop(k, None)
        bc.pop(k, None)
    tls["spec"]["template"]["spec"].pop("volumes")
    assert tls == base


def test_keda_uses_the_trigger_authentication_with_ca_and_client_certificate():
    so, auth = one("ScaledObject"), one("TriggerAuthentication")
    base = BASE[("ScaledObject", so["metadata"]["name"])]
    (trig,) = so["spec"]["triggers"]
    ref = trig.pop("authenticationRef")
    assert ref == {"name": auth["metadata"]["name"], "kind": "TriggerAuthentication"}
    assert so == base  # the same trigger otherwise
    params = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert set(params) == {"caCert", "tlsClientCert", "tlsClientKey"}  # KEDA external-push auth parameters
    assert len({name for name, _ in params.values()}) == 1  # one Secret
