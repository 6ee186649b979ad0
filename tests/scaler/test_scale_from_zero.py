"""Scale from zero, end to end: Envoy → tokenpools (ext_proc + KEDA scaler + controller) → a vLLM simulator.

The pool starts with no replica (its backend port is closed). KEDA holds StreamIsActive open. A request comes
in through Envoy and waits in the engine's queue; the stream says "active" within a second; KEDA would now
start a pod — here the test starts a simulated vLLM on the backend port; the controller's next scrape sees it,
gives the engine its capacity, the waiting request is admitted, and Envoy forwards it: 200.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
import time
from pathlib import Path

import aiohttp
import pytest

from extproc.app import TokenpoolsServer
from extproc.config import load_text
from extproc.envoy.bootstrap import EnvoyPorts, render
from extproc.scaler.backends import DOWN_AFTER
from extproc.scaler.capacity import ScalingPolicy
from extproc.scaler.controller import ControllerOptions
from extproc.sim.profiles import get_profile
from extproc.sim.server import SimConfig, SimServer
from extproc.stack import Stack, envoy_command, wait_http, wait_port

from .keda import Keda

pytestmark = pytest.mark.integration

CONFIG = """
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {name: zero}
spec:
  model: m-zero
  replicas: {min: 0, max: 2, current: 0}
  perReplica: {tokensPerSecond: 480, concurrency: 16, kvCacheTokens: 32768}
  queue: {timeoutSeconds: 20}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: zs, labels: {tokenpools.io/demo: "true"}}
spec:
  tenantId: t
  poolRef: {name: zero}
  qos: {serviceClass: spot}
  auth: {apiKeys: [k-zs]}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_request_for_a_pool_at_zero_waits_scales_it_up_and_is_served():
    backend_port, listen, admin = free_port(), free_port(), free_port()
    workdir = Path(tempfile.mkdtemp(prefix="tokenpools-s0-"))
    stack = Stack(workdir=workdir)

    async def run():
        opts = ControllerOptions(
            policy=ScalingPolicy(scale_down_delay_s=30.0), backends={"zero": [f"http://127.0.0.1:{backend_port}"]},
            period_s=0.1, wake_interval_s=0.05, scrape_timeout_s=0.5,
        )  # fmt: skip
        server = TokenpoolsServer(load_text(CONFIG), ext_proc_port=0, status_port=0, scaler_port=0, controller=opts)
        await server.start()
        sim = None
        keda = Keda(f"127.0.0.1:{server.scaler_port}", "zero", lo=0, hi=2)
        pushes: list[tuple[float, bool]] = []
        stream = asyncio.create_task(keda.stream(pushes))
        try:
            bootstrap = workdir / "envoy.yaml"
            bootstrap.write_text(render(EnvoyPorts(listen, admin, server.ext_proc_port), [("127.0.0.1", backend_port)]))
            envoy = stack.start("envoy", envoy_command(bootstrap, "warning", concurrency=1), workdir / "envoy.log")
            await asyncio.to_thread(wait_http, f"http://127.0.0.1:{admin}/ready", 30, envoy)
            await asyncio.to_thread(wait_port, listen, 10, envoy)
            # The backend is down for good (the controller has seen it fail), and KEDA is told: not active.
            async with asyncio.timeout(5):
                while not (pushes and server.controller.pools["zero"].backends.settled):
                    await asyncio.sleep(0.02)
            assert pushes == [(pushes[0][0], False)] and server.engine.pools["zero"].replicas == 0
            assert server.controller.pools["zero"].backends.backends[f"http://127.0.0.1:{backend_port}"].failures >= DOWN_AFTER

            async def client():
                body = {"model": "m-zero", "max_tokens": 8, "messages": [{"role": "user", "content": "hello"}]}
                async with aiohttp.ClientSession() as s:
                    async with s.post(f"http://127.0.0.1:{listen}/v1/chat/completions", json=body,
                                      headers={"Authorization": "Bearer k-zs"},
                                      timeout=aiohttp.ClientTimeout(total=30)) as r:  # fmt: skip
                        return r.status, await r.json()

            sent = time.monotonic()
            request = asyncio.create_task(client())
            async with asyncio.timeout(5):  # it waits in the queue (no 503)
                while server.engine.pools["zero"].queued != 1:
                    assert not request.done(), request.result()
                    await asyncio.sleep(0.01)
            queued = time.monotonic()
            async with asyncio.timeout(1.0):  # the acceptance bound: active within 1 s
                while len(pushes) < 2:
                    await asyncio.sleep(0.005)
            assert pushes[1][1] is True
            active_after = pushes[1][0] - queued
            assert await keda.poll() == 1  # KEDA activates the Deployment: 0 → 1

            sim = SimServer(SimConfig(profile=get_profile("paper-spark"), model="m-zero"))
            await sim.start(port=backend_port)  # the pod is up
            appeared = time.monotonic()
            status, doc = await asyncio.wait_for(request, 20)
            served = time.monotonic()
            assert status == 200, doc
            assert doc["usage"]["completion_tokens"] == 8
            assert server.engine.pools["zero"].replicas == 1 and server.engine.pools["zero"].queued == 0
            snap = server.engine.snapshot(server.clock())["entitlements"]["zs"]
            assert snap["admitted_total"] == 1 and snap["rejected_total"] == 0
            print(f"\nscale from zero: queued {1000 * (queued - sent):.0f} ms after send, active pushed "
                  f"{1000 * active_after:.0f} ms after queueing, served {1000 * (served - appeared):.0f} ms after "
                  f"the replica appeared")  # fmt: skip
        finally:
            stream.cancel()
            await asyncio.gather(stream, return_exceptions=True)
            await keda.close()
            stack.stop()
            if sim is not None:
                await sim.stop()
            await server.stop(grace=0.2)

    try:
        asyncio.run(run())
    except BaseException:
        log = workdir / "envoy.log"
        if log.exists():
            print("--- envoy.log\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        raise
