"""TLS on both gRPC servers (`tokenpools serve --tls-cert/--tls-key[/--tls-client-ca]`, extproc/tls.py):
a real Envoy talks to ext_proc over mutual TLS (envoy/tls-ext-proc.yaml) and serves a request; clients
without the right certificate are refused; the KEDA scaler answers IsActive over TLS."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from extproc.app import TokenpoolsServer
from extproc.config import load_text
from extproc.envoy.bootstrap import EnvoyPorts, render, with_ext_proc_tls
from extproc.scaler import externalscaler_pb2 as pb
from extproc.scaler import externalscaler_pb2_grpc as pb_grpc
from extproc.scaler.capacity import ScalingPolicy
from extproc.scaler.controller import ControllerOptions
from extproc.stack import Stack, envoy_command, free_port, wait_http, wait_port
from extproc.tls import server_credentials
from tests.envoy.harness import Running, start_server, start_standin

from .conftest import SNI

CONFIG = """
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {name: p}
spec:
  model: m-tls
  perReplica: {tokensPerSecond: 100000, concurrency: 4, kvCacheTokens: 100000}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: tls-a, labels: {tokenpools.io/demo: "true"}}
spec:
  tenantId: t
  poolRef: {name: p}
  qos: {serviceClass: guaranteed}
  resources: {concurrency: 2}
  auth: {apiKeys: [key-tls-a]}
