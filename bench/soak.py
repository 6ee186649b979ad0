"""`tokenpools bench soak`: many requests through real Envoy + `tokenpools serve` + the stand-in backend, with
every way a request can end, then check that the books balance and the server did not grow.

    .venv/bin/python -m bench.soak --requests 100000 --minutes 20 --out bench/results/soak

Processes (each its own, all on 127.0.0.1 free ports): the stand-in backend (`extproc.envoy.standin
--no-records`), `tokenpools serve` (log level warning), Envoy from envoy/bootstrap.yaml (`--concurrency 1`,
access log off) and the load generator (`bench/load/soak_gen.py`). Three pools:

    main        64 slots, never full: ok / streaming requests (guaranteed + spot keys), client aborts after
                the first chunk, upstream 500 / 429 (x-test-status), upstream cut mid-stream (x-test-cut-after),
                unknown key (401)
    contended   2 slots, queue of 4 per entitlement, 1 s deadline; 8 connections: requests queue, some hang up
                while waiting (5-40 ms), some get 429 queue_full / queue_timeout
    noqueue     1 slot, no queue; 3 connections: tokenpools' own 429 (over_concurrency)

Keys are in the config as SHA-256 digests (no demo label). While it runs, the server's VmRSS
(/proc/PID/status) is sampled every second; the warm-up reference is the first sample after 10 % of the
requests ended. At the end: wait for the books to settle, then check 0 in flight / 0 reserved KV / 0 queued
for every pool and entitlement (/status), the adapter's live map empty (/status/adapter), the engine's
invariants (/status/invariants), no unexpected outcome per request kind, RSS growth < 10 % warm-up → end.
The JSON result has all of it (and `ok`); exit status 1 when a check fails.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import orjson
import yaml

from extproc.envoy.bootstrap import EnvoyPorts, render
from extproc.stack import Stack, envoy_command, free_port, serve_command_line, wait_http, wait_port

from .load.gen import cpu_seconds, rss_kib

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
RSS_GROWTH_MAX = 0.10
WARM_FRACTION = 0.10

KEYS = {"guaranteed": "soak-key-guaranteed", "spot": "soak-key-spot", "contended": "soak-key-contended",
        "noqueue": "soak-key-noqueue", "bad": "soak-key-unknown"}  # fmt: skip
MODELS = {"main": "soak-main", "contended": "soak-contended", "noqueue": "soak-noqueue"}


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


CONFIG = f"""
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {{name: main}}
spec:
  model: {MODELS['main']}
  perReplica: {{tokensPerSecond: 100000000, concurrency: 64, kvCacheTokens: 100000000}}
  queue: {{maxQueued: 1000, maxQueuedPerEntitlement: 1000, timeoutSeconds: 10}}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {{name: contended}}
spec:
  model: {MODELS['contended']}
  perReplica: {{tokensPerSecond: 100000000, concurrency: 2, kvCacheTokens: 1000000}}
  queue: {{maxQueued: 4, maxQueuedPerEntitlement: 4, timeoutSeconds: 1}}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {{name: noqueue}}
spec:
  model: {MODELS['noqueue']}
  perReplica: {{tokensPerSecond: 100000000, concurrency: 1, kvCacheTokens: 1000000}}
  queue: {{maxQueued: 0}}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {{name: main-guaranteed}}
spec:
  tenantId: tenant-g
  poolRef: {{name: main}}
  qos: {{serviceClass: guaranteed, sloTargetMs: 500}}
  resources: {{concurrency: 40}}
  auth: {{apiKeySha256: [{_sha(KEYS['guaranteed'])}]}}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {{name: main-spot}}
spec:
  tenantId: tenant-s
  poolRef: {{name: main}}
  qos: {{serviceClass: spot}}
  burst: {{concurrency: 24}}
  auth: {{apiKeySha256: [{_sha(KEYS['spot'])}]}}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {{name: contended}}
