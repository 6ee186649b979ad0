"""The engine's capacity follows the backends that are really up; entitlements go Degraded and back to Bound."""

from __future__ import annotations

import asyncio
import socket

import pytest

from extproc.app import TokenpoolsServer
from extproc.config import from_objects
from extproc.engine import Lifecycle
from extproc.scaler.capacity import ScalingPolicy
from extproc.scaler.controller import Controller, ControllerOptions
from extproc.sim.profiles import get_profile
from extproc.sim.server import SimConfig, SimServer

from .keda import Keda
from .test_contract import guaranteed, pool

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _until(pred, timeout=5.0):
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.02)


def test_replicas_follow_live_backends_and_move_entitlements():
    # Two guaranteed tenants of 3 slots on 4-slot replicas: both fit only with two replicas up.
    config = from_objects([pool(current=2, conc=4), guaranteed("a", 3), guaranteed("b", 3)])
    ports = [free_port(), free_port()]

    async def run():
        sims = [SimServer(SimConfig(profile=get_profile("paper-spark"), model="m-p")) for _ in ports]
        for sim, port in zip(sims, ports):
            await sim.start(port=port)
        opts = ControllerOptions(
            policy=ScalingPolicy(scale_down_delay_s=30.0), backends={"p": [f"http://127.0.0.1:{p}" for p in ports]},
            period_s=0.1, scrape_timeout_s=0.5,
        )  # fmt: skip
        server = TokenpoolsServer(config, ext_proc_port=0, status_port=0, scaler_port=0, controller=opts)
        await server.start()
        eng = server.engine
        keda = Keda(f"127.0.0.1:{server.scaler_port}", "p")
        keda.replicas = 2  # the Deployment's count as KEDA sees it
        try:
            await _until(lambda: server.controller.pools["p"].backends.live == 2)
            assert eng.pools["p"].replicas == 2
            assert eng.ents["a"].lifecycle is Lifecycle.BOUND and eng.ents["b"].lifecycle is Lifecycle.BOUND
            await sims[1].stop()  # a replica dies
            await _until(lambda: eng.pools["p"].replicas == 1)
            assert eng.ents["a"].lifecycle is Lifecycle.BOUND  # first in config order keeps its baseline
            assert eng.ents["b"].lifecycle is Lifecycle.DEGRADED and eng.ents["b"].a_conc == pytest.approx(1.0)
            assert await keda.poll() == 2  # the requirement did not change: KEDA is asked to keep two
            sims[1] = SimServer(SimConfig(profile=get_profile("paper-spark"), model="m-p"))
            await sims[1].start(port=ports[1])  # it comes back
            await _until(lambda: eng.pools["p"].replicas == 2)
            assert eng.ents["b"].lifecycle is Lifecycle.BOUND and eng.ents["b"].a_conc == 3
            doc = server.controller.snapshot()["pools"]["p"]["backends"]
            assert doc["liveReplicas"] == 2 and all(e["up"] for e in doc["endpoints"])
        finally:
            await keda.close()
            await server.stop(grace=0.2)
            for sim in sims:
                await sim.stop()

    asyncio.run(run())


def test_follow_dispatches_what_the_new_capacity_admits():
    """set_replicas' events go through the adapter: a request waiting for capacity is admitted."""
    config = from_objects([pool(current=0, conc=4), {
        "apiVersion": "tokenpools.io/v1alpha1", "kind": "TokenEntitlement", "metadata": {"name": "s"},
        "spec": {"tenantId": "s", "poolRef": {"name": "p"}, "qos": {"serviceClass": "spot"}}}])  # fmt: skip
    from extproc.engine import Engine

    eng = Engine(config, 0.0)
    eng.autoscaled.add("p")
    seen = []
    ctl = Controller(eng, seen.append, clock=lambda: 1.0)
    eng.admit("r1", "s", 10, 10, 0.5)
    ctl.step(1.0)
    assert ctl.active("p") and ctl.desired("p") == 1
    ctl.follow("p", 1, 1.0)
    assert seen and seen[0].admitted == ["r1"]
    ctl.follow("p", 1, 1.0)  # no change: nothing to do
    assert len(seen) == 1


def test_hysteresis_starts_from_the_replicas_found_up():
    """Before the first scrape the controller answers without committing; once it knows 2 replicas run, it
    holds 2 until the scale-down delay has passed, although 1 is needed."""
    from extproc.engine import Engine
    from extproc.scaler.backends import Backend, Sample

    eng = Engine(from_objects([pool(current=1), guaranteed("a", 6)]), 0.0)
    urls = ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    ctl = Controller(eng, clock=lambda: 0.0, options=ControllerOptions(policy=ScalingPolicy(scale_down_delay_s=60), backends={"p": urls}))
    ctl.step(0.0)
    assert ctl.desired("p") == 1 and ctl.pools["p"].hysteresis.desired is None and not ctl.pools["p"].backends.settled
    bset = ctl.pools["p"].backends
    for u in urls:
        bset.backends[u] = Backend(u)
        bset.backends[u].record(Sample())
    bset.refreshes = 1
    ctl.follow("p", bset.live, 0.5)
    ctl.step(1.0)
    assert eng.pools["p"].replicas == 2 and ctl.desired("p") == 2
    ctl.step(30.0)
    assert ctl.desired("p") == 2
    ctl.step(61.0)
    assert ctl.desired("p") == 1
