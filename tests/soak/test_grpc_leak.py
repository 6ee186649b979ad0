"""Known leak, found by the soak (bench/results/soak/): the server's RSS grows by a few hundred bytes per
ext_proc stream that ends while a read is still pending, i.e. every stream, since Envoy resets the stream
after our last response (and the servicer's reader task is cancelled when the exchange is done).

It is native memory (tracemalloc sees no Python growth, malloc_trim returns nothing), and it reproduces with
grpc.aio alone, no tokenpools code: a bidi handler whose read fails because the client reset the call leaks
~120 bytes per call, one that leaves no read pending ~25. This matches grpc/grpc#43360 ("aio leaks a batch's
grpc_op array when the batch fails or its awaiter is cancelled"; fix proposed in grpc/grpc#43361), present in
grpcio 1.85.3. Through Envoy it is ~850 bytes per request answered at once (401 / 429) and ~200 per admitted
request. This test fails (xfail strict) until grpcio or extproc/envoy/service.py avoids it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from tests.envoy.extproc_msgs import CONFIG, request_headers

REPO = Path(__file__).resolve().parents[2]
STREAMS = 20_000
WARM = 4_000
MAX_BYTES_PER_STREAM = 48  # grpc.aio's own steady growth with no failed read is ~25 bytes per call here

pytestmark = pytest.mark.integration


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.xfail(strict=True, reason="native leak per ext_proc stream torn down with a read pending (grpc/grpc#43360)")
def test_streams_answered_at_once_do_not_grow_the_server(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    server = subprocess.Popen([sys.executable, "-m", "bench.load.server", "--config", str(config)], cwd=REPO,
                              stdout=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        port = int(server.stdout.readline().split()[1])

        async def run() -> tuple[int, int]:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.ExternalProcessorStub(channel)

                async def one() -> None:  # what Envoy does for an unknown key: headers, the 401, reset
                    call = stub.Process()
                    await call.write(request_headers(key="unknown-key"))
                    await asyncio.wait_for(call.read(), 10)
                    call.cancel()

                warm = 0
                for i in range(STREAMS // 10):
                    await asyncio.gather(*(one() for _ in range(10)))
                    if (i + 1) * 10 == WARM:
                        await asyncio.sleep(0.2)
                        warm = _rss_kib(server.pid)
                await asyncio.sleep(0.5)
                return warm, _rss_kib(server.pid)

        warm, end = asyncio.run(run())
        per_stream = (end - warm) * 1024 / (STREAMS - WARM)
        assert per_stream < MAX_BYTES_PER_STREAM, f"{per_stream:.0f} bytes per stream ({warm} -> {end} KiB)"
    finally:
        server.kill()
        server.wait(5)
