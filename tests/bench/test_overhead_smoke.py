"""Smoke test of the overhead benchmark's machinery (backend, server, the echo ext_proc, Envoys, load generator, probes):
tiny load, every phase runs and reports; no performance assertions (those live in bench/ output)."""

from __future__ import annotations

from bench.overhead import run, summarise_profile


def test_overhead_machinery_runs_end_to_end():
    r = run(duration=0.5, warmup=0.2, rounds=1, concurrency=4, tokens=3, interval_ms=5, rps_concurrency=2,
            rss_sizes=(10,), queued=1000, quick=True)
    s = r["summary"]
    assert set(s["stream"]) >= {"direct", "tokenpools", "tokenpools_no_response_body", "echo_ext_proc"}
    for phase in ("stream", "stream_short", "rps"):
        for path in s[phase]:
            assert s[phase][path]["requests_per_s"] > 0, (phase, path)
            assert s[phase][path]["non_2xx"] == 0, (phase, path, r["runs"][phase][path])
    assert s["stream"]["tokenpools"]["inter_chunk_ms_p50"] is not None
    assert s["added"]["ttft_ms_p50"] is not None
    assert s["added_no_response_body"]["inter_token_ms_p99"] is not None
    assert s["added_echo_ext_proc"]["ttft_ms_p50"] is not None  # the grpc.aio floor, beside tokenpools
    assert s["echo_ext_proc_rps"]["requests_per_s"] > 0 and s["echo_ext_proc_rps"]["cpu_us_per_request"] > 0
    assert s["server_cpu_us"]["per_request_non_streaming"] > 0
    assert "main" in s["server_threads_cpu_fraction"]["rps"]
    assert r["rss_kib_by_entitlements"]["10"] > 10_000
    assert r["queue"]["1000"]["still_queued"] == 1000
    assert set(r["verdicts"]) >= {"added_ttft_p50", "added_inter_token_p99", "queued_100k"}


def test_profile_summary(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("main (a.py:1);f (b.py:2) 3\nmain (a.py:1);g (c.py:3) 1\n")
    out = summarise_profile(p)
    assert out["samples"] == 4
    assert out["self_pct"][0] == ["f (b.py:2)", 75.0]
