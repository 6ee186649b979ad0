"""k8s/grafana/tokenpools-dashboard.json: well formed, and every query names only series the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from .driver import Outcome

DASHBOARD = Path(__file__).resolve().parents[2] / "k8s" / "grafana" / "tokenpools-dashboard.json"
NAME = re.compile(r"\btokenpools_[a-zA-Z0-9_]+")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out += p.get("panels", [])  # collapsed rows hold their panels
    return out


def queries(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in all_panels(dashboard) for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_structure(dashboard: dict):
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids))
    for p in all_panels(dashboard):
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")") and t["expr"].count("{") == t["expr"].count("}")
            if "histogram_quantile" in t["expr"]:
                assert "_bucket" in t["expr"] and re.search(r"by \([^)]*\ble\b", t["expr"]), t["expr"]


def test_queries_use_only_exported_series(dashboard: dict, scraped: Outcome):
    exported = {s.name for f in scraped.families.values() for s in f.samples}
    used = {name for expr in queries(dashboard) for name in NAME.findall(expr)}
    assert used, "no tokenpools series in the dashboard?"
    assert used <= exported, f"not exported by the server: {sorted(used - exported)}"


def test_covers_the_families(dashboard: dict):
    used = {name for expr in queries(dashboard) for name in NAME.findall(expr)}
    wanted = {
        "tokenpools_decisions_total", "tokenpools_queue_wait_seconds_bucket", "tokenpools_decision_latency_seconds_bucket",
        "tokenpools_input_tokens_total", "tokenpools_output_tokens_total", "tokenpools_pool_capacity", "tokenpools_pool_used",
        "tokenpools_entitlement_debt", "tokenpools_entitlement_weight", "tokenpools_entitlement_burst",
        "tokenpools_desired_replicas", "tokenpools_pool_replicas", "tokenpools_pool_in_flight", "tokenpools_pool_queued",
    }  # fmt: skip
    assert wanted <= used, sorted(wanted - used)
    dims = {m.group(1) for expr in queries(dashboard) for m in re.finditer(r'dimension="(\w+)"', expr)}
    assert dims == {"tokens_per_second", "kv_cache_tokens", "concurrency"}
