"""--otlp-endpoint: the same counters, gauges and histograms reach an OTLP/gRPC collector (a stub here)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as ms_grpc

from extproc.app import TokenpoolsServer
from extproc.config import load_text
from extproc.telemetry.metrics import TelemetryOptions

from .driver import CONFIG


class Collector(ms_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.metrics: dict[str, object] = {}

    async def Export(self, request, context):  # noqa: N802 (gRPC method name)
        for rm in request.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    self.metrics[m.name] = m
        return ms.ExportMetricsServiceResponse()


async def _export() -> dict:
    collector = Collector()
    grpc_server = grpc.aio.server()
    ms_grpc.add_MetricsServiceServicer_to_server(collector, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        options = TelemetryOptions(otlp_endpoint=f"http://127.0.0.1:{port}", otlp_interval_s=60)
        server = TokenpoolsServer(load_text(CONFIG), ext_proc_port=0, status_port=0, telemetry=options)
        await server.start()
        rec = server.gateway.telemetry
        who = rec.who("a", "guaranteed")
        rec.decided(who, "reject", "queue_full", 0.0001)
        rec.dequeued(who, "admit", "none", 0.2)
        await asyncio.sleep(0.1)
        await server.stop(grace=0.1)  # shuts the provider down: one last export
    finally:
        await grpc_server.stop(0)
    return collector.metrics


def test_otlp_export_has_counters_gauges_and_histograms():
    try:
        import opentelemetry.exporter.otlp.proto.grpc.metric_exporter  # noqa: F401
    except ImportError as exc:  # a .venv built before the Makefile reinstalls opentelemetry-proto after xds-protos
        pytest.skip(f"OTLP exporter does not import in this .venv ({exc}); rebuild it with make")
    got = asyncio.run(_export())
    assert {"tokenpools_decisions", "tokenpools_pool_capacity", "tokenpools_queue_wait_seconds",
            "tokenpools_decision_latency_seconds"} <= set(got)  # fmt: skip
    points = {
        tuple(a.value.string_value for a in sorted(p.attributes, key=lambda a: a.key)): p.as_int
        for p in got["tokenpools_decisions"].sum.data_points
    }  # (class, entitlement, reason, result) -> count
    assert points == {("guaranteed", "a", "queue_full", "reject"): 1, ("guaranteed", "a", "none", "admit"): 1}
    (h,) = got["tokenpools_queue_wait_seconds"].histogram.data_points
    assert h.count == 1 and abs(h.sum - 0.2) < 1e-9 and len(h.bucket_counts) == len(h.explicit_bounds) + 1
    assert len(got["tokenpools_pool_capacity"].gauge.data_points) == 6  # 2 pools x 3 dimensions