spec:
  tenantId: tenant-c
  poolRef: {{name: contended}}
  qos: {{serviceClass: guaranteed}}
  resources: {{concurrency: 2}}
  auth: {{apiKeySha256: [{_sha(KEYS['contended'])}]}}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {{name: noqueue}}
spec:
  tenantId: tenant-n
  poolRef: {{name: noqueue}}
  qos: {{serviceClass: guaranteed}}
  resources: {{concurrency: 1}}
  auth: {{apiKeySha256: [{_sha(KEYS['noqueue'])}]}}
"""

GROUPS = [
    {"name": "main", "concurrency": 24, "mix": [
        ["ok", 30], ["ok_spot", 10], ["stream", 25], ["stream_spot", 8], ["abort_stream", 5],
        ["upstream_500", 5], ["upstream_429", 4], ["upstream_cut", 5], ["bad_key", 3]]},
    {"name": "contended", "concurrency": 8, "mix": [["contended", 60], ["abort_queued", 40]]},
    {"name": "noqueue", "concurrency": 3, "mix": [["reject", 1]], "pause_after_429_ms": 10},
]  # fmt: skip


def get_json(port: int, path: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def envoy_yaml(ports: EnvoyPorts, backend: int) -> str:
    doc = yaml.safe_load(render(ports, [("127.0.0.1", backend)]))
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm.pop("access_log", None)  # 100,000 log lines cost Envoy CPU and say nothing the counts do not
    return yaml.safe_dump(doc, sort_keys=False)


def books(status_port: int) -> dict:
    """What must be zero once no request is live, and the engine's own invariant check."""
    _, snap = get_json(status_port, "/status")
    _, adapter = get_json(status_port, "/status/adapter")
    inv_status, inv = get_json(status_port, "/status/invariants")
    ents, pools = snap["entitlements"], snap["pools"]
    cross = []  # the engine's bookkeeping, recomputed from /status (independent of check_invariants)
    for name, p in pools.items():
        mine = [e for e in ents.values() if e["pool"] == name]
        if p["used"]["concurrency"] != sum(e["in_flight"] for e in mine):
            cross.append(f"{name}: used concurrency != sum of entitlements")
        if abs(p["used"]["kv_cache_tokens"] - sum(e["reserved_kv_tokens"] for e in mine)) > 1e-6:
            cross.append(f"{name}: used KV != sum of entitlements")
        if p["queued"] != sum(e["queued"] for e in mine):
            cross.append(f"{name}: queued != sum of entitlements")
    return {
        "entitlements_in_flight": sum(e["in_flight"] for e in ents.values()),
        "entitlements_reserved_kv_tokens": sum(e["reserved_kv_tokens"] for e in ents.values()),
        "entitlements_queued": sum(e["queued"] for e in ents.values()),
        "pools_in_flight": sum(p["in_flight"] for p in pools.values()),
        "pools_used_concurrency": sum(p["used"]["concurrency"] for p in pools.values()),
        "pools_used_kv_cache_tokens": sum(p["used"]["kv_cache_tokens"] for p in pools.values()),
        "pools_queued": sum(p["queued"] for p in pools.values()),
        "adapter_live_requests": adapter["live_requests"],
        "adapter_in_flight": sum(adapter["in_flight"].values()),
        "invariants_ok": inv_status == 200 and inv.get("ok") is True,
        "invariants_error": inv.get("error"),
        "cross_check_errors": cross,
        "adapter_stats": {k: adapter[k] for k in ("streams", "admitted", "queued", "finished", "released", "evicted", "refusals") if k in adapter},
        "engine_totals": {n: {"admitted": e["admitted_total"], "rejected": e["rejected_total"],
                              "rejected_by_reason": e["rejected_by_reason"]} for n, e in ents.items()},
    }  # fmt: skip


def balanced(b: dict) -> bool:
    zero = [k for k in b if k.startswith(("entitlements_", "pools_", "adapter_")) and k != "adapter_stats"]
    return all(b[k] == 0 for k in zero) and b["invariants_ok"] and not b["cross_check_errors"]


