"""KEDA external scaler (gRPC `externalscaler.ExternalScaler`), served from the controller's decisions.

The ScaledObject's trigger metadata names the pool (`pool: paper-spark`) and optionally the dimension the
metric is expressed in (`dimension: concurrency` (default) | tokensPerSecond | kvCacheTokens). With
`metricType: AverageValue` (KEDA's default):

    target (GetMetricSpec) = one replica's capacity in that dimension          e.g. 16 sequences
    metric (GetMetrics)    = the capacity the controller wants provisioned     e.g. 48 sequences
                           = desired replicas × target
    KEDA/HPA:  desired replicas = ceil(metric / target)                        → 3

The metric is the pool's required capacity after taking the largest of the three dimensions, clamping to the
pool's replicas.min/max and hysteresis — rounded up to whole replicas, so the HPA lands exactly on the
controller's answer (the raw required capacity per dimension is in /status/scaler). Both the int64 and the
double field are filled: KEDA reads the double only when it is > 0.

IsActive / StreamIsActive: true while the controller asks for at least one replica (reserved baselines, use,
demand, or work queued for a pool at zero). StreamIsActive sends the current value when the stream opens and
then every change at once.
"""

from __future__ import annotations

import math
import re

import grpc

from . import externalscaler_pb2 as pb
from . import externalscaler_pb2_grpc as pb_grpc
from .capacity import DIMENSIONS
from .controller import Controller

DEFAULT_DIMENSION = "concurrency"
_INDEX_PREFIX = re.compile(r"^s\d+-")  # KEDA's per-trigger prefix, should it ever be passed through


def metric_name(pool: str, dimension: str) -> str:
    return f"tokenpools-{pool}-{dimension.lower()}"


class ScalerServicer(pb_grpc.ExternalScalerServicer):
    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    async def _target(self, ref: pb.ScaledObjectRef, context: grpc.aio.ServicerContext) -> tuple[str, str]:
        meta = dict(ref.scalerMetadata)
        pool = meta.get("pool", "")
        if not pool:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "scalerMetadata.pool is required (the TokenPool name)")
        if not self.controller.known(pool):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no TokenPool named {pool!r}")
        self.controller.watched(pool)
        dimension = meta.get("dimension", DEFAULT_DIMENSION)
        if dimension not in DIMENSIONS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"scalerMetadata.dimension {dimension!r}: expected one of {', '.join(DIMENSIONS)}",
            )
        return pool, dimension

    async def IsActive(self, request, context):
        pool, _ = await self._target(request, context)
        return pb.IsActiveResponse(result=self.controller.active(pool))

    async def StreamIsActive(self, request, context):
        pool, _ = await self._target(request, context)
        q = self.controller.subscribe(pool)
        try:
            last = self.controller.active(pool)
            yield pb.IsActiveResponse(result=last)
            while True:
                active = await q.get()
                while not q.empty():  # only the latest state matters
                    active = q.get_nowait()
                if active != last:
                    last = active
                    yield pb.IsActiveResponse(result=active)
        finally:
            self.controller.unsubscribe(pool, q)

    async def GetMetricSpec(self, request, context):
        pool, dimension = await self._target(request, context)
        target = self.controller.per_replica(pool, dimension)
        spec = pb.MetricSpec(metricName=metric_name(pool, dimension), targetSize=max(1, round(target)), targetSizeFloat=target)
        return pb.GetMetricSpecResponse(metricSpecs=[spec])

    async def GetMetrics(self, request, context):
        pool, dimension = await self._target(request.scaledObjectRef, context)
        value = self.controller.desired(pool) * self.controller.per_replica(pool, dimension)
        name = _INDEX_PREFIX.sub("", request.metricName) or metric_name(pool, dimension)
        mv = pb.MetricValue(metricName=name, metricValue=math.ceil(value), metricValueFloat=value)
        return pb.GetMetricsResponse(metricValues=[mv])


def add_to_server(controller: Controller, server: grpc.aio.Server) -> ScalerServicer:
    servicer = ScalerServicer(controller)
    pb_grpc.add_ExternalScalerServicer_to_server(servicer, server)
    return servicer
