"""The soak's load generator: its own process, uvloop, raw HTTP/1.1 sockets, closed loop per connection.

`python -m bench.load.soak_gen '<json spec>'` prints one JSON line per second while it runs
(`{"progress": requests_ended, "t": seconds}`) and a final `{"result": {...}}` line.

spec: {"port", "requests", "deadline_s", "seed", "models": {role: model}, "keys": {role: key},
       "groups": [{"name", "concurrency", "mix": [[kind, weight], ...], "pause_after_429_ms"}]}

Every request has a kind (what it asks for and which fault it injects through the stand-in backend's headers);
its outcome is what the client saw, classified as `status[:code]` (`429:over_concurrency` is tokenpools' own
refusal: an OpenAI error with a string code; `429:upstream` is the backend's injected 429), `truncated` (the
connection ended before the response did: an upstream cut), `aborted_mid_stream` (we hung up after the first
chunk), `aborted_waiting` (we hung up before any response byte: queued, or admitted and not yet answered) or
`error:<exception>` (a socket error we did not cause). A kind's outcome outside its `EXPECTED` set counts as
unexpected.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time

import orjson

from .gen import is_chunked, read_chunk, read_head, read_sized

# kind -> (model role, key role, stream, tokens (lo, hi), delay_ms per token, extra headers, client action)
KINDS: dict[str, dict] = {
    "ok": dict(model="main", key="guaranteed", stream=False, tokens=(1, 4)),
    "ok_spot": dict(model="main", key="spot", stream=False, tokens=(1, 4)),
    "stream": dict(model="main", key="guaranteed", stream=True, tokens=(2, 6), delay=(0, 3)),
    "stream_spot": dict(model="main", key="spot", stream=True, tokens=(2, 6), delay=(0, 3)),
    "abort_stream": dict(model="main", key="guaranteed", stream=True, tokens=(20, 20), delay=(10, 10), abort="first_chunk"),
    "upstream_500": dict(model="main", key="guaranteed", stream=None, tokens=(2, 2), headers={"x-test-status": "500"}),
    "upstream_429": dict(model="main", key="spot", stream=None, tokens=(2, 2), headers={"x-test-status": "429"}),
    "upstream_cut": dict(model="main", key="guaranteed", stream=True, tokens=(6, 6), delay=(1, 1), headers={"x-test-cut-after": "2"}),
    "bad_key": dict(model="main", key="bad", stream=False, tokens=(1, 1)),
    "contended": dict(model="contended", key="contended", stream=None, tokens=(2, 2), delay=(10, 20)),
    "abort_queued": dict(model="contended", key="contended", stream=False, tokens=(2, 2), delay=(10, 20), abort=(5, 40)),
    "reject": dict(model="noqueue", key="noqueue", stream=False, tokens=(2, 2), delay=(10, 20)),
}
EXPECTED: dict[str, set[str]] = {
    "ok": {"200"}, "ok_spot": {"200"}, "stream": {"200"}, "stream_spot": {"200"},
    "abort_stream": {"aborted_mid_stream"},
    "upstream_500": {"500"}, "upstream_429": {"429:upstream"},
    "upstream_cut": {"truncated", "502"},  # 502: the cut came before Envoy had sent the response headers on
    "bad_key": {"401:invalid_api_key"},
    "contended": {"200", "429:queue_full", "429:queue_timeout"},
    "abort_queued": {"aborted_waiting", "200", "429:queue_full", "429:queue_timeout"},
    "reject": {"200", "429:over_concurrency", "429:pool_contended", "429:queue_full"},
}  # fmt: skip


def build(kind: str, spec: dict, rng: random.Random) -> tuple[bytes, dict]:
    k = KINDS[kind]
    stream = k["stream"] if k["stream"] is not None else rng.random() < 0.5
    n = rng.randint(*k["tokens"])
    prompt = "soak prompt %08x " % rng.getrandbits(32) * rng.randint(1, 8)
    body: dict = {"model": spec["models"][k["model"]], "messages": [{"role": "user", "content": prompt}], "max_tokens": n}
    if stream:
        body["stream"] = True
    raw = orjson.dumps(body)
    headers = {"x-test-tokens": str(n), **k.get("headers", {})}
    if "delay" in k:
        headers["x-test-delay-ms"] = str(rng.randint(*k["delay"]))
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {spec['keys'][k['key']]}\r\ncontent-length: {len(raw)}\r\n"
        + "".join(f"{h}: {v}\r\n" for h, v in headers.items())
        + "\r\n"
    ).encode()
    return head + raw, {"stream": stream, "abort": k.get("abort")}


def classify(status: str, body: bytes) -> str:
    if status.startswith("2") or status == "500":
        return status
    try:
        err = orjson.loads(body).get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):
        return status
    code = err.get("code")
    if isinstance(code, str):
        return f"{status}:{code}"  # tokenpools' own answer
    return f"{status}:upstream"  # the stand-in's injected error (numeric code)


class Abort(Exception):
    pass


async def read_response(reader: asyncio.StreamReader, first_chunk: asyncio.Event | None) -> tuple[str, bytes, bool, int]:
    """(status, body, connection: close, chunks) of one HTTP/1.1 response."""
    status, lower, close = await read_head(reader)
    chunks = 0
    if not is_chunked(lower):
        return status, await read_sized(reader, lower), close, chunks
    parts = []
    while (data := await read_chunk(reader)) is not None:
        chunks += 1
        if len(parts) < 4:
            parts.append(data[:-2])
        if first_chunk is not None and b"content" in data:
            raise Abort  # hang up mid-stream, after the first token
    return status, b"".join(parts), close, chunks


class Run:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.total = spec["requests"]
        self.started = 0
        self.ended = 0
        self.outcomes: dict[str, dict[str, int]] = {}
        self.latency: dict[str, list[float]] = {}
        self.stop_at = time.monotonic() + spec["deadline_s"]
        self.t0 = time.monotonic()

    def count(self, kind: str, outcome: str, dt: float | None = None) -> None:
        d = self.outcomes.setdefault(kind, {})
        d[outcome] = d.get(outcome, 0) + 1
        self.ended += 1
        if dt is not None and outcome == "200":
            lat = self.latency.setdefault(kind, [])
            if len(lat) < 200_000:
                lat.append(dt)

    async def conn(self, group: dict, rng: random.Random) -> None:
        kinds = [k for k, _ in group["mix"]]
        weights = [w for _, w in group["mix"]]
        pause = group.get("pause_after_429_ms", 0) / 1000
        port = self.spec["port"]
        reader = writer = None
        while self.started < self.total and time.monotonic() < self.stop_at:
            self.started += 1
            kind = rng.choices(kinds, weights)[0]
            req, how = build(kind, self.spec, rng)
            t0 = time.perf_counter()
            outcome = None
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
                writer.write(req)
                abort = how["abort"]
                if isinstance(abort, tuple):  # hang up after a random wait unless an answer came first
                    wait = rng.uniform(*abort) / 1000
                    try:
                        status, body, close, _ = await asyncio.wait_for(read_response(reader, None), wait)
                    except asyncio.TimeoutError:
                        raise Abort from None
                else:
                    status, body, close, _ = await read_response(reader, asyncio.Event() if abort == "first_chunk" else None)
                outcome = classify(status, body)
                if close:
                    writer.close()
                    writer = None
            except Abort:
                outcome = "aborted_waiting" if isinstance(how["abort"], tuple) else "aborted_mid_stream"
            except asyncio.IncompleteReadError:
                outcome = "truncated"
            except (OSError, asyncio.LimitOverrunError, ValueError) as exc:
                outcome = f"error:{type(exc).__name__}"
            if outcome in ("aborted_waiting", "aborted_mid_stream", "truncated") or outcome.startswith("error:"):
                if writer is not None:
                    writer.close()  # the connection is in an unknown state: a fresh one for the next request
                writer = None
            self.count(kind, outcome, time.perf_counter() - t0)
            if pause and outcome.startswith("429:") and not outcome.endswith("upstream"):
                await asyncio.sleep(pause)
        if writer is not None:
            writer.close()

    async def progress(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            sys.stdout.write(orjson.dumps({"progress": self.ended, "t": round(time.monotonic() - self.t0, 3)}).decode() + "\n")
            sys.stdout.flush()

    async def run(self) -> dict:
        rng = random.Random(self.spec.get("seed", 1))
        tasks = []
        for g in self.spec["groups"]:
            for _ in range(g["concurrency"]):
                tasks.append(asyncio.create_task(self.conn(g, random.Random(rng.getrandbits(64)))))
        prog = asyncio.create_task(self.progress())
        await asyncio.gather(*tasks)
        prog.cancel()
        wall = time.monotonic() - self.t0
        unexpected = {
            kind: {o: n for o, n in d.items() if o not in EXPECTED[kind]} for kind, d in self.outcomes.items()
        }
        lat = {}
        for kind, v in self.latency.items():
            s = sorted(v)
            lat[kind] = {f"p{q}": round(s[min(len(s) - 1, int(q / 100 * len(s)))] * 1000, 2) for q in (50, 90, 99)}
        return {
            "requests": self.ended,
            "wall_s": round(wall, 3),
            "requests_per_s": round(self.ended / wall, 1) if wall else None,
            "completed": self.ended >= self.total,
            "outcomes": self.outcomes,
            "unexpected": {k: v for k, v in unexpected.items() if v},
            "latency_ms_200": lat,
        }


def main() -> None:
    spec = orjson.loads(sys.argv[1])
    try:
        import uvloop

        result = uvloop.run(Run(spec).run())
    except ImportError:
        result = asyncio.run(Run(spec).run())
    sys.stdout.write(orjson.dumps({"result": result}).decode() + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
