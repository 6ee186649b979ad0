"""`tokenpools serve` as a process: the telemetry options, GET /metrics, and JSON log lines on stderr."""

from __future__ import annotations

import asyncio
import subprocess
import urllib.request

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from extproc.stack import free_port, serve_command_line, wait_http

from .driver import CONFIG, _open, _read

pytestmark = pytest.mark.integration


async def _reject(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        held = await _open(stub, "k-n", "m-noq")
        await _read(held, 2)
        (reply,) = await _read(await _open(stub, "k-n", "m-noq"))
        held.cancel()
        return reply.immediate_response.status.code


def test_serve_options_metrics_and_json_logs(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    log = tmp_path / "serve.log"
    ext_proc, status = free_port(), free_port()
    cmd = serve_command_line(str(config), ext_proc, status, [
        "--log-format", "json", "--log-level", "info", "--metrics-max-entitlements", "1"])  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{status}/healthz", 30, proc)
        assert asyncio.run(_reject(ext_proc)) == 429
        with urllib.request.urlopen(f"http://127.0.0.1:{status}/metrics", timeout=5) as r:
            fams = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    finally:
        proc.terminate()
        proc.wait(10)
    decisions = {(s.labels["result"], s.labels["entitlement"]): s.value for s in fams["tokenpools_decisions"].samples}
    assert decisions == {("admit", "n"): 1, ("reject", "n"): 1}
    # One entitlement label: n (seen first); a becomes `other`.
    assert {s.labels["entitlement"] for s in fams["tokenpools_entitlement_queued"].samples} == {"n", "other"}
    assert {s.labels["pool"] for s in fams["tokenpools_desired_replicas"].samples} == {"p", "noq"}

    text = log.read_text()
    lines = [orjson.loads(line) for line in text.splitlines() if line.startswith("{")]
    (rejected,) = [line for line in lines if line["event"] == "rejected"]
    assert rejected["level"] == "info" and rejected["logger"] == "tokenpools.envoy" and len(rejected["rid"]) == 32
    assert not [line for line in lines if line["level"] == "debug"]
    assert "k-n" not in text and "Bearer" not in text
