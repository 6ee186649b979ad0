"""Calibration of the simulator's profiles against DESIGN.md §5, plus the HTTP server's throughput.

    python bench/calibrate.py            # everything, JSON on stdout (~1 min on 2 cores)
    python bench/calibrate.py --no-http  # virtual-time parts only (seconds)

Method for the H100 reference numbers: "C concurrent ShareGPT prompts" is read as vLLM's
benchmark_serving with C prompts sent at once (request rate inf): output tok/s = all output tokens /
time until the last one finishes; TTFT and TPOT are per-request means ((e2e - ttft) / (out - 1)).
Under that method the references agree with each other; under a steady closed loop they cannot
(10 clients at TPOT 7.6 ms would make ~1,300 tok/s, not 350, by Little's law). Each level is averaged
over several seeds. The steady closed loop (each client sends its next request when one finishes) is
reported too, as the capacity a pool of these replicas has under sustained load.

Workload ("ShareGPT-like", seeded): prompt = lognormal(median 77, sigma 1.4), mean ~205; output =
min(1024, lognormal(sigma 1.3)) with the median chosen so the mean is 200 (the cap stands for a
client max_tokens and bounds the drain tail); prompt + output <= max_model_len.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extproc.sim.driver import Arrival, run_virtual  # noqa: E402
from extproc.sim.profiles import Profile, get_profile  # noqa: E402
from extproc.sim.scheduler import Request, Scheduler  # noqa: E402

PROMPT_MEDIAN, PROMPT_SIGMA = 77.0, 1.4
OUTPUT_MEAN, OUTPUT_SIGMA, OUTPUT_CAP = 200.0, 1.3, 1024
LEVELS = (1, 10, 40, 80, 160, 320)
REFERENCE = {  # DESIGN.md §5, H100 Llama-3-8B, ShareGPT
    10: {"output_tok_s": 350.0, "tpot_s": 0.0076, "ttft_s": 0.060},
    320: {"output_tok_s": 6000.0, "tpot_s": 0.020},
}
SPARK_REFERENCE = {"concurrency": 16, "prompt": 64, "output": 64, "output_tok_s": 240.0}


# -- workload ------------------------------------------------------------------------------------
def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def capped_lognormal_mean(mu: float, sigma: float, cap: float) -> float:
    """E[min(cap, X)] for X ~ lognormal(mu, sigma)."""
    z = (math.log(cap) - mu) / sigma
    return math.exp(mu + sigma * sigma / 2) * _phi(z - sigma) + cap * (1.0 - _phi(z))


def output_mu() -> float:
    lo, hi = 0.0, 10.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if capped_lognormal_mean(mid, OUTPUT_SIGMA, OUTPUT_CAP) < OUTPUT_MEAN else (lo, mid)
    return (lo + hi) / 2


def sharegpt_like(rng: random.Random, n: int, max_model_len: int, mu_out: float) -> list[tuple[int, int]]:
    out = []
    while len(out) < n:
        p = max(1, round(rng.lognormvariate(math.log(PROMPT_MEDIAN), PROMPT_SIGMA)))
        o = max(1, min(OUTPUT_CAP, round(rng.lognormvariate(mu_out, OUTPUT_SIGMA))))
        if p + o <= max_model_len:
            out.append((p, o))
    return out


# -- virtual-time experiments ----------------------------------------------------------------------
def summarize(done: list[Request], tokens_s: float) -> dict[str, float | None]:
    tpots = [q.tpot for q in done if q.tpot is not None]  # needs >= 2 output tokens
    return {"output_tok_s": tokens_s, "ttft_s": statistics.fmean(q.ttft for q in done),  # type: ignore[misc]
            "tpot_s": statistics.fmean(tpots) if tpots else None, "requests": len(done)}


def burst(profile: Profile, lengths: list[tuple[int, int]]) -> dict[str, float]:
    """All requests at t=0; throughput over the makespan (vLLM benchmark_serving, rate inf)."""
    s = Scheduler(profile)
    done, end = run_virtual(s, [Arrival(0.0, f"r{i}", p, o) for i, (p, o) in enumerate(lengths)])
    out = summarize(done, sum(q.generated for q in done) / end)
    out["preemptions"] = s.num_preemptions_total
    return out


def closed_loop(profile: Profile, concurrency: int, next_lengths, duration: float, warmup: float) -> dict[str, float]:
    """`concurrency` clients, each sending its next request as soon as one finishes; measured after warmup."""
    s = Scheduler(profile)
    counter = [0]
    emitted_in_window = [0]

    def arrival(t: float) -> Arrival:
        counter[0] += 1
        p, o = next_lengths()
        return Arrival(t, f"r{counter[0]}", p, o)

    def on_step(r) -> None:
        if warmup <= r.end <= duration:
            emitted_in_window[0] += len(r.emitted)

    def again(q: Request) -> list[Arrival]:
        return [arrival(q.finished)] if q.finished < duration else []  # type: ignore[arg-type,operator]

    done, _ = run_virtual(s, [arrival(0.0) for _ in range(concurrency)], on_finish=again, on_step=on_step)
    window = [q for q in done if q.arrival >= warmup and q.finished <= duration]  # type: ignore[operator]
    out = summarize(window, emitted_in_window[0] / (duration - warmup))
    out["preemptions"] = s.num_preemptions_total
    return out


def mean_of(runs: list[dict[str, float | None]]) -> dict[str, float]:
    return {k: statistics.fmean(r[k] for r in runs if r[k] is not None) for k in runs[0]}  # type: ignore[misc]


def h100_sweep(profile: Profile, levels: tuple[int, ...], steady_s: float) -> dict[str, object]:
    mu = output_mu()
    rows = []
    for c in levels:
        seeds = max(8, 640 // c)
        b = mean_of([burst(profile, sharegpt_like(random.Random(seed), c, profile.max_model_len, mu))
                     for seed in range(seeds)])
        rng = random.Random(1000 + c)
        st = closed_loop(profile, c, lambda: sharegpt_like(rng, 1, profile.max_model_len, mu)[0],
                         duration=steady_s, warmup=min(30.0, steady_s / 5))
        row: dict[str, object] = {"concurrency": c, "seeds": seeds, "burst": _round(b), "steady_closed_loop": _round(st)}
        if c in REFERENCE:
            ref = REFERENCE[c]
            row["reference"] = ref
            row["ratio_burst_to_reference"] = {k: round(b[k] / v, 3) for k, v in ref.items()}
        rows.append(row)
    sample = sharegpt_like(random.Random(0), 20000, profile.max_model_len, mu)
    ins, outs = [p for p, _ in sample], [o for _, o in sample]
    workload = {
        "prompt": f"lognormal(median {PROMPT_MEDIAN}, sigma {PROMPT_SIGMA})",
        "output": f"min({OUTPUT_CAP}, lognormal(mu {mu:.3f}, sigma {OUTPUT_SIGMA}))",
        "sampled_prompt_mean": round(statistics.fmean(ins), 1), "sampled_prompt_median": statistics.median(ins),
        "sampled_output_mean": round(statistics.fmean(outs), 1), "sampled_output_median": statistics.median(outs),
    }
    ratios = [v for r in rows for v in r.get("ratio_burst_to_reference", {}).values()]  # type: ignore[union-attr]
    return {"workload": workload, "levels": rows, "all_within_20pct": all(0.8 <= x <= 1.2 for x in ratios),
            "max_abs_deviation": round(max(abs(x - 1) for x in ratios), 3)}


def spark(profile: Profile) -> dict[str, object]:
    ref = SPARK_REFERENCE
    lengths = [(ref["prompt"], ref["output"])] * ref["concurrency"]
    b = burst(profile, lengths)
    st = closed_loop(profile, ref["concurrency"], lambda: (ref["prompt"], ref["output"]), duration=300.0, warmup=30.0)
    return {"reference": ref, "burst": _round(b), "steady_closed_loop": _round(st),
            "ratio_steady_to_reference": round(st["output_tok_s"] / ref["output_tok_s"], 3),
            "ratio_burst_to_reference": round(b["output_tok_s"] / ref["output_tok_s"], 3)}


def _round(d: dict) -> dict:
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in d.items()}


# -- HTTP: SSE chunks per second of one server process ------------------------------------------------
async def load_client(url: str, streams: int, seconds: float, max_tokens: int) -> dict[str, float]:
    """Keep `streams` streaming chat requests open for `seconds`; count SSE chunks received."""
    import aiohttp

    chunks = requests = 0
    body = {"messages": [{"role": "user", "content": "calibrate " * 16}], "max_tokens": max_tokens, "stream": True}
    deadline = time.perf_counter() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal chunks, requests
        while time.perf_counter() < deadline:
            async with session.post(url + "/v1/chat/completions", json=body) as resp:
                async for data in resp.content.iter_any():
                    chunks += data.count(b"data: ")
            requests += 1

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(streams)))
        elapsed = time.perf_counter() - start
    # Each request also carries a role chunk and [DONE] besides its token chunks.
    return {"streams": streams, "elapsed_s": elapsed, "requests": requests, "sse_chunks": chunks,
            "sse_chunks_per_s": chunks / elapsed, "output_tokens_per_s": requests * max_tokens / elapsed}


def start_server(profile: str, time_scale: float, stream_interval: int = 1) -> tuple[subprocess.Popen[str], str]:
    """`python -m extproc.sim` on a free port; returns the process and its URL (from its first line)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc.sim", "--port", "0", "--profile", profile, "--time-scale", str(time_scale),
         "--model", "sim-model", "--stream-interval", str(stream_interval)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"simulator did not start: {line!r}")
    return proc, line.split("listening on ")[1].split()[0]


