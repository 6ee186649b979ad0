"""The entitlement label is bounded: beyond N distinct names (or outside an allow list) it becomes `other`."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.config import load_text
from extproc.engine import Engine
from extproc.envoy.service import Exchange, Gateway
from extproc.telemetry import OTHER, EntitlementLabels
from extproc.telemetry.metrics import Metrics, TelemetryOptions
from tests.envoy.extproc_msgs import chat, request_body, request_headers

N_ENTS = 6


def config() -> str:
    docs = ["""
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {name: big}
spec:
  model: m
  perReplica: {tokensPerSecond: 1000000, concurrency: 100, kvCacheTokens: 1000000}
"""]
    for i in range(N_ENTS):
        docs.append(f"""
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {{name: e{i}, labels: {{tokenpools.io/demo: "true"}}}}
spec:
  tenantId: t{i}
  poolRef: {{name: big}}
  qos: {{serviceClass: spot}}
  burst: {{concurrency: 10}}
  auth: {{apiKeys: [k{i}]}}
""")
    return "---".join(docs)


def test_first_n_seen_then_other():
    labels = EntitlementLabels(2)
    assert [labels(n) for n in ("b", "a", "c", "b", "d", "a")] == ["b", "a", OTHER, "b", OTHER, "a"]
    assert labels("other") == OTHER


def test_allow_list():
    labels = EntitlementLabels(1, allow=["x", "z"])
    assert [labels(n) for n in ("y", "z", "x", "w")] == [OTHER, "z", "x", OTHER]


def test_zero_means_all_other_and_negative_is_refused():
    assert EntitlementLabels(0)("a") == OTHER
    with pytest.raises(ValueError):
        EntitlementLabels(-1)


def test_the_memory_of_names_is_bounded():
    labels = EntitlementLabels(1)
    for i in range(100_000):
        labels(f"n{i}")
    assert len(labels._known) <= 4 * 1 + 1024


def scrape(options: TelemetryOptions, order: list[int]) -> dict:
    """Requests from entitlements e{i} in `order`, through the adapter, then the Prometheus text parsed."""
    cfg = load_text(config())
    engine = Engine(cfg, 1000.0)
    recorder = options.recorder()
    gw = Gateway(engine, cfg, clock=lambda: 1000.0, telemetry=recorder)
    metrics = Metrics(recorder, engine, clock=lambda: 1000.0, options=options)

    async def drive():
        for i in order:
            ex = Exchange(gw, asyncio.Queue())
            ex.handle(request_headers(f"k{i}"))
            ex.handle(request_body(chat(model="m", max_tokens=2)))
            assert ex.admitted

    try:
        asyncio.run(drive())
        return {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    finally:
        metrics.provider.shutdown()


def label_values(families: dict, family: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in families[family].samples:
        out[s.labels["entitlement"]] = out.get(s.labels["entitlement"], 0) + s.value
    return out


def test_decisions_and_gauges_keep_n_names():
    fams = scrape(TelemetryOptions(max_entitlements=2), [3, 1, 3, 0, 5, 4, 2, 1])
    # The first two seen (e3, e1) keep their names; the other four share `other`.
    assert label_values(fams, "tokenpools_decisions") == {"e3": 2, "e1": 2, OTHER: 4}
    assert label_values(fams, "tokenpools_entitlement_in_flight") == {"e3": 2, "e1": 2, OTHER: 4}
    # Debt/weight/burst do not add up across entitlements: `other` has none.
    assert set(label_values(fams, "tokenpools_entitlement_weight")) == {"e3", "e1"}


def test_allow_list_in_metrics():
    fams = scrape(TelemetryOptions(max_entitlements=100, entitlements=("e5",)), [0, 5, 1])
    assert label_values(fams, "tokenpools_decisions") == {"e5": 1, OTHER: 2}
    assert label_values(fams, "tokenpools_entitlement_queued") == {"e5": 0, OTHER: 0}


def test_default_bound_is_100():
    assert TelemetryOptions().max_entitlements == 100
    fams = scrape(TelemetryOptions(), list(range(N_ENTS)))
    assert set(label_values(fams, "tokenpools_decisions")) == {f"e{i}" for i in range(N_ENTS)}


def test_histogram_buckets_are_inclusive_upper_bounds():
    from extproc.telemetry.histogram import Histogram

    h = Histogram((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 2.0, 3.0):
        h.observe(v)
    assert h.counts == [2, 2, 1] and h.count == 5 and h.sum == 8.0 and (h.min, h.max) == (0.5, 3.0)