def run(requests: int = 100_000, minutes: float = 20.0, seed: int = 1, workdir: Path | None = None,
        sample_every: float = 1.0, progress=None) -> dict:  # fmt: skip
    """The whole soak; returns the result document (result["ok"] says whether every check passed)."""
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="tokenpools-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(CONFIG)
    upstream, ext_proc, status_port, listen, admin = (free_port() for _ in range(5))
    stack = Stack(workdir=work)
    gen: subprocess.Popen | None = None
    try:
        up = stack.start("upstream", [PY, "-m", "extproc.envoy.standin", "--port", str(upstream), "--no-records"],
                         work / "upstream.log", cwd=ROOT)  # fmt: skip
        server = stack.start("tokenpools", serve_command_line(str(work / "config.yaml"), ext_proc, status_port,
                             ["--log-level", "warning"]), work / "tokenpools.log", cwd=ROOT)  # fmt: skip
        wait_http(f"http://127.0.0.1:{upstream}/_stats", 30, up)
        wait_http(f"http://127.0.0.1:{status_port}/healthz", 30, server)
        (work / "envoy.yaml").write_text(envoy_yaml(EnvoyPorts(listen, admin, ext_proc), upstream))
        envoy = stack.start("envoy", envoy_command(work / "envoy.yaml", "warning", concurrency=1), work / "envoy.log")
        wait_http(f"http://127.0.0.1:{admin}/ready", 30, envoy)
        wait_port(listen, 10, envoy)
        wait_http(f"http://127.0.0.1:{admin}/clusters", 10, envoy)

        spec = {"port": listen, "requests": requests, "deadline_s": minutes * 60, "seed": seed, "models": MODELS,
                "keys": KEYS, "groups": GROUPS}  # fmt: skip
        rss0 = rss_kib(server.pid)
        cpu0 = cpu_seconds(server.pid)
        load0 = os.getloadavg()
        t0 = time.monotonic()
        gen = subprocess.Popen([PY, "-m", "bench.load.soak_gen", orjson.dumps(spec).decode()], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=open(work / "gen.log", "wb"), start_new_session=True)  # fmt: skip
        samples: list[dict] = []
        done = [0]
        result_line: list[dict] = []

        def read_gen() -> None:
            for line in gen.stdout:  # type: ignore[union-attr]
                msg = orjson.loads(line)
                if "progress" in msg:
                    done[0] = msg["progress"]
                    if progress is not None:
                        progress(msg["progress"], requests)
                elif "result" in msg:
                    result_line.append(msg["result"])

        reader = threading.Thread(target=read_gen, daemon=True)
        reader.start()
        while gen.poll() is None:
            samples.append({"t": round(time.monotonic() - t0, 1), "requests": done[0], "rss_kib": rss_kib(server.pid),
                            "envoy_rss_kib": rss_kib(envoy.pid), "server_cpu_s": round(cpu_seconds(server.pid) - cpu0, 2)})  # fmt: skip
            time.sleep(sample_every)
        reader.join(10)
        wall = time.monotonic() - t0
        if gen.returncode != 0 or not result_line:
            raise RuntimeError(f"load generator failed (exit {gen.returncode}); see {work / 'gen.log'}")
        load = result_line[0]
        server_cpu = cpu_seconds(server.pid) - cpu0

        # Settle: in-flight requests ended on the client side; their releases may still be on their way.
        deadline = time.monotonic() + 15
        b = books(status_port)
        while not balanced(b) and time.monotonic() < deadline:
            time.sleep(0.2)
            b = books(status_port)
        rss_end = rss_kib(server.pid)
        samples.append({"t": round(time.monotonic() - t0, 1), "requests": load["requests"], "rss_kib": rss_end,
                        "envoy_rss_kib": rss_kib(envoy.pid), "server_cpu_s": round(cpu_seconds(server.pid) - cpu0, 2), "after_settle": True})  # fmt: skip
        warm = next((s for s in samples if s["requests"] >= WARM_FRACTION * load["requests"]), samples[-1])
        growth = (rss_end - warm["rss_kib"]) / warm["rss_kib"]
        _, up_stats = get_json(upstream, "/_stats")
        server_alive = server.poll() is None and envoy.poll() is None

        by_outcome: dict[str, int] = {}
        for d in load["outcomes"].values():
            for o, n in d.items():
                by_outcome[o] = by_outcome.get(o, 0) + n
        checks = {
            "books_balanced": balanced(b),
            "no_unexpected_outcomes": not load["unexpected"],
            "rss_growth_below_10_percent": growth < RSS_GROWTH_MAX,
            "all_requests_sent": load["completed"],
            "processes_alive": server_alive,
        }
        return {
            "benchmark": "soak",
            "ok": all(checks.values()),
            "checks": checks,
            "requests": load["requests"],
            "requests_asked": requests,
            "duration_s": round(load["wall_s"], 1),
            "requests_per_s": load["requests_per_s"],
            "outcomes_by_kind": load["outcomes"],
            "outcomes": dict(sorted(by_outcome.items(), key=lambda kv: -kv[1])),
            "unexpected": load["unexpected"],
            "latency_ms_200": load["latency_ms_200"],
            "end_books": b,
            "rss": {
                "start_kib": rss0,
                "warm_kib": warm["rss_kib"],
                "warm_at_requests": warm["requests"],
                "end_kib": rss_end,
                "growth_warm_to_end_percent": round(100 * growth, 2),
                "growth_bytes_per_request_after_warm": round(1024 * (rss_end - warm["rss_kib"]) / max(1, load["requests"] - warm["requests"]), 1),
                "limit_percent": 100 * RSS_GROWTH_MAX,
                "samples": _thin(samples, 120),
            },
            "server_cpu_s": round(server_cpu, 1),
            "server_cpu_us_per_request": round(1e6 * server_cpu / max(1, load["requests"]), 1),
            "upstream_stats": up_stats,
            "groups": GROUPS,
            "machine": {"cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load0],
                        "loadavg_after": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
                        "wall_s_including_settle": round(wall, 1)},  # fmt: skip
            "workdir": str(work),
        }
    finally:
        if gen is not None and gen.poll() is None:
            gen.kill()
            gen.wait(5)
        stack.stop()


