"""GET /metrics of a running TokenpoolsServer after admits, a queue wait and 429s: families, labels, values."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from .driver import Outcome


def samples(out: Outcome, family: str, sample: str | None = None) -> list:
    f = out.families[family]
    return [s for s in f.samples if sample is None or s.name == sample]


def total(out: Outcome, family: str, sample: str, **labels: str) -> float:
    return sum(s.value for s in samples(out, family, sample) if all(s.labels.get(k) == v for k, v in labels.items()))


def test_prometheus_text_format(scraped: Outcome):
    assert scraped.content_type.startswith("text/plain; version=0.0.4")
    assert all(name.startswith("tokenpools_") for name in scraped.families)


def test_decisions_by_result_reason_class_entitlement(scraped: Outcome):
    fam = scraped.families["tokenpools_decisions"]
    assert fam.type == "counter"
    for s in fam.samples:
        assert set(s.labels) == {"result", "reason", "class", "entitlement"}
    d = "tokenpools_decisions_total"
    # Every 429 the clients saw is one reject decision, with its reason.
    assert scraped.statuses == [429, 429, 429]
    assert total(scraped, "tokenpools_decisions", d, result="reject") == 3
    assert total(scraped, "tokenpools_decisions", d, result="reject", entitlement="n", reason="queue_full", **{"class": "spot"}) == 2
    assert total(scraped, "tokenpools_decisions", d, result="reject", entitlement="a", reason="queue_timeout") == 1
    # a: first, hold and (from the queue) waiter admitted; waiter and late queued first.
    assert total(scraped, "tokenpools_decisions", d, result="admit", entitlement="a", reason="none") == 3
    assert total(scraped, "tokenpools_decisions", d, result="queue", entitlement="a") == 2
    assert total(scraped, "tokenpools_decisions", d, result="admit", entitlement="n") == 1
    assert total(scraped, "tokenpools_refusals", "tokenpools_refusals_total", status="429") == 3


def test_reconciled_tokens(scraped: Outcome):
    for fam in ("tokenpools_input_tokens", "tokenpools_output_tokens"):
        for s in samples(scraped, fam):
            assert set(s.labels) == {"class", "entitlement"}
    # The backend's usage numbers: 9+5+7 in, 2+1+3 out (n's request was cancelled: nothing to reconcile).
    assert total(scraped, "tokenpools_input_tokens", "tokenpools_input_tokens_total", entitlement="a") == 21
    assert total(scraped, "tokenpools_output_tokens", "tokenpools_output_tokens_total", entitlement="a", **{"class": "guaranteed"}) == 6
    assert total(scraped, "tokenpools_input_tokens", "tokenpools_input_tokens_total", entitlement="n") == 0


def test_histograms(scraped: Outcome):
    lat = scraped.families["tokenpools_decision_latency_seconds"]
    assert lat.type == "histogram"
    # 7 requests reached the engine at admission (4 for a, 3 for n); each took well under a second.
    assert total(scraped, lat.name, lat.name + "_count") == 7
    assert 0 < total(scraped, lat.name, lat.name + "_sum") < 1
    assert total(scraped, lat.name, lat.name + "_bucket", le="0.1") == 7

    qw = "tokenpools_queue_wait_seconds"
    assert scraped.families[qw].type == "histogram"
    assert total(scraped, qw, qw + "_count", result="admit", **{"class": "guaranteed"}) == 1
    assert total(scraped, qw, qw + "_count", result="reject") == 1
    # The timed-out one waited its queue deadline (1 s); the admitted one at least the 0.05 s we held it.
    rejected = total(scraped, qw, qw + "_sum", result="reject")
    assert 0.95 < rejected < 4.0
    assert 0.04 < total(scraped, qw, qw + "_sum", result="admit") < rejected
    assert total(scraped, qw, qw + "_bucket", result="reject", le="0.5") == 0

    er = "tokenpools_estimate_ratio"
    assert total(scraped, er, er + "_count", model="m-p") == 3  # the three finished requests with usage
    assert total(scraped, er, er + "_sum", model="m-p") > 0


def test_pool_gauges(scraped: Outcome):
    cap = {(s.labels["pool"], s.labels["dimension"]): s.value for s in samples(scraped, "tokenpools_pool_capacity")}
    assert cap[("p", "concurrency")] == 1 and cap[("noq", "kv_cache_tokens")] == 100000
    assert {d for _, d in cap} == {"tokens_per_second", "kv_cache_tokens", "concurrency"}
    used = {(s.labels["pool"], s.labels["dimension"]): s.value for s in samples(scraped, "tokenpools_pool_used")}
    assert set(used) == set(cap) and used[("p", "concurrency")] == 0  # everything ended before the scrape
    assert {s.labels["pool"]: s.value for s in samples(scraped, "tokenpools_pool_replicas")} == {"p": 1, "noq": 1}
    desired = {s.labels["pool"]: s.value for s in samples(scraped, "tokenpools_desired_replicas")}
    assert set(desired) == {"p", "noq"} and all(v >= 1 for v in desired.values())
    for fam in ("tokenpools_pool_in_flight", "tokenpools_pool_queued"):
        assert {s.labels["pool"]: s.value for s in samples(scraped, fam)} == {"p": 0, "noq": 0}


def test_entitlement_gauges(scraped: Outcome):
    for fam in ("tokenpools_entitlement_debt", "tokenpools_entitlement_weight", "tokenpools_entitlement_burst",
                "tokenpools_entitlement_in_flight", "tokenpools_entitlement_queued"):  # fmt: skip
        got = {s.labels["entitlement"]: s for s in samples(scraped, fam)}
        assert set(got) == {"a", "n"}, fam
        assert got["a"].labels == {"entitlement": "a", "class": "guaranteed", "pool": "p"}
    weight = {s.labels["entitlement"]: s.value for s in samples(scraped, "tokenpools_entitlement_weight")}
    assert weight["a"] > weight["n"] > 0  # guaranteed outranks spot


def test_concurrent_scrapes_agree(scraped: Outcome):
    def counters(text: str) -> dict:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            if f.type in ("counter", "histogram")
            for s in f.samples
        }

    first = counters(scraped.text)
    assert first and all(counters(text) == first for text in scraped.concurrent)
