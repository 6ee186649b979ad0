"""The load generator: its own process, uvloop, raw HTTP/1.1 keep-alive connections (no client library in
the way), closed loop: `concurrency` connections each send the next request as soon as the last one ended.

`python -m bench.load.gen '<json spec>'` prints one JSON document: counts, statuses, TTFT / inter-chunk /
latency percentiles (ms), requests/s, and its own CPU time (so the caller can show its headroom).

spec: {"port", "concurrency", "duration", "warmup", "stagger", "stream", "max_tokens", "key", "model", "prompt_bytes"}
TTFT = request written → first body chunk (the backend sends the first token at once). Inter-chunk = gaps
between body chunks of one stream after the first (the backend spaces tokens by a fixed interval).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import orjson

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime (fields 14, 15)


def rss_kib(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def percentiles(values: list[float], qs=(50, 90, 99, 99.9)) -> dict[str, float | None]:
    if not values:
        return {f"p{q}": None for q in qs}
    s = sorted(values)
    n = len(s)
    return {f"p{q}": round(s[min(n - 1, int(q / 100 * n))] * 1000, 3) for q in qs}


async def read_head(reader: asyncio.StreamReader) -> tuple[str, bytes, bool]:
    """(status, lower-cased head, connection: close) of an HTTP/1.1 response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    return head[9:12].decode(), lower, b"connection: close" in lower


def is_chunked(lower_head: bytes) -> bool:
    return b"transfer-encoding: chunked" in lower_head


async def read_chunk(reader: asyncio.StreamReader) -> bytes | None:
    """The next chunk of a chunked body (with its trailing CRLF), or None after the last one."""
    line = await reader.readuntil(b"\r\n")
    size = int(line.split(b";", 1)[0], 16)
    if size == 0:
        await reader.readuntil(b"\r\n")
        return None
    return await reader.readexactly(size + 2)


async def read_sized(reader: asyncio.StreamReader, lower_head: bytes) -> bytes:
    """A body of content-length bytes (none without the header)."""
    i = lower_head.find(b"content-length:")
    n = int(lower_head[i + 15 : lower_head.find(b"\r\n", i)]) if i >= 0 else 0
    return await reader.readexactly(n) if n else b""


def build_request(spec: dict) -> bytes:
    body = {
        "model": spec.get("model", "bench-model"),
        "messages": [{"role": "user", "content": "x" * spec.get("prompt_bytes", 64)}],
        "max_tokens": spec.get("max_tokens", 1),
    }
    if spec.get("stream"):
        body["stream"] = True
    raw = orjson.dumps(body)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {spec.get('key', 'bench-key')}\r\ncontent-length: {len(raw)}\r\n\r\n"
    ).encode()
    return head + raw


class Stats:
    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.gaps: list[float] = []
        self.latency: list[float] = []
        self.chunks = 0
        self.statuses: dict[str, int] = {}
        self.errors = 0
        self.done = 0
        self.all_done = 0  # warm-up and ramp included: for CPU per request over the process's lifetime
        self.all_chunks = 0


async def worker(spec: dict, req: bytes, start_at: float, record_from: float, stop_at: float, st: Stats) -> None:
    clock = time.perf_counter
    reader = writer = None
    await asyncio.sleep(max(0.0, start_at - clock()))
    while clock() < stop_at:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", spec["port"], limit=1 << 20)
            t0 = clock()
            writer.write(req)
            status, lower, close = await read_head(reader)
            first = None
            last = None
            gaps: list[float] = []
            chunks = 0
            if is_chunked(lower):
                while await read_chunk(reader) is not None:
                    now = clock()
                    chunks += 1
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
            else:
                await read_sized(reader, lower)
                first = last = clock()
            t1 = clock()
            if close:
                writer.close()
                writer = None
            st.all_done += 1
            st.all_chunks += chunks
            if record_from <= t1 <= stop_at:  # completed in the window (rates are unbiased)
                st.done += 1
                st.statuses[status] = st.statuses.get(status, 0) + 1
                st.latency.append(t1 - t0)
                if first is not None:
                    st.ttft.append(first - t0)
                st.gaps.extend(gaps)
                st.chunks += chunks
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            st.errors += 1
            if writer is not None:
                writer.close()
            writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


async def run(spec: dict) -> dict:
    req = build_request(spec)
    st = Stats()
    now = time.perf_counter()
    # Closed-loop streams of equal length started together stay in lock-step (a burst of `concurrency`
    # arrivals per stream length): starts are spread evenly over `stagger` seconds (the stream length) instead.
    stagger = spec.get("stagger", 0.0)
    record_from = now + stagger + spec.get("warmup", 1.0)
    stop_at = record_from + spec["duration"]
    c0, w0 = cpu_seconds(), time.perf_counter()
    n = spec["concurrency"]
    tasks = [asyncio.create_task(worker(spec, req, now + stagger * i / n, record_from, stop_at, st)) for i in range(n)]
    await asyncio.gather(*tasks)
    c1, w1 = cpu_seconds(), time.perf_counter()
    return {
        "requests": st.done,
        "requests_per_s": round(st.done / spec["duration"], 1),
        "statuses": st.statuses,
        "errors": st.errors,
        "chunks": st.chunks,
        "all_requests": st.all_done,
        "all_chunks": st.all_chunks,
        "chunks_per_s": round(st.chunks / spec["duration"], 1),
        "ttft_ms": percentiles(st.ttft),
        "inter_chunk_ms": percentiles(st.gaps),
        "latency_ms": percentiles(st.latency),
        "loadgen_cpu_s": round(c1 - c0, 3),
        "loadgen_wall_s": round(w1 - w0, 3),
        "loadgen_cpu_fraction": round((c1 - c0) / (w1 - w0), 3),
    }


def main() -> None:
    spec = orjson.loads(sys.argv[1])
    try:
        import uvloop

        result = uvloop.run(run(spec))
    except ImportError:
        result = asyncio.run(run(spec))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