"""
HEALTH = "/grpc.health.v1.Health/Check"
SERVING = b"\x08\x01"


def _creds(certs, client: str | None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=certs.read("ca"))
    return grpc.ssl_channel_credentials(certs.read("ca"), certs.read(f"{client}_key"), certs.read(f"{client}_cert"))


async def _health(address: str, creds: grpc.ChannelCredentials | None) -> bytes:
    opts = [("grpc.ssl_target_name_override", SNI)]  # connect to 127.0.0.1, verify the cluster DNS name
    channel = grpc.aio.secure_channel(address, creds, options=opts) if creds else grpc.aio.insecure_channel(address)
    async with channel:
        return await channel.unary_unary(HEALTH)(b"", timeout=5)


@pytest.mark.integration
def test_envoy_to_ext_proc_over_mutual_tls_serves_a_request(tmp_path, certs):
    (tmp_path / "config.yaml").write_text(CONFIG)
    r = Running(tmp_path, free_port(), free_port(), free_port(), free_port(), free_port(), Stack())
    tls = ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key), "--tls-client-ca", str(certs.ca)]
    try:
        start_standin(r.stack, tmp_path, r.upstream)
        start_server(r.stack, tmp_path, tmp_path / "config.yaml", r.ext_proc, r.status_port, tls)
        base = render(EnvoyPorts(r.listen, r.admin, r.ext_proc), [("127.0.0.1", r.upstream)])
        (tmp_path / "envoy.yaml").write_text(with_ext_proc_tls(base, SNI, str(certs.ca), str(certs.client_cert), str(certs.client_key)))
        envoy = r.stack.start("envoy", envoy_command(tmp_path / "envoy.yaml", "warning", 1), tmp_path / "envoy.log")
        wait_http(f"http://127.0.0.1:{r.admin}/ready", 30, envoy)
        wait_port(r.listen, 10, envoy)

        payload = {"model": "m-tls", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        deadline = time.monotonic() + 15
        while True:  # the first health check round may still be under way
            resp = r.post("/v1/chat/completions", payload, key="key-tls-a")
            if resp.status != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert resp.status == 200, (resp.status, resp.body, r.log_tail("envoy"), r.log_tail("tokenpools"))
        assert resp.headers.get("x-tokenpools-request-id") and resp.headers.get("ratelimit-limit") == "2"
        assert r.status()["entitlements"]["tls-a"]["admitted_total"] == 1
        assert r.post("/v1/chat/completions", payload, key="wrong").status == 401  # answered by tokenpools itself
        stats = r.request("GET", r.admin, "/stats?filter=cluster.tokenpools_ext_proc.ssl").body.decode()
        handshakes = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in stats.splitlines() if ":" in line)}
        assert int(handshakes["cluster.tokenpools_ext_proc.ssl.handshake"]) >= 1, stats

        # The same Envoy config without a client certificate: the server refuses the handshake, and Envoy
        # fails closed (503), it never passes the request on unchecked.
        port2, admin2 = free_port(), free_port()
        no_cert = with_ext_proc_tls(render(EnvoyPorts(port2, admin2, r.ext_proc), [("127.0.0.1", r.upstream)]), SNI, str(certs.ca))
        (tmp_path / "envoy2.yaml").write_text(no_cert)
        envoy2 = r.stack.start("envoy2", envoy_command(tmp_path / "envoy2.yaml", "warning", 1), tmp_path / "envoy2.log")
        wait_http(f"http://127.0.0.1:{admin2}/ready", 30, envoy2)
        wait_port(port2, 10, envoy2)
        upstream_before = r.request("GET", r.upstream, "/_stats").json()["total"]
        got = r.request("POST", port2, "/v1/chat/completions", body=json.dumps(payload).encode(),
                        headers={"authorization": "Bearer key-tls-a", "content-type": "application/json"})  # fmt: skip
        assert got.status == 503
        assert r.status()["entitlements"]["tls-a"]["admitted_total"] == 1
        assert r.request("GET", r.upstream, "/_stats").json()["total"] == upstream_before  # never reached the backend
    finally:
        r.stack.stop()


def _options() -> ControllerOptions:
    policy = ScalingPolicy(burst_cap_replicas=1.0, usage_window_s=10.0, scale_down_delay_s=1.0, scale_down_band=0.1)
    return ControllerOptions(policy=policy, period_s=0.1, wake_interval_s=0.05)


def test_mutual_tls_refuses_clients_without_the_right_certificate(certs):
    async def run():
        tls = server_credentials(str(certs.server_cert), str(certs.server_key), str(certs.ca))
        server = TokenpoolsServer(load_text(CONFIG), ext_proc_port=0, status_port=0, scaler_port=0, controller=_options(), tls=tls)
        await server.start()
        try:
            for port in (server.ext_proc_port, server.scaler_port):
                address = f"127.0.0.1:{port}"
                if port == server.ext_proc_port:
                    assert await _health(address, _creds(certs, "client")) == SERVING
                for creds in (_creds(certs, None), _creds(certs, "rogue"), None):  # no cert, wrong CA, plaintext
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await _health(address, creds)
                    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            # An ext_proc stream without a client certificate never reaches the servicer.
            opts = [("grpc.ssl_target_name_override", SNI)]
            async with grpc.aio.secure_channel(f"127.0.0.1:{server.ext_proc_port}", _creds(certs, None), options=opts) as ch:
                call = ep_grpc.ExternalProcessorStub(ch).Process(timeout=5)
                with pytest.raises(grpc.aio.AioRpcError):
                    await call.read()
            assert server.gateway.stats.streams == 0
        finally:
            await server.stop(0.1)

    asyncio.run(run())


@pytest.mark.parametrize("mutual", [True, False])
def test_keda_scaler_over_tls_answers_is_active(certs, mutual):
    async def run():
        tls = server_credentials(str(certs.server_cert), str(certs.server_key), str(certs.ca) if mutual else None)
        server = TokenpoolsServer(load_text(CONFIG), ext_proc_port=0, status_port=0, scaler_port=0, controller=_options(), tls=tls)
        await server.start()
        try:
            # KEDA's external-push trigger with TriggerAuthentication caCert (+ tlsClientCert/tlsClientKey for mTLS);
            # it checks the server certificate against the host of scalerAddress.
            creds = _creds(certs, "client" if mutual else None)
            opts = [("grpc.ssl_target_name_override", SNI)]
            async with grpc.aio.secure_channel(f"127.0.0.1:{server.scaler_port}", creds, options=opts) as ch:
                stub = pb_grpc.ExternalScalerStub(ch)
                ref = pb.ScaledObjectRef(name="vllm", namespace="tokenpools",
                                         scalerMetadata={"scalerAddress": f"{SNI}:9003", "pool": "p"})  # fmt: skip
                assert (await stub.IsActive(ref, timeout=5)).result is True  # one replica: active
                spec = await stub.GetMetricSpec(ref, timeout=5)
                assert spec.metricSpecs[0].metricName == "tokenpools-p-concurrency"
            with pytest.raises(grpc.aio.AioRpcError):  # plaintext is not served next to TLS
                async with grpc.aio.insecure_channel(f"127.0.0.1:{server.scaler_port}") as ch:
                    await pb_grpc.ExternalScalerStub(ch).IsActive(ref, timeout=5)
        finally:
            await server.stop(0.1)

    asyncio.run(run())


def test_serve_refuses_half_a_tls_configuration(certs):
    from click.testing import CliRunner

    from extproc.app import serve_command

    for args in (["--tls-cert", str(certs.server_cert)], ["--tls-key", str(certs.server_key)],
                 ["--tls-client-ca", str(certs.ca)]):  # fmt: skip
        result = CliRunner().invoke(serve_command, args)
        assert result.exit_code == 2 and "--tls-cert and --tls-key go together" in result.output, result.output
