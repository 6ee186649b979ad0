"""Overhead of tokenpools in front of a backend: Envoy alone vs Envoy + the tokenpools ext_proc, side by side.

`tokenpools bench overhead --json --out DIR` (or `python -m bench.overhead ...`). One run starts:
  - a backend fast enough not to matter (bench/load/backend.py: precomputed bytes; streams space tokens by
    --interval-ms), shared by both paths;
  - the ext_proc server (bench/load/server.py: the same TokenpoolsServer as `tokenpools serve`, no scaler),
    pinned with sched_setaffinity (taskset) to one core;
  - two Envoys from envoy/bootstrap.yaml, each --concurrency 1: "direct" (the ext_proc filter removed) and
    "tokenpools" (the bootstrap as shipped); access logs off in both;
  - the load generator in its own process per phase (bench/load/gen.py), whose CPU time is reported.
Phases alternate direct / tokenpools (order swapped each round) and the report quotes medians over rounds
and ratios. CPU per request / per chunk is read from /proc/PID/stat of the server process. RSS with 10 /
1,000 / 10,000 entitlements comes from a fresh server process per size; the 100,000-queued probe runs the
engine alone in its own process (bench/load/queue.py).
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import orjson
import yaml

from extproc.envoy.bootstrap import EnvoyPorts, envoy_binary, render
from extproc.stack import wait_http, wait_port

from .load.gen import cpu_seconds, rss_kib

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
KEY = "bench-key"
TARGETS = {
    "added_ttft_p50_ms": 1.0,
    "added_ttft_p99_ms": 5.0,
    "added_inter_token_p99_ms": 1.0,
    "admitted_per_s_one_core": 2000,
    "queued_100k_p99_ratio_max": 2.0,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_yaml(entitlements: int = 1) -> str:
    docs = [{
        "apiVersion": "tokenpools.io/v1alpha1", "kind": "TokenPool", "metadata": {"name": "bench"},
        "spec": {"model": "bench-model", "replicas": {"min": 1, "max": 1, "current": 1},
                 "perReplica": {"tokensPerSecond": 1e12, "concurrency": 100_000, "kvCacheTokens": 10_000_000_000},
                 "queue": {"maxQueued": 100_000, "maxQueuedPerEntitlement": 100_000, "timeoutSeconds": 60}},
    }]
    for i in range(entitlements):
        docs.append({
            "apiVersion": "tokenpools.io/v1alpha1", "kind": "TokenEntitlement",
            "metadata": {"name": "bench" if i == 0 else f"e{i}", "labels": {"tokenpools.io/demo": "true"}},
            "spec": {"tenantId": f"t{i}", "poolRef": {"name": "bench"},
                     "qos": {"serviceClass": "dedicated" if i == 0 else ("guaranteed", "elastic", "spot")[i % 3],
                             "sloTargetMs": 500},
                     **({"resources": {"concurrency": 50_000}} if i == 0 else
                        {"resources": {"concurrency": 1}} if i % 3 != 2 else {"burst": {"concurrency": 4}}),
                     "defaults": {"maxTokens": 16},
                     "auth": {"apiKeys": [KEY if i == 0 else f"key-{i}"]}},
        })
    return yaml.safe_dump_all(docs, sort_keys=False)


def envoy_yaml(ports: EnvoyPorts, backend: int, ext_proc: bool, response_body: bool = True) -> str:
    doc = yaml.safe_load(render(ports, [("127.0.0.1", backend)]))
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm.pop("access_log", None)
    if not response_body:  # the lower bound of a non-blocking (observability-mode) response meter: no body at all
        for f in hcm["http_filters"]:
            if f["name"] == "envoy.filters.http.ext_proc":
                f["typed_config"]["processing_mode"].update(response_body_mode="NONE", response_trailer_mode="SKIP")
    if not ext_proc:
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
        doc["static_resources"]["clusters"] = [c for c in doc["static_resources"]["clusters"] if c["name"] != "tokenpools_ext_proc"]
    return yaml.safe_dump(doc, sort_keys=False)


class Procs:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, cmd: list[str], **kw) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "wb")
        p = subprocess.Popen(cmd, stdout=kw.pop("stdout", log), stderr=log, cwd=ROOT, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


def start_pinned(procs: Procs, name: str, cmd: list[str], cpu: int | None) -> tuple[subprocess.Popen, int]:
    """A process that prints `ready <port> ...` once it serves, pinned to `cpu`; returns it and the port."""
    p = procs.start(name, cmd, stdout=subprocess.PIPE)
    if cpu is not None:
        os.sched_setaffinity(p.pid, {cpu})
    line = p.stdout.readline().decode().split()
    if not line or line[0] != "ready":
        raise RuntimeError(f"{name} did not start: see {procs.work / (name + '.log')}")
    return p, int(line[1])


def start_server(procs: Procs, cfg: Path, name: str, cpu: int | None, plain_asyncio: bool = False) -> tuple[subprocess.Popen, int]:
    cmd = [PY, "-m", "bench.load.server", "--config", str(cfg)] + (["--asyncio"] if plain_asyncio else [])
    return start_pinned(procs, name, cmd, cpu)


def start_echo(procs: Procs, cpu: int | None) -> tuple[subprocess.Popen, int]:
    """bench/load/echo.py: the pass-through grpc.aio ext_proc, pinned like the server."""
    return start_pinned(procs, "echo", [PY, "-m", "bench.load.echo"], cpu)


def load(spec: dict) -> dict:
    out = subprocess.run([PY, "-m", "bench.load.gen", orjson.dumps(spec).decode()], cwd=ROOT, capture_output=True,
                         timeout=spec["duration"] + spec.get("warmup", 1) + 60)
    if out.returncode:
        raise RuntimeError(out.stderr.decode()[-2000:])
    return orjson.loads(out.stdout)


def start_profile(pid: int, path: Path, seconds: float) -> subprocess.Popen | None:
    """py-spy (not a dependency: `pip install py-spy` into the venv for profiling runs) on the server."""
    spy = Path(PY).parent / "py-spy"
    if not spy.is_file():
        return None
    return subprocess.Popen([str(spy), "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200", "-f", "raw",
                             "-o", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarise_profile(path: Path, top: int = 20) -> dict:
    """From py-spy's collapsed stacks: the share of samples per leaf function (self time) and per function
    anywhere on the stack (inclusive), top N each."""
    if not path.is_file():
        return {"error": "no profile (py-spy missing or not permitted)"}
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split("/")[-1] if " (" in f else f for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n

    def top_of(d):
        return [[k, round(v / total * 100, 1)] for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "self_pct": top_of(own), "inclusive_pct": top_of(incl)}


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread kind of a process: "main" (the asyncio loop), "python-thread" (other Python
    threads: grpc.aio's completion-queue poller), and gRPC C-core threads by name (event_engine, ...)."""
    out: dict[str, float] = {}
    tck = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            continue
        comm = raw[raw.index(b"(") + 1 : raw.rindex(b")")].decode()
        fields = raw.rsplit(b")", 1)[1].split()
        kind = "main" if int(tid) == pid else ("python-thread" if comm.startswith("python") else comm)
        out[kind] = out.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / tck
    return out


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, all CPUs (/proc/stat): is the box itself saturated?"""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def run(duration: float = 5.0, rounds: int = 3, concurrency: int = 200, tokens: int = 10, interval_ms: float = 250.0,
        rps_concurrency: int = 32, warmup: float = 1.0, server_cpu: int | None = 0, rss_sizes=(10, 1_000, 10_000), queued: int = 100_000,
        quick: bool = False, profile: bool = False, plain_asyncio: bool = False, only: tuple[str, ...] = (),
        no_body_variant: bool = True, echo_variant: bool = True) -> dict:
    work = Path(tempfile.mkdtemp(prefix="tp-overhead-"))
    procs = Procs(work)
    ncpu = os.cpu_count() or 1
    result: dict = {
        "benchmark": "overhead",
        "python": platform.python_version(),
        "cpus": ncpu,
        "loadavg_before": os.getloadavg(),
        "params": {"duration_s": duration, "rounds": rounds, "concurrency": concurrency, "stream_tokens": tokens,
                   "interval_ms": interval_ms, "rps_concurrency": rps_concurrency, "server_cpu": server_cpu,
                   "warmup_s": warmup, "server_loop": "asyncio" if plain_asyncio else "uvloop"},
    }
    try:
        backend = free_port()
        procs.start("backend", [PY, "-m", "bench.load.backend", "--port", str(backend), "--interval-ms", str(interval_ms)])
        cfg = work / "config.yaml"
        cfg.write_text(config_yaml(1))
        server, ext_port = start_server(procs, cfg, "server", server_cpu, plain_asyncio)
        echo, echo_port = start_echo(procs, server_cpu) if echo_variant else (None, 0)
        envoys = {}
        configs = [("direct", False, True), ("tokenpools", True, True)]
        if no_body_variant:
            configs.append(("tokenpools_no_response_body", True, False))
        if echo_variant:
            configs.append(("echo_ext_proc", True, True))
        for name, ext, body in configs:
            port = echo_port if name == "echo_ext_proc" else ext_port
            ports = EnvoyPorts(listen=free_port(), admin=free_port(), ext_proc=port)
            boot = work / f"envoy-{name}.yaml"
            boot.write_text(envoy_yaml(ports, backend, ext, body))
            e = procs.start(f"envoy-{name}", [envoy_binary(), "-c", str(boot), "--disable-hot-restart",
                                               "--concurrency", "1", "-l", "warning", "--base-id", str(free_port())])
            wait_http(f"http://127.0.0.1:{ports.admin}/ready", 30, e)
            wait_port(ports.listen, 10, e)
            envoys[name] = (ports.listen, e)
        wait_port(backend, 10)
        deadline = time.monotonic() + 10  # until Envoy's gRPC health check marks the ext_proc cluster healthy
        while time.monotonic() < deadline:
            probe = load({"key": KEY, "model": "bench-model", "port": envoys["tokenpools"][0], "concurrency": 1,
                          "duration": 0.2, "warmup": 0.0})
            if probe["statuses"].get("200"):
                break
            time.sleep(0.3)
        base = {"key": KEY, "model": "bench-model", "prompt_bytes": 256}
        phases = {
            "stream": {**base, "stream": True, "max_tokens": tokens, "concurrency": concurrency,
                       "stagger": tokens * interval_ms / 1000},
            "stream_short": {**base, "stream": True, "max_tokens": 1, "concurrency": concurrency},
            "rps": {**base, "stream": False, "max_tokens": 1, "concurrency": rps_concurrency},
        }
        phases = {k: v for k, v in phases.items() if k in only} if only else phases
        names = list(envoys)
        runs: dict = {ph: {n: [] for n in names if n != "tokenpools_no_response_body" or ph != "rps"} for ph in phases}
        profiles: dict = {}
        idle: list[float] = []
        for r in range(rounds):
            for ph, spec in phases.items():
                order = list(runs[ph])
                order = order[r % len(order):] + order[:r % len(order)]  # rotate: nobody always goes first
                for name in order:
                    port, envoy = envoys[name]
                    srv = echo if name == "echo_ext_proc" else server  # whose CPU this path spends
                    s0, e0, t0 = cpu_seconds(srv.pid), cpu_seconds(envoy.pid), time.perf_counter()
                    spy = None
                    m0, th0 = machine_busy(), thread_cpu(srv.pid)
                    if profile and r == 0 and name == "tokenpools" and ph in ("stream", "rps"):
                        spy = start_profile(server.pid, work / f"profile-{ph}.txt", duration + 1)
                    res = load({**spec, "port": port, "duration": duration, "warmup": warmup})
                    if spy is not None:
                        spy.wait(30)
                        profiles[ph] = summarise_profile(work / f"profile-{ph}.txt")
                    s1, e1, t1 = cpu_seconds(srv.pid), cpu_seconds(envoy.pid), time.perf_counter()
                    m1, th1 = machine_busy(), thread_cpu(srv.pid)
                    res["server_threads_cpu_fraction"] = {k: round((v - th0.get(k, 0.0)) / (t1 - t0), 3) for k, v in th1.items()
                                                          if v - th0.get(k, 0.0) > 0}
                    res["machine_cpu_busy_fraction"] = round((m1[0] - m0[0]) / max(1, m1[1] - m0[1]), 3)
                    wall = t1 - t0
                    total, chunks = res["all_requests"], res["all_chunks"]  # the whole phase, warm-up included
                    res["server_cpu_s"] = round(s1 - s0, 3)
                    res["server_cpu_fraction"] = round((s1 - s0) / wall, 3)
                    res["envoy_cpu_fraction"] = round((e1 - e0) / wall, 3)
                    if name == "direct" and res["server_cpu_s"] < 0.05 * wall:  # the server is idle (ticks, gRPC health checks): its baseline
                        idle.append((s1 - s0) / wall)
                    busy = (s1 - s0) - (median(idle) or 0.0) * wall
                    res["server_cpu_s_minus_idle"] = round(busy, 4)
                    res["server_cpu_us_per_request"] = (round(busy / total * 1e6, 1)
                                                        if total and name in ("tokenpools", "echo_ext_proc") else None)
                    res["phase_requests_est"], res["phase_chunks_est"] = round(total), round(chunks)
                    res["loadavg"] = os.getloadavg()[0]
                    runs[ph][name].append(res)
        result["runs"] = runs
        if profiles:
            result["profiles"] = profiles
        result["server_rss_kib_after_load"] = rss_kib(server.pid)
        result["summary"] = summarise(runs, tokens)
        # RSS by number of entitlements: a fresh server per size, idle after start.
        rss = {}
        for n in rss_sizes:
            c = work / f"config-{n}.yaml"
            c.write_text(config_yaml(n))
            p, _ = start_server(procs, c, f"server-{n}", None)
            time.sleep(0.5)
            rss[str(n)] = rss_kib(p.pid)
            p.terminate()
            p.wait(5)
        result["rss_kib_by_entitlements"] = rss
        q = {}
        for n in (0, queued):
            out = subprocess.run([PY, "-m", "bench.load.queue", orjson.dumps({"queued": n, "pairs": 20_000 if quick else 200_000, "cpu": server_cpu}).decode()],
                                 cwd=ROOT, capture_output=True, check=True)
            q[str(n)] = orjson.loads(out.stdout)
        result["queue"] = q
        base_p99, loaded_p99 = q["0"]["decision_us"]["p99"], q[str(queued)]["decision_us"]["p99"]
        if "admitted_per_s" not in result["summary"]:
            return result
        result["summary"]["queued_p99_decision_us"] = {"0": base_p99, str(queued): loaded_p99,
                                                       "ratio": round(loaded_p99 / base_p99, 2)}
        result["summary"]["queued_rss_added_mib"] = round(q[str(queued)]["rss_added_kib"] / 1024, 1)
        result["summary"]["rss_mib_by_entitlements"] = {k: round(v / 1024, 1) for k, v in rss.items()}
        result["loadavg_after"] = os.getloadavg()
        result["targets"] = TARGETS
        result["verdicts"] = verdicts(result["summary"])
        result["work_dir"] = str(work)
    finally:
        procs.stop()
    return result


def summarise(runs: dict, tokens: int) -> dict:
    s: dict = {}

    def med(ph, name, *path):
        vals = []
        for r in runs[ph][name]:
            v = r
            for k in path:
                v = v.get(k) if isinstance(v, dict) else None
            vals.append(v)
        return median(vals)

    for ph in runs:
        for name in runs[ph]:
            s.setdefault(ph, {})[name] = {
                "requests_per_s": med(ph, name, "requests_per_s"),
                "ttft_ms_p50": med(ph, name, "ttft_ms", "p50"),
                "ttft_ms_p99": med(ph, name, "ttft_ms", "p99"),
                "inter_chunk_ms_p50": med(ph, name, "inter_chunk_ms", "p50"),
                "inter_chunk_ms_p99": med(ph, name, "inter_chunk_ms", "p99"),
                "latency_ms_p50": med(ph, name, "latency_ms", "p50"),
                "latency_ms_p99": med(ph, name, "latency_ms", "p99"),
                "server_cpu_fraction": med(ph, name, "server_cpu_fraction"),
                "envoy_cpu_fraction": med(ph, name, "envoy_cpu_fraction"),
                "loadgen_cpu_fraction": med(ph, name, "loadgen_cpu_fraction"),
                "machine_cpu_busy_fraction": med(ph, name, "machine_cpu_busy_fraction"),
                "non_2xx": sum(sum(v for k, v in r["statuses"].items() if not k.startswith("2")) + r["errors"]
                               for r in runs[ph][name]),
            }
    # Added latency: per round (the two runs of a round are adjacent in time), then the median over rounds.
    def added(ph, *path, name="tokenpools"):
        if ph not in runs or name not in runs[ph]:
            return None
        diffs = []
        for a, b in zip(runs[ph]["direct"], runs[ph][name]):
            va, vb = a, b
            for k in path:
                va, vb = va[k], vb[k]
            if va is not None and vb is not None:
                diffs.append(vb - va)
        return median(diffs)

    s["added"] = {
        "ttft_ms_p50": added("stream", "ttft_ms", "p50"),
        "ttft_ms_p99": added("stream", "ttft_ms", "p99"),
        "inter_token_ms_p99": added("stream", "inter_chunk_ms", "p99"),
        "rps_latency_ms_p50": added("rps", "latency_ms", "p50"),
        "rps_latency_ms_p99": added("rps", "latency_ms", "p99"),
    }
    if "echo_ext_proc" in runs.get("stream", {}):  # what grpc.aio costs by itself: the floor of a Python ext_proc
        s["added_echo_ext_proc"] = {
            "ttft_ms_p50": added("stream", "ttft_ms", "p50", name="echo_ext_proc"),
            "ttft_ms_p99": added("stream", "ttft_ms", "p99", name="echo_ext_proc"),
            "inter_token_ms_p99": added("stream", "inter_chunk_ms", "p99", name="echo_ext_proc"),
        }
    if "echo_ext_proc" in runs.get("rps", {}):
        rps_echo = runs["rps"]["echo_ext_proc"]
        s["echo_ext_proc_rps"] = {
            "requests_per_s": median([r["requests_per_s"] for r in rps_echo]),
            "cpu_us_per_request": median([r["server_cpu_us_per_request"] for r in rps_echo]),
            "cpu_fraction": median([r["server_cpu_fraction"] for r in rps_echo]),
        }
    if "tokenpools_no_response_body" in runs.get("stream", {}):
        s["added_no_response_body"] = {
            "ttft_ms_p50": added("stream", "ttft_ms", "p50", name="tokenpools_no_response_body"),
            "ttft_ms_p99": added("stream", "ttft_ms", "p99", name="tokenpools_no_response_body"),
            "inter_token_ms_p99": added("stream", "inter_chunk_ms", "p99", name="tokenpools_no_response_body"),
        }
    # CPU per request (non-streaming, rps phase) and per streamed chunk: two stream lengths, same concurrency.
    if set(runs) != {"stream", "stream_short", "rps"}:  # a partial run (--phases): no derived numbers
        return s
    per_req = median([r["server_cpu_us_per_request"] for r in runs["rps"]["tokenpools"]])
    longs, shorts = runs["stream"]["tokenpools"], runs["stream_short"]["tokenpools"]
    per_chunk = []
    for lo, sh in zip(longs, shorts):
        cl = lo["server_cpu_s_minus_idle"] / max(1, lo["phase_requests_est"])
        cs = sh["server_cpu_s_minus_idle"] / max(1, sh["phase_requests_est"])
        kl = lo["phase_chunks_est"] / max(1, lo["phase_requests_est"])
        ks = sh["phase_chunks_est"] / max(1, sh["phase_requests_est"])
        if kl > ks:
            per_chunk.append((cl - cs) / (kl - ks) * 1e6)
    s["server_cpu_us"] = {
        "per_request_non_streaming": per_req,
        "per_stream_request_1_token": median([r["server_cpu_us_per_request"] for r in shorts]),
        "per_stream_request": median([r["server_cpu_us_per_request"] for r in longs]),
        "per_streamed_chunk": median(per_chunk),
    }
    rps_tp = s["rps"]["tokenpools"]
    s["admitted_per_s"] = {
        "measured": rps_tp["requests_per_s"],
        "server_cpu_fraction": rps_tp["server_cpu_fraction"],
        "one_core_capacity_from_cpu": round(1e6 / per_req) if per_req else None,
        "direct_requests_per_s": s["rps"]["direct"]["requests_per_s"],
    }
    threads: dict = {}
    for ph in ("stream", "rps"):
        rs = runs[ph]["tokenpools"]
        kinds = {k for r in rs for k in r.get("server_threads_cpu_fraction", {})}
        threads[ph] = {k: median([r.get("server_threads_cpu_fraction", {}).get(k, 0.0) for r in rs]) for k in sorted(kinds)}
    s["server_threads_cpu_fraction"] = threads  # main = the asyncio loop; python-thread = grpc.aio's poller
    s["loadgen_cpu_fraction_max"] = max(
        r["loadgen_cpu_fraction"] for ph in runs for name in runs[ph] for r in runs[ph][name])
    return s


def verdicts(s: dict) -> dict:
    a = s["added"]
    cap = max(filter(None, [s["admitted_per_s"]["measured"], s["admitted_per_s"]["one_core_capacity_from_cpu"]]), default=0)
    return {
        "added_ttft_p50": a["ttft_ms_p50"] is not None and a["ttft_ms_p50"] <= TARGETS["added_ttft_p50_ms"],
        "added_ttft_p99": a["ttft_ms_p99"] is not None and a["ttft_ms_p99"] <= TARGETS["added_ttft_p99_ms"],
        "added_inter_token_p99": a["inter_token_ms_p99"] is not None and a["inter_token_ms_p99"] <= TARGETS["added_inter_token_p99_ms"],
        "admitted_per_s_measured": (s["admitted_per_s"]["measured"] or 0) >= TARGETS["admitted_per_s_one_core"],
        "admitted_per_s_one_core_from_cpu": cap >= TARGETS["admitted_per_s_one_core"],
        "queued_100k": s["queued_p99_decision_us"]["ratio"] < TARGETS["queued_100k_p99_ratio_max"],
    }


@click.command("overhead")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON result (default when --out is absent).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Write overhead.json (and the py-spy profiles) into DIR; logs and configs stay in the work_dir the JSON names.")
@click.option("--duration", default=5.0, show_default=True, help="Measured seconds per phase (plus 1 s warm-up).")
@click.option("--rounds", default=3, show_default=True, help="Rounds; within each, every phase runs through every path back to back, order rotated per round.")
@click.option("--concurrency", default=200, show_default=True, help="Concurrent streams.")
@click.option("--tokens", default=10, show_default=True, help="Tokens per stream.")
@click.option("--interval-ms", default=250.0, show_default=True, help="Backend time between tokens.")
@click.option("--rps-concurrency", default=32, show_default=True, help="Concurrent non-streaming requests in the throughput phase.")
@click.option("--server-cpu", default=0, show_default=True, help="Core the ext_proc server is pinned to (-1: not pinned).")
@click.option("--rss-sizes", default="10,1000,10000", show_default=True, help="Entitlement counts for RSS.")
@click.option("--queued", default=100_000, show_default=True, help="Queued requests for the queue probe.")
@click.option("--quick", is_flag=True, help="Smoke run: fewer queue-probe pairs.")
@click.option("--asyncio", "plain_asyncio", is_flag=True, help="Run the ext_proc server on asyncio's own loop instead of uvloop.")
@click.option("--echo-variant/--skip-echo-variant", default=True, show_default=True, help="Also run every phase through an Envoy whose ext_proc is bench/load/echo.py (grpc.aio passing messages back, no logic): the floor of a Python ext_proc.")
@click.option("--no-body-variant/--skip-no-body-variant", default=True, show_default=True, help="Also run the streams through a third Envoy whose ext_proc skips the response body (what a non-blocking, observability-mode meter could at best reach).")
@click.option("--phases", default="stream,stream_short,rps", show_default=True, help="Phases to run (derived numbers need all three).")
@click.option("--profile", is_flag=True, help="py-spy the server during round 0's tokenpools stream and rps phases (needs py-spy in the venv).")
def overhead(as_json, out_dir, duration, rounds, concurrency, tokens, interval_ms, rps_concurrency, server_cpu,
             rss_sizes, queued, quick, profile, plain_asyncio, echo_variant, no_body_variant, phases) -> None:
    """Envoy alone vs Envoy + tokenpools ext_proc: added TTFT / inter-token latency, admitted req/s on one core,
    CPU per request and chunk, RSS by entitlements and with 100,000 queued."""
    result = run(duration=duration, rounds=rounds, concurrency=concurrency, tokens=tokens, interval_ms=interval_ms,
                 rps_concurrency=rps_concurrency, server_cpu=None if server_cpu < 0 else server_cpu,
                 rss_sizes=tuple(int(x) for x in rss_sizes.split(",") if x), queued=queued, quick=quick, profile=profile,
                 plain_asyncio=plain_asyncio, no_body_variant=no_body_variant, echo_variant=echo_variant,
                 only=tuple(phases.split(",")))
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "overhead.json").write_text(text + "\n")
        for prof in Path(result["work_dir"]).glob("profile-*.txt"):  # py-spy's collapsed stacks, when --profile
            (Path(out_dir) / prof.name).write_bytes(prof.read_bytes())
    if as_json or not out_dir:
        click.echo(text)


if __name__ == "__main__":
    overhead()