def _stats(url: str) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(url + "/sim/stats") as r:
        return json.loads(r.read())


def http_throughput(configs: list[tuple[int, float, int]], seconds: float) -> list[dict[str, object]]:
    """For each (streams, time_scale, stream_interval): one server process, one load-client process."""
    results = []
    for streams, scale, interval in configs:
        proc, url = start_server("h100-llama3-8b", scale, interval)
        try:
            before, t0 = _stats(url), time.perf_counter()
            client = subprocess.run(
                [sys.executable, __file__, "--load-client", url, "--streams", str(streams), "--seconds", str(seconds)],
                capture_output=True, text=True, check=True, timeout=seconds * 4 + 60)
            after, wall = _stats(url), time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(10)
        load = json.loads(client.stdout)
        sim = after["sim_now_s"] - before["sim_now_s"]
        steps = after["steps"] - before["steps"]
        results.append({
            "time_scale": scale, "stream_interval": interval, **_round(load),
            "server_lag_mean_wall_s": round(after["lag_mean_wall_s"], 5),
            "server_lag_p99_recent_wall_s": round(after["lag_p99_recent_wall_s"], 5),
            "server_lag_max_wall_s": round(after["lag_max_wall_s"], 5),
            "server_steps_per_wall_s": round(steps / wall, 1),
            "effective_time_scale": round(sim / wall, 2),  # simulated seconds per wall second
            # Simulated output rate while loaded; below what the profile would give when the process
            # cannot keep up (steps start late and the simulated GPU loses that time).
            "simulated_output_tok_s": round((after["generation_tokens_total"] - before["generation_tokens_total"])
                                            / sim, 1),
        })
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-http", action="store_true", help="skip the HTTP chunks/s measurement")
    ap.add_argument("--steady-seconds", type=float, default=300.0, help="virtual seconds per closed-loop run")
    ap.add_argument("--http-seconds", type=float, default=8.0, help="wall seconds per HTTP load run")
    ap.add_argument("--load-client", metavar="URL", help=argparse.SUPPRESS)  # internal: the load process
    ap.add_argument("--streams", type=int, default=256, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=8.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_client:
        import uvloop  # keep the client cheaper than the server it measures

        print(json.dumps(uvloop.run(load_client(args.load_client, args.streams, args.seconds, max_tokens=200))))
        return

    t0 = time.perf_counter()
    h100 = get_profile("h100-llama3-8b")
    report: dict[str, object] = {
        "method": "burst = C prompts at t=0, tok/s over makespan, mean TTFT/TPOT, averaged over seeds "
                  "(compared with DESIGN.md); steady_closed_loop = C clients re-sending on finish",
        "profiles": {"h100-llama3-8b": asdict(h100), "paper-spark": asdict(get_profile("paper-spark"))},
        "h100-llama3-8b": h100_sweep(h100, LEVELS, args.steady_seconds),
        "paper-spark": spark(get_profile("paper-spark")),
    }
    report["virtual_time_wall_s"] = round(time.perf_counter() - t0, 2)
    if not args.no_http:
        report["http"] = {
            "machine": {"cpus": os.cpu_count()},
            "note": "one server process (uvloop) and one load-client process; each stream asks for 200 tokens; "
                    "lag = how late each step's delivery is behind the server's own clock (wall seconds)",
            "runs": http_throughput([(256, 1.0, 1), (256, 4.0, 1), (1024, 20.0, 1), (256, 4.0, 8)], args.http_seconds),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
