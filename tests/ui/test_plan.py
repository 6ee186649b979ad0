"""`tokenpools plan`: a tiny what-if gives plausible numbers, and bad workloads fail with the field named."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from extproc.ui.plan import load_workload, plan, plan_command

# One 8-slot pool; a guaranteed tenant within its baseline and a spot tenant with the same SLO that asks for
# three times what is left.
CONFIG = """
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {name: small}
spec:
  model: m
  replicas: {min: 1, max: 2, current: 1}
  perReplica: {tokensPerSecond: 300, concurrency: 8, kvCacheTokens: 65536}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: gold}
spec:
  tenantId: t-gold
  poolRef: {name: small}
  qos: {serviceClass: guaranteed, sloTargetMs: 1000}
  resources: {concurrency: 4}
  defaults: {maxTokens: 64}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: cheap}
spec:
  tenantId: t-cheap
  poolRef: {name: small}
  qos: {serviceClass: spot, sloTargetMs: 1000}
  burst: {concurrency: 8}
  defaults: {maxTokens: 64}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: idle}
spec:
  tenantId: t-idle
  poolRef: {name: small}
  qos: {serviceClass: elastic}
  resources: {concurrency: 1}
"""

WORKLOAD = """
duration: 20
seed: 3
pools:
  small: {profile: paper-spark}
tenants:
  gold: {users: 3, prompt: 64, output: 64}
  cheap: {users: 12, prompt: [32, 96], output: 64}
"""


def _files(tmp_path: Path, workload: str = WORKLOAD) -> tuple[Path, Path]:
    (tmp_path / "c.yaml").write_text(CONFIG)
    (tmp_path / "w.yaml").write_text(workload)
    return tmp_path / "c.yaml", tmp_path / "w.yaml"


def test_plan_guaranteed_within_baseline_beats_oversubscribed_spot(tmp_path):
    cfg, wl = _files(tmp_path)
    doc = plan(cfg, load_workload(wl))
    gold, cheap = doc["entitlements"]["gold"], doc["entitlements"]["cheap"]
    assert list(doc["entitlements"]) == ["gold", "cheap"]  # by class; "idle" sends nothing and is not listed
    assert gold["class"] == "guaranteed" and cheap["class"] == "spot"
    assert gold["slo_attainment"] >= 0.95 and gold["rejected"] == 0 and gold["unserved"] == 0
    assert cheap["slo_attainment"] < gold["slo_attainment"] - 0.2
    assert cheap["rejected"] > 0
    # closed loop of 3 users, each request ~64 decode steps of the paper-spark profile (62 ms min): ~4 s each.
    assert 8 <= gold["requests"] <= 40 and gold["admitted"] == gold["requests"]
    assert gold["p50_ttft_s"] <= gold["p99_ttft_s"] < 1.0
    assert 2.0 <= gold["mean_in_flight"] <= 3.01
    util = doc["pools"]["small"]["utilization"]
    assert 0.5 < util["concurrency"] <= 1.0 and 0 < util["throughput"] and 0 <= util["kv_cache"] <= 1
    assert doc["pools"]["small"]["replicas"] == 1


def test_plan_without_admission_control_lets_spot_hurt_guaranteed(tmp_path):
    cfg, wl = _files(tmp_path)
    ours = plan(cfg, load_workload(wl))["entitlements"]["gold"]
    none = plan(cfg, load_workload(wl), policy="none")["entitlements"]["gold"]
    assert none["p99_ttft_s"] > 2 * ours["p99_ttft_s"]


def test_plan_cli_json_and_table(tmp_path):
    cfg, wl = _files(tmp_path)
    res = CliRunner().invoke(plan_command, [str(cfg), str(wl), "--json", "--duration", "10"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["duration_s"] == 10 and set(doc["entitlements"]) == {"gold", "cheap"}
    res = CliRunner().invoke(plan_command, [str(cfg), str(wl), "--duration", "10", "--width", "160"], catch_exceptions=False)
    assert res.exit_code == 0 and "SLO met" in res.output and "gold" in res.output and "small" in res.output


def test_the_example_workload_runs_against_the_demo_config():
    root = Path(__file__).resolve().parents[2]
    res = CliRunner().invoke(plan_command, [str(root / "extproc/examples/exp1.yaml"),
                                            str(root / "extproc/ui/examples/plan-workload.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    assert set(json.loads(res.output)["entitlements"]) == {"guaranteed-a", "guaranteed-c", "spot-b"}


def test_workload_errors_name_the_field(tmp_path):
    cases = {
        "tenants: {nobody: {users: 1}}": "no such entitlement",
        "tenants: {gold: {users: 1, rate: 2}}": "either rate",
        "tenants: {gold: {users: 0}}": "$.tenants.gold.users",
        "tenants: {gold: {rate: 1, prompt: [9, 3]}}": "$.tenants.gold.prompt",
        "tenants: {gold: {rate: 1, colour: red}}": "unknown field(s) colour",
        "duration: 10\ntenants: {gold: {rate: 1, start: 12}}": "end (10) must be after start (12)",
        "pools: {nowhere: {replicas: 1}}\ntenants: {gold: {rate: 1}}": "no such pool",
    }
    for text, expected in cases.items():
        cfg, wl = _files(tmp_path, text)
        res = CliRunner().invoke(plan_command, [str(cfg), str(wl)])
        assert res.exit_code == 1 and expected in res.output, (text, res.output)


def test_plan_runs_each_pool_and_a_pool_at_zero_replicas_needs_a_count(tmp_path):
    from tests.envoy.extproc_msgs import CONFIG as MULTI

    (tmp_path / "c.yaml").write_text(MULTI)
    (tmp_path / "w.yaml").write_text("duration: 8\npools: {zero: {replicas: 1}}\ntenants: {g1: {users: 1}, zg: {users: 1}, zs: {users: 4}}\n")
    doc = plan(tmp_path / "c.yaml", load_workload(tmp_path / "w.yaml"))
    assert set(doc["pools"]) == {"one", "zero"} and doc["pools"]["zero"]["replicas"] == 1
    assert [(e["pool"], n) for n, e in doc["entitlements"].items()] == [("one", "g1"), ("zero", "zg"), ("zero", "zs")]
    assert doc["entitlements"]["zg"]["admitted"] > 0 and doc["entitlements"]["zs"]["rejected"] > 0
    (tmp_path / "w.yaml").write_text("duration: 8\ntenants: {zg: {users: 1}}\n")
    res = CliRunner().invoke(plan_command, [str(tmp_path / "c.yaml"), str(tmp_path / "w.yaml")])
    assert res.exit_code == 1 and "set pools.zero.replicas" in res.output
