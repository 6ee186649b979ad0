"""KEDA's side of the contract, against `tokenpools serve` started in-process on free ports."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import grpc
import pytest

from extproc.app import TokenpoolsServer
from extproc.config import from_objects
from extproc.scaler import externalscaler_pb2 as pb
from extproc.scaler.capacity import ScalingPolicy
from extproc.scaler.controller import ControllerOptions

from .keda import Keda

REPO = Path(__file__).resolve().parents[2]
DELAY = 1.0  # scale-down delay for the tests


def pool(name="p", min_=0, max_=4, current=1, conc=16):
    return {
        "apiVersion": "tokenpools.io/v1alpha1", "kind": "TokenPool", "metadata": {"name": name},
        "spec": {"model": f"m-{name}", "replicas": {"min": min_, "max": max_, "current": current},
                 "perReplica": {"tokensPerSecond": 480, "concurrency": conc, "kvCacheTokens": 32768}},
    }  # fmt: skip


def guaranteed(name, conc=6, pool_name="p"):
    return {
        "apiVersion": "tokenpools.io/v1alpha1", "kind": "TokenEntitlement", "metadata": {"name": name},
        "spec": {"tenantId": name, "poolRef": {"name": pool_name}, "qos": {"serviceClass": "guaranteed"},
                 "resources": {"concurrency": conc}},
    }  # fmt: skip


def options(**kw) -> ControllerOptions:
    policy = ScalingPolicy(burst_cap_replicas=1.0, usage_window_s=10.0, scale_down_delay_s=DELAY, scale_down_band=0.1)
    return ControllerOptions(policy=policy, period_s=0.1, wake_interval_s=0.05, **kw)


async def started(config, **kw) -> TokenpoolsServer:
    server = TokenpoolsServer(config, ext_proc_port=0, status_port=0, scaler_port=0, controller=options(**kw))
    await server.start()
    return server


def test_metric_spec_metrics_and_activity():
    async def run():
        server = await started(from_objects([pool(), guaranteed("g1")]))
        keda = Keda(f"127.0.0.1:{server.scaler_port}", "p")
        try:
            name, target = await keda.spec()
            assert (name, target) == ("tokenpools-p-concurrency", 16.0)
            raw = await keda.stub.GetMetricSpec(keda.ref)
            assert raw.metricSpecs[0].targetSize == 16  # the int field too (older KEDA reads it)
            resp = await keda.stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=keda.ref, metricName=name))
            (mv,) = resp.metricValues
            assert (mv.metricName, mv.metricValue, mv.metricValueFloat) == (name, 16, 16.0)  # 1 replica × 16
            # KEDA may hand back the name with its per-trigger prefix: answered all the same.
            resp = await keda.stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=keda.ref, metricName="s0-" + name))
            assert resp.metricValues[0].metricName == name
            assert await keda.is_active() is True
            tps = Keda(f"127.0.0.1:{server.scaler_port}", "p", dimension="tokensPerSecond")
            name, target = await tps.spec()
            assert (name, target) == ("tokenpools-p-tokenspersecond", 480.0) and await tps.metric(name) == 480.0
            await tps.close()
            assert server.engine.autoscaled == {"p"}  # KEDA asked: the pool now waits for replicas at zero
            # Refusals KEDA would log.
            stub = keda.stub
            for meta, code in (({}, grpc.StatusCode.INVALID_ARGUMENT), ({"pool": "nope"}, grpc.StatusCode.NOT_FOUND),
                               ({"pool": "p", "dimension": "gpus"}, grpc.StatusCode.INVALID_ARGUMENT)):  # fmt: skip
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.IsActive(pb.ScaledObjectRef(name="x", scalerMetadata=meta))
                assert err.value.code() is code
            # /status/scaler says how the number came about.
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{server.status_port}/status/scaler") as r:
                    doc = await r.json()
            p = doc["pools"]["p"]
            assert p["desiredReplicas"] == 1 and p["requirement"]["reserved"]["concurrency"] == 6
            assert doc["scalerPort"] == server.scaler_port
        finally:
            await keda.close()
            await server.stop(grace=0.2)

    asyncio.run(run())


def test_guaranteed_entitlements_come_and_go_and_replicas_follow_without_flapping():
    """KEDA polls every 0.1 s while guaranteed entitlements are added and removed (engine.apply through
    server.reload): the HPA's replica count follows Σ baselines / 16 per replica, up at once, down after the
    delay, and changes only when the requirement crosses a replica boundary."""
    base = [pool(current=1)]
    steps = [  # (entitlements, replicas they need)
        (["g1"], 1),  # 6
        (["g1", "g2"], 1),  # 12
        (["g1", "g2", "g3"], 2),  # 18
        (["g1", "g2", "g3", "g4", "g5"], 2),  # 30
        (["g1", "g2", "g3", "g4", "g5", "g6"], 3),  # 36
        (["g1", "g2", "g3", "g4"], 2),  # 24
        (["g1"], 1),  # 6
        ([], 0),  # nothing reserved: scale to zero (min 0)
        (["g1", "g2", "g3"], 2),
    ]

    async def run():
        server = await started(from_objects(base + [guaranteed("g1")]))
        keda = Keda(f"127.0.0.1:{server.scaler_port}", "p", lo=0, hi=4)
        keda.replicas = 1
        pushes: list[tuple[float, bool]] = []
        stream = asyncio.create_task(keda.stream(pushes))
        seen: list[tuple[float, int]] = []
        try:
            for names, want in steps:
                server.reload(from_objects(base + [guaranteed(n) for n in names]))
                changed = time.monotonic()
                deadline = changed + DELAY + 3.0
                while True:
                    got = await keda.poll()
                    now = time.monotonic()
                    if not seen or seen[-1][1] != got:
                        seen.append((now, got))
                    if got == want and now - changed > 0.3:
                        break
                    assert now < deadline, f"{names}: KEDA still at {got}, want {want}; seen {seen}"
                    await asyncio.sleep(0.1)
                # The capacity follows (as a Deployment would): the engine now has what KEDA set.
                server.controller.follow("p", got)
                if got < (seen[-2][1] if len(seen) > 1 else got):
                    assert now - changed >= DELAY - 0.15, "scaled down before the delay"
                # Stay a while: nothing moves while the entitlements stay put.
                for _ in range(4):
                    assert await keda.poll() == want
                    await asyncio.sleep(0.1)
            counts = [n for _, n in seen]
            # Every change is a real one (no flapping). From zero KEDA activates to 1 replica, then the HPA
            # reads the metric and goes to 2: the controller itself asked for 2 at once.
            assert counts == [1, 2, 3, 2, 1, 0, 1, 2], counts
            changes = [c["desiredReplicas"] for c in server.controller.snapshot()["pools"]["p"]["changes"]]
            assert changes == [1, 2, 3, 2, 1, 0, 2], changes
            assert [v for _, v in pushes] == [True, False, True], pushes
        finally:
            stream.cancel()
            await asyncio.gather(stream, return_exceptions=True)
            await keda.close()
            await server.stop(grace=0.2)

    asyncio.run(run())


def test_tokenpools_serve_command_serves_the_scaler(tmp_path):
    """The real command line: `tokenpools serve --scaler-port 0` answers KEDA and stops on SIGTERM."""
    cfg = tmp_path / "c.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump_all([pool(), guaranteed("g1", 20)]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc.cli", "serve", "--config", str(cfg), "--ext-proc-port", "0",
         "--status-port", "0", "--scaler-port", "0", "--backend", "http://127.0.0.1:9", "--log-level", "warning"],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = ""
        deadline = time.monotonic() + 20
        while "KEDA scaler gRPC on" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, line
            line = proc.stderr.readline()
        port = int(re.search(r"KEDA scaler gRPC on 127\.0\.0\.1:(\d+)", line).group(1))
        assert "backends: p=1" in line

        async def ask():
            keda = Keda(f"127.0.0.1:{port}", "p")
            try:
                name, target = await keda.spec()
                return target, await keda.metric(name), await keda.is_active()
            finally:
                await keda.close()

        assert asyncio.run(ask()) == (16.0, 32.0, True)  # 20 reserved sequences: 2 replicas of 16
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
