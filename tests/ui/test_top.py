"""`tokenpools top`: the rows it computes (unit), and --once / --json against a live server with traffic."""

from __future__ import annotations

import asyncio
import json
import socket

from click.testing import CliRunner

from extproc.ui.top import top_command
from extproc.ui.view import Poll, num, rows

from .conftest import with_busy_server


def _ent(pool, cls, admitted, rejected, reasons):
    return {"tenant": "t", "pool": pool, "class": cls, "state": "Bound", "used": {}, "baseline": {}, "ceiling": {},
            "weight": 1.0, "debt": 0.0, "burst": 0.0, "queued": 0, "in_flight": 0, "admitted_total": admitted,
            "rejected_total": rejected, "rejected_by_reason": reasons}


def _status(ents):
    pools = {p: {"model": "m", "replicas": 1, "capacity": {}, "used": {}, "queued": 0, "in_flight": 0}
             for p in {e["pool"] for e in ents.values()}}
    return {"pools": pools, "entitlements": ents}


def test_rates_are_counter_deltas_over_the_poll_interval_and_rows_sort_by_pool_then_class():
    before = _status({"s": _ent("p1", "spot", 10, 4, {"pool_contended": 4}),
                      "g": _ent("p1", "guaranteed", 100, 0, {}),
                      "d": _ent("p0", "dedicated", 0, 0, {})})
    after = _status({"s": _ent("p1", "spot", 14, 10, {"pool_contended": 6, "queue_full": 4}),
                     "g": _ent("p1", "guaranteed", 108, 0, {}),
                     "d": _ent("p0", "dedicated", 0, 0, {}),
                     "new": _ent("p1", "elastic", 5, 1, {"over_throughput": 1})})
    view = rows(Poll(12.0, after, {"pools": {"p1": {"desiredReplicas": 3}}}), Poll(10.0, before, None))
    assert view["interval_s"] == 2.0
    assert [(e["pool"], e["entitlement"]) for e in view["entitlements"]] == [
        ("p0", "d"), ("p1", "g"), ("p1", "new"), ("p1", "s")]
    by = {e["entitlement"]: e for e in view["entitlements"]}
    assert by["g"]["admitted_per_s"] == 4.0 and by["g"]["rejected_per_s"] == 0.0
    assert by["s"]["admitted_per_s"] == 2.0 and by["s"]["rejected_per_s"] == 3.0
    assert by["s"]["rejected_per_s_by_reason"] == {"pool_contended": 1.0, "queue_full": 2.0}
    assert by["new"]["admitted_per_s"] is None  # not in the previous poll: no rate yet
    pools = {p["pool"]: p for p in view["pools"]}
    assert pools["p1"]["desired_replicas"] == 3 and pools["p0"]["desired_replicas"] is None
    assert pools["p1"]["admitted_per_s"] == 6.0 and pools["p1"]["rejected_per_s"] == 3.0
    # The first poll has no rates at all.
    assert all(e["admitted_per_s"] is None for e in rows(Poll(0, after, None))["entitlements"])


def test_shadow_would_be_refusals_show_as_rates_of_their_own():
    ent = _ent("p", "spot", 10, 0, {})
    before = _status({"s": {**ent, "shadow": True, "shadow_would": {"queue": 1, "reject": 2, "by_reason": {"over_concurrency": 1, "pool_contended": 2}}}})
    after = _status({"s": {**ent, "shadow": True, "shadow_would": {"queue": 5, "reject": 2, "by_reason": {"over_concurrency": 5, "pool_contended": 2}}}})
    (s,) = rows(Poll(2.0, after, None), Poll(0.0, before, None))["entitlements"]
    assert s["shadow"] and s["rejected_per_s"] == 0.0
    assert s["rejected_per_s_by_reason"] == {"would over_concurrency": 2.0}


def test_num_is_compact():
    assert [num(x) for x in (None, 7, 12.5, 0.25, 3200, 32768, 1_500_000)] == ["-", "7", "12.5", "0.25", "3.2k", "33k", "1.5M"]


def _invoke(*args):
    return CliRunner().invoke(top_command, list(args), catch_exceptions=False)


def test_top_once_against_a_live_server_with_traffic():
    async def body(server):
        url = f"http://127.0.0.1:{server.status_port}"
        as_json = await asyncio.to_thread(_invoke, "--url", url, "--once", "--json", "--interval", "1")
        table = await asyncio.to_thread(_invoke, "--url", url, "--once", "--interval", "1", "--width", "200")
        return as_json, table

    as_json, table = asyncio.run(with_busy_server(body))
    assert as_json.exit_code == 0, as_json.output
    view = json.loads(as_json.output)
    assert 0.9 < view["interval_s"] < 3
    (pool,) = view["pools"]
    assert pool["pool"] == "paper-spark" and pool["replicas"] == 1 and pool["desired_replicas"] is not None
    assert pool["capacity"]["concurrency"] == 16 and 0 < pool["used"]["concurrency"] <= 16
    ents = {e["entitlement"]: e for e in view["entitlements"]}
    assert [e["entitlement"] for e in view["entitlements"]] == ["guaranteed-a", "guaranteed-c", "spot-b"]
    assert ents["guaranteed-a"]["admitted_per_s"] > 0 and ents["guaranteed-a"]["rejected_per_s"] == 0
    assert ents["spot-b"]["rejected_per_s"] > 0
    assert sum(ents["spot-b"]["rejected_per_s_by_reason"].values()) > 0
    assert ents["guaranteed-a"]["baseline"]["concurrency"] == 6

    assert table.exit_code == 0, table.output
    out = table.output
    for word in ("paper-spark", "guaranteed-a", "guaranteed-c", "spot-b", "guaranteed", "Bound", "rates over the last"):
        assert word in out, (word, out)
    assert any(r in out for r in ("pool_contended", "over_concurrency", "queue_full", "queue_timeout")), out
    assert out.index("guaranteed-a") < out.index("guaranteed-c") < out.index("spot-b")


def test_top_says_clearly_when_the_server_is_not_there():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        result = CliRunner().invoke(top_command, ["--url", f"http://127.0.0.1:{port}", "--once"])
    assert result.exit_code == 1
    assert "cannot reach the tokenpools status server" in result.output and "tokenpools serve" in result.output


def test_narrow_terminals_get_the_short_set_of_columns():
    from rich.console import Console

    from extproc.ui.top import tables

    before = _status({"s": _ent("p1", "spot", 10, 4, {"pool_contended": 4})})
    after = _status({"s": _ent("p1", "spot", 12, 8, {"pool_contended": 8})})
    view = rows(Poll(1.0, after, None), Poll(0.0, before, None))
    text = {}
    for width in (80, 140):
        console = Console(width=width, record=True, file=open("/dev/null", "w"))
        console.print(tables(view, "http://x", width))
        text[width] = console.export_text()
    assert "weight" in text[140] and "weight" not in text[80] and "KV" not in text[80]
    assert all("spot" in t and "4.0" in t for t in text.values())  # rejected/s = (8 - 4) / 1 s
