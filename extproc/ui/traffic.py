"""A small ext_proc load generator: talks to a tokenpools server the way Envoy does, so /status has something to
show (bench/screenshot.py, tests/ui). No backend: an admitted request "runs" for `hold_s`, then its response
(non-streamed, with exact usage) is sent through the same stream, so metering and release happen as in real
use. A 429 makes the user wait its Retry-After (capped) before the next request.

    await drive(port, {"demo-key-a": 8, "demo-key-b": 14}, seconds=5, model="qwen3-8b")
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter

import grpc
import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc


def _headers(items: dict[str, str], eos: bool = False) -> pb.HttpHeaders:
    hm = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in items.items()])
    return pb.HttpHeaders(headers=hm, end_of_stream=eos)


async def one_request(stub, key: str, model: str, max_tokens: int, hold_s: float, timeout: float = 15.0) -> tuple[str, float]:
    """One chat completion through ext_proc. Returns ("admitted", 0) or ("rejected", retry_after_s)."""
    call = stub.Process()
    try:
        h = {":method": "POST", ":path": "/v1/chat/completions", ":authority": "tokenpools", "content-type": "application/json",
             "authorization": f"Bearer {key}"}  # fmt: skip
        body = {"model": model, "messages": [{"role": "user", "content": "Hello " * 20}], "max_tokens": max_tokens}
        await call.write(pb.ProcessingRequest(request_headers=_headers(h)))
        await call.write(pb.ProcessingRequest(request_body=pb.HttpBody(body=orjson.dumps(body), end_of_stream=True)))
        first = await asyncio.wait_for(call.read(), timeout)  # held here while queued
        if first is grpc.aio.EOF or first.WhichOneof("response") == "immediate_response":
            retry = 1.0
            if first is not grpc.aio.EOF:
                for hv in first.immediate_response.headers.set_headers:
                    if hv.header.key.lower() == "retry-after":
                        try:
                            retry = float((hv.header.raw_value or hv.header.value.encode()).decode())
                        except ValueError:
                            pass
            return "rejected", retry
        await asyncio.wait_for(call.read(), timeout)  # the request_body answer
        await asyncio.sleep(hold_s)
        await call.write(pb.ProcessingRequest(response_headers=_headers({":status": "200", "content-type": "application/json"})))
        await asyncio.wait_for(call.read(), timeout)
        usage = {"id": "x", "choices": [{"message": {"content": "ok"}}],
                 "usage": {"prompt_tokens": 30, "completion_tokens": max_tokens}}  # fmt: skip
        await call.write(pb.ProcessingRequest(response_body=pb.HttpBody(body=orjson.dumps(usage), end_of_stream=True)))
        await asyncio.wait_for(call.read(), timeout)
        await call.done_writing()
        return "admitted", 0.0
    finally:
        call.cancel()


async def drive(
    port: int,
    users: dict[str, int],
    seconds: float,
    model: str = "qwen3-8b",
    max_tokens: int = 64,
    hold_s: float = 0.8,
    max_retry_s: float = 0.5,
    host: str = "127.0.0.1",
) -> Counter:
    """Closed-loop users per API key for `seconds`; returns counts of outcomes per (key, outcome)."""
    out: Counter = Counter()
    deadline = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)

        async def user(key: str, i: int) -> None:
            await asyncio.sleep(0.02 * i)
            for n in itertools.count():
                if time.monotonic() >= deadline:
                    return
                try:
                    what, retry = await one_request(stub, key, model, max_tokens, hold_s * (0.7 + 0.6 * ((i + n) % 5) / 4))
                except (grpc.aio.AioRpcError, asyncio.TimeoutError):
                    what, retry = "error", 0.2
                out[(key, what)] += 1
                if retry:
                    await asyncio.sleep(min(retry, max_retry_s))

        await asyncio.gather(*(user(k, i) for k, n in users.items() for i in range(n)))
    return out
