"""A TokenpoolsServer driven through its ext_proc gRPC service (no Envoy), then scraped at GET /metrics."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp
import grpc
import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from extproc.app import TokenpoolsServer
from extproc.config import load_text
from extproc.telemetry.metrics import TelemetryOptions
from tests.envoy.extproc_msgs import chat, request_body, request_headers, response_body, response_headers

# p: one slot, a short queue (queue then admit, queue timeout); noq: one slot, no queue (immediate 429).
CONFIG = """
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {name: p}
spec:
  model: m-p
  perReplica: {tokensPerSecond: 1000000, concurrency: 1, kvCacheTokens: 100000}
  queue: {timeoutSeconds: 1.0}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {name: noq}
spec:
  model: m-noq
  perReplica: {tokensPerSecond: 1000000, concurrency: 1, kvCacheTokens: 100000}
  queue: {maxQueued: 0}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: a, labels: {tokenpools.io/demo: "true"}}
spec:
  tenantId: t1
  poolRef: {name: p}
  qos: {serviceClass: guaranteed}
  resources: {concurrency: 1}
  auth: {apiKeys: [k-a]}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: n, labels: {tokenpools.io/demo: "true"}}
spec:
  tenantId: t2
  poolRef: {name: noq}
  qos: {serviceClass: spot}
  burst: {concurrency: 1}
  auth: {apiKeys: [k-n]}
"""


def sse_usage(prompt_tokens: int, completion_tokens: int) -> bytes:
    c = {"choices": [{"delta": {"content": "x"}}], "usage": None}
    u = {"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}}
    return b"".join(b"data: " + orjson.dumps(o) + b"\n\n" for o in (c, c, u)) + b"data: [DONE]\n\n"


@dataclass
class Outcome:
    statuses: list[int] = field(default_factory=list)  # immediate replies the clients saw
    text: str = ""  # the /metrics body
    families: dict = field(default_factory=dict)  # name -> prometheus_client Metric
    content_type: str = ""
    concurrent: list[str] = field(default_factory=list)  # three more scrapes, made at the same time


async def _read(call, n: int = 1) -> list:
    return [await asyncio.wait_for(call.read(), 5) for _ in range(n)]


async def _open(stub, key: str, model: str):
    call = stub.Process()
    await call.write(request_headers(key))
    await call.write(request_body(chat(model=model, max_tokens=3, stream=True)))
    return call


async def _complete(call, prompt_tokens: int, completion_tokens: int) -> None:
    await call.write(response_headers(200, "text/event-stream"))
    await _read(call)
    await call.write(response_body(sse_usage(prompt_tokens, completion_tokens), True))
    await _read(call)
    await call.done_writing()


async def scrape(server: TokenpoolsServer) -> tuple[str, str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        async with s.get(f"http://127.0.0.1:{server.status_port}/metrics") as r:
            assert r.status == 200
            return await r.text(), r.headers["Content-Type"]


async def _until(pred, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.01)


async def scenario(telemetry: TelemetryOptions | None = None) -> Outcome:
    """a: admit+finish (usage 9/2), admit+hold, queue → admitted, queue → timeout 429, finish (usage 7/3);
    n: admit+hold, two immediate 429s, then released. 7 engine decisions at admission, 3 client-visible 429s."""
    out = Outcome()
    server = TokenpoolsServer(load_text(CONFIG), ext_proc_port=0, status_port=0, scaler_port=0, telemetry=telemetry)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.ext_proc_port}") as channel:
            stub = pb_grpc.ExternalProcessorStub(channel)
            ents = lambda: server.engine.snapshot(server.clock())["entitlements"]  # noqa: E731

            first = await _open(stub, "k-a", "m-p")
            await _read(first, 2)
            await _complete(first, 9, 2)
            await _until(lambda: ents()["a"]["in_flight"] == 0)

            hold = await _open(stub, "k-a", "m-p")
            await _read(hold, 2)
            waiter = await _open(stub, "k-a", "m-p")
            await _until(lambda: ents()["a"]["queued"] == 1)
            await asyncio.sleep(0.05)  # a measurable queue wait
            await _complete(hold, 5, 1)
            await _read(waiter, 2)  # admitted from the queue
            late = await _open(stub, "k-a", "m-p")
            (reply,) = await _read(late)  # queue deadline (1 s): 429
            out.statuses.append(reply.immediate_response.status.code)
            await _complete(waiter, 7, 3)

            held = await _open(stub, "k-n", "m-noq")
            await _read(held, 2)
            for _ in range(2):
                (reply,) = await _read(await _open(stub, "k-n", "m-noq"))
                out.statuses.append(reply.immediate_response.status.code)
            held.cancel()
            await _until(lambda: ents()["n"]["in_flight"] == 0 and ents()["a"]["in_flight"] == 0)
        out.text, out.content_type = await scrape(server)
        out.concurrent = [text for text, _ in await asyncio.gather(*(scrape(server) for _ in range(3)))]
    finally:
        await server.stop(grace=0.5)
    out.families = {f.name: f for f in text_string_to_metric_families(out.text)}
    return out


def run_scenario(telemetry: TelemetryOptions | None = None) -> Outcome:
    return asyncio.run(scenario(telemetry))
