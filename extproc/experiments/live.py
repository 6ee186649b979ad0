"""Live runner: the experiment through real processes on free 127.0.0.1 ports.

    load client (this process, aiohttp) ──HTTP──▶ Envoy ──ext_proc──▶ live_server (policy, scaled clock)
                                                   └──▶ simulator backend(s) (`python -m extproc.sim --time-scale K`)

Everything runs K times faster than real time: the backends' simulated clock, the policy's clock (see
live_server.py) and the client's (sim time = (wall − t0) × K). Times in the Trace are simulated seconds, so
the same metrics code reads sim and live runs. The client model is client.py's: the same per-user request
streams (same seeds) as in virtual time, Retry-After read in simulated seconds.

Measured at the client: TTFT (first SSE chunk with a choice — the simulator sends the role chunk with the first
token), gaps between chunks (per token: a chunk of n tokens after a gap g counts n gaps of g/n; the backends
stream `stream_interval` tokens per chunk after the first), tokens per tenant. Sampled every 0.5 simulated
seconds: the backends' /sim/stats (running, waiting, KV) and the policy's per-tenant state (in flight, debt,
weight, burst). Busy slot-seconds come from those samples (the virtual runner integrates them exactly).
Only experiments without capacity changes run live (exp1, exp1-3x, classes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson
import yaml

from extproc.envoy.bootstrap import EnvoyPorts, render
from extproc.stack import Stack, envoy_command, wait_http, wait_port

from .client import JITTER_S, EVICTED_RETRY_S, retry_delay_http
from .trace import Req, Trace
from .workload import Experiment, Load, Tenant, rng_for

SAMPLE_S = 0.5
DRAIN_S = 30.0  # simulated seconds after the horizon for outstanding requests to finish
DEFAULT_STREAM_INTERVAL = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt_text(tokens: int) -> str:
    """A user message the simulator counts as exactly `tokens` prompt tokens (5 + 4 + ceil(bytes / 4)), ≥ 10."""
    n = max(1, tokens - 9)
    return ("lorem ipsum dolor sit amet " * (n // 6 + 2))[: 4 * n]


class Processes:
    """Envoy, the policy server and the backends for one run; stopped in reverse order."""

    def __init__(self, exp: Experiment, policy: str, scale: float, workdir: Path, stream_interval: int) -> None:
        self.exp, self.policy, self.scale, self.workdir = exp, policy, scale, workdir
        self.stream_interval = stream_interval
        self.stack = Stack(workdir=workdir)
        self.listen, self.admin, self.ext_proc, self.status, self.control = (free_port() for _ in range(5))
        self.backends = [free_port() for _ in range(exp.replicas_at(0.0))]

    def start(self) -> None:
        exp, wd = self.exp, self.workdir
        wd.mkdir(parents=True, exist_ok=True)
        (wd / "full.yaml").write_text(yaml.safe_dump_all(exp.all_docs(), sort_keys=False))
        (wd / "initial.yaml").write_text(yaml.safe_dump_all(exp.docs_at(0.0), sort_keys=False))
        prof = dataclasses.asdict(exp.profile)
        (wd / "profile.yaml").write_text(yaml.safe_dump(prof, sort_keys=False))
        try:
            procs = []
            for port in self.backends:
                cmd = [sys.executable, "-m", "extproc.sim", "--port", str(port), "--model", exp.model,
                       "--profile-file", str(wd / "profile.yaml"), "--time-scale", str(self.scale),
                       "--stream-interval", str(self.stream_interval)]  # fmt: skip
                procs.append((port, self.stack.start(f"backend-{port}", cmd, wd / f"backend-{port}.log")))
            server = self.stack.start(
                "server",
                [sys.executable, "-m", "extproc.experiments.live_server", "--config", str(wd / "full.yaml"),
                 "--initial", str(wd / "initial.yaml"), "--policy", self.policy, "--time-scale", str(self.scale),
                 "--ext-proc-port", str(self.ext_proc), "--status-port", str(self.status),
                 "--control-port", str(self.control)],  # fmt: skip
                wd / "server.log",
            )
            for port, proc in procs:
                wait_port(port, 30, proc)
            wait_http(f"http://127.0.0.1:{self.status}/healthz", 30, server)
            wait_port(self.control, 10, server)
            bootstrap = wd / "envoy.yaml"
            bootstrap.write_text(render(EnvoyPorts(self.listen, self.admin, self.ext_proc), [("127.0.0.1", p) for p in self.backends]))
            envoy = self.stack.start("envoy", envoy_command(bootstrap, "warning", concurrency=1), wd / "envoy.log")
            wait_http(f"http://127.0.0.1:{self.admin}/ready", 30, envoy)
            wait_port(self.listen, 10, envoy)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        self.stack.stop()


class LiveRun:
    def __init__(self, exp: Experiment, policy: str, seed: int, scale: float, procs: Processes,
                 progress: Callable[[float], None] | None) -> None:  # fmt: skip
        self.exp, self.policy, self.seed, self.scale, self.procs = exp, policy, seed, scale, procs
        self.progress = progress
        self.trace = Trace(exp, policy, "live", seed)
        self.t0 = 0.0
        self.pending = {t.name: 0 for t in exp.tenants}
        self.in_flight = {t.name: 0 for t in exp.tenants}  # got response headers, not finished
        self.url = f"http://127.0.0.1:{procs.listen}/v1/chat/completions"
        self.failures: dict[str, int] = {}
        self.stop_sampling = False
        # Scripted config changes, each with an event set once the server has applied it: a request is not sent
        # before the changes due by its send time are in force (the control call takes a few ms of wall time,
        # which would otherwise race a new tenant's first request and get it a 403).
        self.changes_due = [(t, asyncio.Event()) for t in exp.config_changes()]

    def now(self) -> float:
        return (time.time() - self.t0) * self.scale

    async def sleep_until(self, t_sim: float) -> None:
        delay = (t_sim - self.now()) / self.scale
        if delay > 0:
            await asyncio.sleep(delay)

    async def run(self) -> Trace:
        exp = self.exp
        conn = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as self.http:
            await self.warm_up()
            # t = 0 a little in the future, the same instant for the policy's clock and ours.
            self.t0 = time.time() + 0.3
            async with self.http.post(f"http://127.0.0.1:{self.procs.control}/control/start", json={"t0": self.t0}) as r:
                r.raise_for_status()
            tasks = []
            for tn in exp.tenants:
                for li, load in enumerate(tn.loads):
                    if load.kind == "closed":
                        for u in range(load.users):
                            tasks.append(asyncio.create_task(self.user(tn, load, f"L{li}u{u}")))
                    else:
                        tasks.append(asyncio.create_task(self.open_loop(tn, load, f"L{li}")))
            tasks.append(asyncio.create_task(self.changes()))
            sampler = asyncio.create_task(self.sampler())
            done, pending = await asyncio.wait(tasks, timeout=(exp.horizon + DRAIN_S) / self.scale + 5)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()
            self.stop_sampling = True
            await sampler
        self.trace.info.update({"time_scale": self.scale, "stream_interval": self.procs.stream_interval,
                                "client_failures": self.failures, "unfinished_tasks": len(pending)})  # fmt: skip
        return self.trace

    async def warm_up(self) -> None:
        """Open the paths before t = 0 (Envoy → ext_proc stream, Envoy → backend connections, client pool) with
        /v1/models, which the adapter passes through without asking the policy."""
        key = next(t.api_key for t in self.exp.tenants if t.present_at(0.0))
        url = f"http://127.0.0.1:{self.procs.listen}/v1/models"

        async def one() -> None:
            async with self.http.get(url, headers={"Authorization": f"Bearer {key}"}) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"warm-up through Envoy failed: {r.status}")

        for _ in range(2):
            await asyncio.gather(*(one() for _ in range(16)))

    # ---- scripted changes (entitlements come and go) ----
    async def changes(self) -> None:
        for t, applied in self.changes_due:
            await self.sleep_until(t)
            docs = self.exp.docs_at(t)
            async with self.http.post(f"http://127.0.0.1:{self.procs.control}/control/apply", json={"docs": docs}) as r:
                r.raise_for_status()
            applied.set()
            self.trace.events.append({"t": round(self.now(), 3), "kind": "config",
                                      "entitlements": [d["metadata"]["name"] for d in docs[1:]]})  # fmt: skip

    async def config_in_force(self) -> None:
        now = self.now()
        for t, applied in self.changes_due:
            if t <= now and not applied.is_set():
                await applied.wait()

    # ---- clients ----
    async def user(self, tn: Tenant, load: Load, name: str) -> None:
        rng = rng_for(self.seed, tn.name, name)
        retry_rng = rng_for(self.seed, tn.name, name, "retry")
        await self.sleep_until(load.start + rng.uniform(0, load.stagger_s))
        n = 0
        while self.now() < min(load.end, self.exp.horizon):
            inp, out = tn.input.sample(rng), tn.output.sample(rng)
            req = Req(f"{tn.name}/{name}/{n}", tn.name, name, self.now(), inp, out)
            n += 1
            outcome = await self.request(req, tn, load, retry_rng)
            if outcome == "left":
                return  # its load ends before it could retry: the user leaves
            if load.think_s > 0:
                await asyncio.sleep(rng.expovariate(1.0 / load.think_s) / self.scale)

    async def open_loop(self, tn: Tenant, load: Load, name: str) -> None:
        retry_rng = rng_for(self.seed, tn.name, name, "retry")
        rng = rng_for(self.seed, tn.name, name)
        running = []
        for i, t in enumerate(load.arrivals(rng_for(self.seed, tn.name, name, "arrivals"))):
            await self.sleep_until(t)
            req = Req(f"{tn.name}/{name}/{i}", tn.name, name, self.now(), tn.input.sample(rng), tn.output.sample(rng))
            running.append(asyncio.create_task(self.request(req, tn, load, retry_rng)))
        await asyncio.gather(*running)

    async def request(self, req: Req, tn: Tenant, load: Load, retry_rng) -> str:
        """Send until served or given up: "served", "gave_up" (403/400) or "left" (the load ended first)."""
        tr = self.trace
        tr.requests.append(req)
        self.pending[req.tenant] += 1
        req.outstanding_at_arrival = self.in_flight[req.tenant]
        body = {
            "model": self.exp.model,
            "messages": [{"role": "user", "content": prompt_text(req.input)}],
            "max_tokens": req.output,
            "stream": True,
        }
        headers = {"Authorization": f"Bearer {tn.api_key}"}
        try:
            while True:
                req.attempts += 1
                await self.config_in_force()
                delay = await self.attempt(req, body, headers, retry_rng)
                if delay is None:
                    return "served" if req.finished is not None else "gave_up"
                if self.now() + delay >= min(load.end, self.exp.horizon):
                    req.gave_up = True
                    return "left"
                await asyncio.sleep(delay / self.scale)
        finally:
            self.pending[req.tenant] -= 1

    async def attempt(self, req: Req, body: dict, headers: dict, retry_rng) -> float | None:
        """One HTTP attempt. Returns the retry delay (simulated s), or None when done (served or given up)."""
        tr = self.trace
        jitter = retry_rng.uniform(0, JITTER_S)
        try:
            async with self.http.post(self.url, json=body, headers=headers) as resp:
                if resp.status != 200:
                    data = await resp.read()
                    code = _error_code(data) or str(resp.status)
                    if code == "evicted":
                        req.evicted += 1
                    req.reject(code)
                    delay = retry_delay_http(resp.status, resp.headers.get("retry-after"), jitter)
                    if delay is None:
                        req.gave_up = True
                    return delay
                req.admitted = self.now()
                self.in_flight[req.tenant] += 1
                first = last = None
                itls: list[float] = []
                got = 0
                error = None
                try:
                    async for line in resp.content:
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            break
                        obj = orjson.loads(payload)
                        if "error" in obj:
                            error = (obj["error"] or {}).get("code") or "stream_error"
                            break
                        choices = obj.get("choices") or []
                        if not choices:
                            continue
                        t = self.now()
                        content = (choices[0].get("delta") or {}).get("content") or ""
                        n = len(content.encode()) // 4
                        if first is None:
                            first = last = t
                            tr.add_point(tr.tenant_tokens[req.tenant], t, req.input + n)
                            tr.add_point(tr.tenant_weighted[req.tenant], t, req.input + 2 * n)
                        elif n:
                            itls.extend([(t - last) / n] * n)
                            last = t
                            tr.add_point(tr.tenant_tokens[req.tenant], t, n)
                            tr.add_point(tr.tenant_weighted[req.tenant], t, 2 * n)
                        got += n
                finally:
                    self.in_flight[req.tenant] -= 1
                if error is None and got >= req.output:
                    req.first_token, req.last_token, req.itls = first, last, itls
                    req.finished = self.now()
                    req.generated = got
                    return None
                if error == "evicted":
                    req.evicted += 1
                req.reject(error or "incomplete")
                return EVICTED_RETRY_S + jitter
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            key = type(exc).__name__
            self.failures[key] = self.failures.get(key, 0) + 1
            if "evict" in str(exc).lower():
                req.evicted += 1
            req.reject("connection_" + key)
            return EVICTED_RETRY_S + jitter

    # ---- samples ----
    async def sampler(self) -> None:
        exp, tr = self.exp, self.trace
        k = 0
        last_t = None
        while not self.stop_sampling:
            t = k * SAMPLE_S
            if t > exp.horizon:
                break
            await self.sleep_until(t)
            if self.progress is not None:
                self.progress(min(t, exp.horizon))
            try:
                stats = await asyncio.gather(*(self._get(f"http://127.0.0.1:{p}/sim/stats") for p in self.procs.backends))
                state = await self._get(f"http://127.0.0.1:{self.procs.control}/control/state")
            except (aiohttp.ClientError, asyncio.TimeoutError):
                k += 1
                continue
            now = self.now()
            running = sum(s["running"] for s in stats)
            tenants = {}
            for tn in exp.tenants:
                s = dict(state["tenants"].get(tn.name, {}))
                s.setdefault("in_flight", 0)
                s["outstanding"] = self.pending[tn.name]
                tenants[tn.name] = s
            tr.samples.append({
                "t": round(t, 6), "t_measured": round(now, 4), "running": running,
                "waiting": sum(s["waiting"] for s in stats), "kv": sum(s["kv_usage"] for s in stats) / len(stats),
                "replicas": len(stats), "tenants": tenants,
                "lag_mean_wall_s": max(s.get("lag_mean_wall_s", 0.0) for s in stats),
            })  # fmt: skip
            if last_t is not None:
                tr.add_interval(tr.busy, last_t, t, running)  # running held over the last sample interval
            last_t = t
            k += 1
        if self.progress is not None:
            self.progress(exp.horizon)
        for name, arr in tr.tenant_tokens.items():
            tr.tokens += arr
        lag = [s.get("lag_mean_wall_s", 0.0) for s in tr.samples]
        tr.info["backend_lag_mean_wall_s"] = round(max(lag), 5) if lag else None

    async def _get(self, url: str) -> dict:
        async with self.http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
            return orjson.loads(await r.read())


def _error_code(data: bytes) -> str | None:
    try:
        return (orjson.loads(data).get("error") or {}).get("code")
    except (orjson.JSONDecodeError, AttributeError):
        return None


def run_live(exp: Experiment, policy: str, seed: int = 1, time_scale: float = 5.0,
             progress: Callable[[float], None] | None = None, workdir: Path | None = None,
             log: Callable[[str], None] = lambda s: None, stream_interval: int = DEFAULT_STREAM_INTERVAL) -> Trace:  # fmt: skip
    if not exp.live_ok:
        raise ValueError(f"{exp.name} changes capacity; live mode runs experiments without capacity changes only")
    wd = workdir if workdir is not None else Path(tempfile.mkdtemp(prefix=f"tokenpools-exp-{exp.name}-{policy}-"))
    procs = Processes(exp, policy, time_scale, wd, stream_interval)
    wall0 = time.time()
    procs.start()
    log(f"{policy}: Envoy :{procs.listen}, server :{procs.ext_proc} (status :{procs.status}), backends {procs.backends}; logs {wd}")
    try:
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:  # pragma: no cover
            runner = asyncio.run
        trace = runner(LiveRun(exp, policy, seed, time_scale, procs, progress).run())
    finally:
        procs.stop()
    trace.info["wall_s"] = round(time.time() - wall0, 2)
    trace.info["workdir"] = str(wd)
    return trace
