"""The generated stubs are current, and the wire names are KEDA's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from extproc.scaler import externalscaler_pb2 as pb
from extproc.scaler import externalscaler_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("proto_generate", REPO / "proto" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_code_is_current(tmp_path):
    gen = _generator()
    written = gen.generate(tmp_path)
    assert len(written) == 2
    for path, rel in zip(written, gen.OUTPUTS):
        committed = REPO / rel
        assert committed.read_bytes() == path.read_bytes(), f"{rel} is stale: run python proto/generate.py"


def test_wire_names_are_kedas():
    svc = pb.DESCRIPTOR.services_by_name["ExternalScaler"]
    assert svc.full_name == "externalscaler.ExternalScaler"
    methods = {m.name: (m.input_type.full_name, m.output_type.full_name, m.server_streaming) for m in svc.methods}
    assert methods == {
        "IsActive": ("externalscaler.ScaledObjectRef", "externalscaler.IsActiveResponse", False),
        "StreamIsActive": ("externalscaler.ScaledObjectRef", "externalscaler.IsActiveResponse", True),
        "GetMetricSpec": ("externalscaler.ScaledObjectRef", "externalscaler.GetMetricSpecResponse", False),
        "GetMetrics": ("externalscaler.GetMetricsRequest", "externalscaler.GetMetricsResponse", False),
    }
    fields = lambda m: {f.name: (f.number, f.type) for f in m.DESCRIPTOR.fields}  # noqa: E731
    F = pb.MetricSpec.DESCRIPTOR.fields_by_name["targetSize"]
    assert fields(pb.MetricSpec) == {"metricName": (1, F.TYPE_STRING), "targetSize": (2, F.TYPE_INT64), "targetSizeFloat": (3, F.TYPE_DOUBLE)}
    assert fields(pb.MetricValue) == {"metricName": (1, F.TYPE_STRING), "metricValue": (2, F.TYPE_INT64), "metricValueFloat": (3, F.TYPE_DOUBLE)}
    assert fields(pb.GetMetricsRequest) == {"scaledObjectRef": (1, F.TYPE_MESSAGE), "metricName": (2, F.TYPE_STRING)}
    assert set(fields(pb.ScaledObjectRef)) == {"name", "namespace", "scalerMetadata"}
    assert hasattr(pb_grpc, "ExternalScalerStub") and hasattr(pb_grpc, "add_ExternalScalerServicer_to_server")


def test_a_message_from_keda_decodes():
    # ScaledObjectRef{name: "so", namespace: "ns", scalerMetadata: {"pool": "p"}} as KEDA's Go client encodes it.
    wire = b"\n\x02so\x12\x02ns\x1a\x09\n\x04pool\x12\x01p"
    ref = pb.ScaledObjectRef.FromString(wire)
    assert (ref.name, ref.namespace, dict(ref.scalerMetadata)) == ("so", "ns", {"pool": "p"})
