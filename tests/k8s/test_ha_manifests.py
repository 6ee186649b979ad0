"""The highly available variant (k8s/ha/): validates against the schemas, stays the base Deployment plus the
changes that several replicas need, and its Redis is reachable by tokenpools alone."""

from __future__ import annotations

import copy
from urllib.parse import urlsplit

import pytest

from extproc.state.redis_store import parse_url

from .schemas import K8S, load_all, validate

HA = K8S / "ha"
DOCS = [(p, d) for p in sorted(HA.glob("*.yaml")) for d in load_all(p)]
BASE = {d["metadata"]["name"]: d for d in load_all(K8S / "tokenpools" / "deployment.yaml")}


def one(kind: str, name: str) -> dict:
    (doc,) = [d for _, d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    return copy.deepcopy(doc)


@pytest.mark.parametrize("doc", [d for _, d in DOCS], ids=[f"{p.name}:{d['kind']}/{d['metadata']['name']}" for p, d in DOCS])
def test_ha_manifest_validates(doc):
    validate(doc)
    assert doc["metadata"]["namespace"] == "tokenpools"


def _container(dep: dict) -> dict:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def _arg(c: dict, name: str) -> str:
    (v,) = [a.split("=", 1)[1] for a in c["args"] if a.startswith(f"--{name}=")]
    return v


def test_ha_deployment_is_the_base_plus_shared_state_and_a_rolling_update():
    ha, base = one("Deployment", "tokenpools"), copy.deepcopy(BASE["tokenpools"])
    assert ha["spec"]["replicas"] >= 2
    assert ha["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    pod, c = ha["spec"]["template"]["spec"], _container(ha)
    env = {e["name"]: e.get("value") for e in c["env"]}
    url = env["TOKENPOOLS_STATE"]
    parse_url(url)  # a URL `tokenpools serve --state` accepts
    svc = one("Service", "tokenpools-redis")
    host = urlsplit(url)
    assert host.hostname == f"{svc['metadata']['name']}.tokenpools.svc.cluster.local"
    assert host.port == svc["spec"]["ports"][0]["port"]
    # The drain fits in the grace period, with room for the gRPC stop after it.
    assert float(_arg(c, "drain-seconds")) + 10 <= pod["terminationGracePeriodSeconds"]
    assert pod["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"] == ha["spec"]["selector"]["matchLabels"]
    # Everything else as in the base.
    bc = _container(base)
    assert [a for a in c["args"] if not a.startswith("--drain-seconds=")] == [
        a for a in bc["args"] if not a.startswith("--drain-seconds=")
    ]
    assert [e for e in c["env"] if e["name"] != "TOKENPOOLS_STATE"] == bc["env"]
    for k in ("args", "env"):
        c.pop(k), bc.pop(k)
    for d in (ha, base):
        d["spec"].pop("replicas"), d["spec"].pop("strategy")
        d["spec"]["template"]["spec"].pop("terminationGracePeriodSeconds")
    ha["spec"]["template"]["spec"].pop("topologySpreadConstraints")
    assert ha == base


def test_redis_is_for_tokenpools_only_and_holds_nothing_to_lose():
    redis, svc, pol = one("Deployment", "tokenpools-redis"), one("Service", "tokenpools-redis"), one("NetworkPolicy", "tokenpools-redis")
    labels = redis["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"] == labels and pol["spec"]["podSelector"]["matchLabels"] == labels
    (rule,) = pol["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": BASE["tokenpools"]["spec"]["selector"]["matchLabels"]}}]
    assert [p["port"] for p in rule["ports"]] == [svc["spec"]["ports"][0]["port"]]
    c = _container(redis)
    assert c["args"][:4] == ["--save", "", "--appendonly", "no"]  # leases are soft state: no persistence
    pod = redis["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def test_disruptions_take_one_replica_at_a_time():
    pdb, dep = one("PodDisruptionBudget", "tokenpools"), one("Deployment", "tokenpools")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