def _thin(samples: list[dict], n: int) -> list[dict]:
    """At most about n samples, evenly spaced, always keeping the last (the after-settle one)."""
    if len(samples) <= n:
        return samples
    step = len(samples) / n
    out = [samples[int(i * step)] for i in range(n)]
    return out + [samples[-1]] if out[-1] is not samples[-1] else out


@click.command("soak")
@click.option("--requests", default=100_000, show_default=True, help="Requests to send in total.")
@click.option("--minutes", default=20.0, show_default=True, help="Stop sending after this long even if not all were sent.")
@click.option("--seed", default=1, show_default=True, help="Seed of the request mix.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Write soak.json into DIR.")
@click.option("--workdir", type=click.Path(file_okay=False), default=None, help="Logs and config (default: a temp dir).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON result (default when --out is absent).")
def soak(requests, minutes, seed, out_dir, workdir, as_json) -> None:
    """Soak through real Envoy + tokenpools + the stand-in backend, with aborts, upstream errors and 429s;
    then 0 in flight, 0 reserved KV, empty live map, engine invariants, RSS growth < 10 %."""

    last = [0.0]

    def show(done: int, total: int) -> None:
        if time.monotonic() - last[0] >= 30:
            last[0] = time.monotonic()
            click.echo(f"soak: {done}/{total} requests ended", err=True)

    result = run(requests, minutes, seed, workdir, progress=show)
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "soak.json").write_text(text + "\n")
    if as_json or not out_dir:
        click.echo(text)
    if not result["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    soak()
