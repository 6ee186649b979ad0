"""A stand-in for KEDA's operator: a client generated from the same proto, doing what KEDA and the HPA do.

KEDA (pkg/scalers/external_scaler.go, v2.20): GetMetricSpec → the HPA target (targetSizeFloat when > 0, else
targetSize); GetMetrics → the metric value (metricValueFloat when > 0, else metricValue), then IsActive; with
`external-push` it also holds StreamIsActive open and scales on every message. The HPA, for an AverageValue
external metric: desired = ceil(metric / target), unless metric / (target × current) is within 10 % of 1
(its default tolerance), clamped to the ScaledObject's min/max; at 0 replicas KEDA activates to 1 when
IsActive is true.
"""

from __future__ import annotations

import asyncio
import math
import time

import grpc

from extproc.scaler import externalscaler_pb2 as pb
from extproc.scaler import externalscaler_pb2_grpc as pb_grpc

TOLERANCE = 0.1


def hpa_desired(metric: float, target: float, current: int, lo: int, hi: int) -> int:
    if current > 0 and abs(metric / (target * current) - 1.0) <= TOLERANCE:
        want = current
    else:
        want = math.ceil(metric / target)
    return min(max(want, lo), hi)


class Keda:
    def __init__(self, address: str, pool: str, dimension: str | None = None, lo: int = 0, hi: int = 100) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.ExternalScalerStub(self.channel)
        meta = {"scalerAddress": address, "pool": pool}
        if dimension:
            meta["dimension"] = dimension
        self.ref = pb.ScaledObjectRef(name="vllm", namespace="tokenpools", scalerMetadata=meta)
        self.lo, self.hi = lo, hi
        self.replicas = 0

    async def close(self) -> None:
        await self.channel.close()

    async def spec(self) -> tuple[str, float]:
        resp = await asyncio.wait_for(self.stub.GetMetricSpec(self.ref), 5)
        (spec,) = resp.metricSpecs
        return spec.metricName, spec.targetSizeFloat if spec.targetSizeFloat > 0 else float(spec.targetSize)

    async def metric(self, name: str) -> float:
        # KEDA passes the name without its "sN-" prefix.
        resp = await asyncio.wait_for(self.stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=self.ref, metricName=name)), 5)
        (mv,) = resp.metricValues
        return mv.metricValueFloat if mv.metricValueFloat > 0 else float(mv.metricValue)

    async def is_active(self) -> bool:
        return (await asyncio.wait_for(self.stub.IsActive(self.ref), 5)).result

    async def poll(self) -> int:
        """One polling interval: what replica count KEDA + HPA would set now (and remember it as current)."""
        name, target = await self.spec()
        value = await self.metric(name)
        active = await self.is_active()
        if self.replicas == 0:
            self.replicas = max(1, self.lo) if active else self.lo
        else:
            self.replicas = hpa_desired(value, target, self.replicas, self.lo, self.hi)
            if not active and self.lo == 0:
                self.replicas = 0  # (after cooldownPeriod, in KEDA)
        return self.replicas

    async def stream(self, sink: list[tuple[float, bool]]) -> None:
        """StreamIsActive until cancelled, recording (monotonic time, value) for every message."""
        call = self.stub.StreamIsActive(self.ref)
        try:
            async for msg in call:
                sink.append((time.monotonic(), msg.result))
        finally:
            call.cancel()
