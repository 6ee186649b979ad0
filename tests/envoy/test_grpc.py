"""The gRPC server in-process (no Envoy): stream teardown releases, health check, /status."""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc.app import TokenpoolsServer
from extproc.config import load_text

from .extproc_msgs import CONFIG, chat, kinds, request_body, request_headers


async def _status(server: TokenpoolsServer) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        async with s.get(f"http://127.0.0.1:{server.status_port}/status") as r:
            assert r.status == 200
            return await r.json()


async def _wait(pred, timeout: float = 3.0):
    async with asyncio.timeout(timeout):
        while not await pred():
            await asyncio.sleep(0.02)


async def _scenario():
    server = TokenpoolsServer(load_text(CONFIG), ext_proc_port=0, status_port=0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.ext_proc_port}") as channel:
            health = channel.unary_unary("/grpc.health.v1.Health/Check")
            assert await asyncio.wait_for(health(b""), 5) == b"\x08\x01"  # SERVING

            stub = pb_grpc.ExternalProcessorStub(channel)
            # 1. Admitted, then the stream is cancelled (what Envoy does when the client goes away).
            first = stub.Process()
            await first.write(request_headers())
            await first.write(request_body(chat(max_tokens=3)))
            got = [await asyncio.wait_for(first.read(), 5) for _ in range(2)]
            assert kinds(got) == ["request_headers", "request_body"]
            # 2. A second request queues behind it: no answer while held.
            second = stub.Process()
            await second.write(request_headers())
            await second.write(request_body(chat(max_tokens=3)))

            async def queued():
                return (await _status(server))["entitlements"]["g1"]["queued"] == 1

            await _wait(queued)
            first.cancel()
            # The first's reservation is released in the handler's finally; the waiter is admitted at once.
            got = [await asyncio.wait_for(second.read(), 5) for _ in range(2)]
            assert kinds(got) == ["request_headers", "request_body"]
            # 3. The held request's client goes away too: nothing is left in flight.
            second.cancel()

            async def idle():
                e = (await _status(server))["entitlements"]["g1"]
                return e["in_flight"] == 0 and e["reserved_kv_tokens"] == 0 and e["queued"] == 0

            await _wait(idle)
            assert server.gateway.live == {} and server.engine.duplicate_releases == 0
            assert server.gateway.stats.released == 2
    finally:
        await server.stop(grace=0.5)


def test_stream_teardown_releases_and_admits_the_waiter():
    asyncio.run(_scenario())


async def _queued_cancel():
    server = TokenpoolsServer(load_text(CONFIG), ext_proc_port=0, status_port=0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.ext_proc_port}") as channel:
            stub = pb_grpc.ExternalProcessorStub(channel)
            hold = stub.Process()
            await hold.write(request_headers())
            await hold.write(request_body(chat()))
            await asyncio.wait_for(hold.read(), 5)
            waiter = stub.Process()
            await waiter.write(request_headers())
            await waiter.write(request_body(chat()))

            async def queued():
                return (await _status(server))["entitlements"]["g1"]["queued"] == 1

            await _wait(queued)
            waiter.cancel()

            async def gone():
                return (await _status(server))["entitlements"]["g1"]["queued"] == 0

            await _wait(gone, 1.0)
            assert (await _status(server))["entitlements"]["g1"]["in_flight"] == 1  # the holder is untouched
            hold.cancel()
    finally:
        await server.stop(grace=0.5)


def test_cancel_while_queued_leaves_the_queue():
    asyncio.run(_queued_cancel())
