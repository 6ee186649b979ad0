"""The soak (`tokenpools bench soak`, bench/soak.py) at a size for `make test`: ~2,000 requests through real
Envoy + `tokenpools serve` + the stand-in backend, with every way a request ends (ok, streamed, client aborts
mid-stream and while waiting, upstream 500 / 429 / cut, tokenpools' own 429s, unknown key), then the same end
checks as the full run: 0 in flight, 0 reserved KV, 0 queued, empty live map, engine invariants, no unexpected
outcome, server RSS growth < 10 % from warm-up to end."""

from __future__ import annotations

import time

import pytest

from bench import soak

pytestmark = pytest.mark.integration


def test_soak_short(tmp_path):
    t0 = time.monotonic()
    result = soak.run(requests=2000, minutes=1.5, seed=7, workdir=tmp_path)
    elapsed = time.monotonic() - t0
    summary = {k: result[k] for k in ("checks", "outcomes", "unexpected", "end_books", "requests_per_s")}
    summary["rss"] = {k: v for k, v in result["rss"].items() if k != "samples"}
    assert result["ok"], summary
    assert result["requests"] == 2000
    b = result["end_books"]
    assert b["entitlements_in_flight"] == b["entitlements_reserved_kv_tokens"] == b["pools_queued"] == 0
    assert b["adapter_live_requests"] == 0 and b["invariants_ok"]
    assert result["rss"]["growth_warm_to_end_percent"] < 10
    # Every way of ending happened at least once (the mix is what the soak is for).
    seen = result["outcomes"]
    for outcome in ("200", "aborted_mid_stream", "aborted_waiting", "500", "429:upstream", "401:invalid_api_key", "truncated"):
        assert seen.get(outcome, 0) > 0, (outcome, seen)
    assert any(o.startswith("429:") and o != "429:upstream" for o in seen), seen  # tokenpools' own refusals
    assert result["end_books"]["adapter_stats"]["queued"] > 0  # contention: some requests waited in the queue
    assert elapsed < 90, elapsed
