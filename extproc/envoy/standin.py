"""A small, controllable OpenAI-compatible backend: the stand-in for vLLM in tests (and in `tokenpools up`
until the simulator in extproc/sim is available). `python -m extproc.envoy.standin --port 8100`.

It generates "t0 t1 ..." tokens at --token-delay-ms each. Per request, headers can change that (tests send
them through Envoy):
  x-test-tokens: N        output tokens to generate (default: the body's max_tokens, else 8)
  x-test-delay-ms: D      delay before each token (default: --token-delay-ms)
  x-test-status: S        answer status S at once with an OpenAI error body (e.g. 500, 429)
  x-test-cut-after: K     streaming: drop the connection after K tokens (a mid-stream upstream failure)
  x-test-first-byte-delay-ms: D   wait D ms before sending anything (status and headers included)
  x-test-reset: headers   drop the connection before sending a status line (reset before the first byte)
  x-test-stall-after: K   streaming: after K tokens send nothing more for 60 s (a hung upstream)
  x-test-error-after: K   streaming: after K tokens an SSE error event (as vLLM sends mid-stream), then [DONE]
  x-test-garbage: 1       streaming: interleave events that are not valid OpenAI chunks (bad JSON, arrays,
                          binary bytes, wrong types); non-streaming: a 200 body that is not JSON
  x-test-unterminated: 1  streaming: no `data: [DONE]`, and the last event lacks its closing blank line
  x-test-id: ID           recorded with the request, for GET /_requests?id=ID
Usage is reported like vLLM/OpenAI: `usage` in JSON bodies; in streams only with stream_options.include_usage,
as a final `choices: []` chunk, with `"usage": null` on the other chunks (as OpenAI does).
prompt_tokens = UTF-8 bytes of prompt text // 4 + 7 (deterministic, so tests can predict it).

GET /_requests[?id=ID]  what was received (path, headers, parsed body, outcome)
GET /_stats             current and peak concurrency, totals
"""

from __future__ import annotations

import argparse
import asyncio
import time

import orjson
from aiohttp import web

RECORDS: list[dict] = []
STATS = {"active": 0, "peak": 0, "total": 0, "disconnected": 0, "completed": 0}
DEFAULT_DELAY_MS = 0.0
KEEP_RECORDS = True  # --no-records: long runs (bench soak) keep only /_stats


def _prompt_tokens(body: dict) -> int:
    text = 0
    for m in body.get("messages") or []:
        c = m.get("content")
        if isinstance(c, str):
            text += len(c.encode())
    p = body.get("prompt") or body.get("input")
    if isinstance(p, str):
        text += len(p.encode())
    return text // 4 + 7


async def handle(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    rec = {
        "id": request.headers.get("x-test-id"),
        "path": request.path,
        "query": request.query_string,
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "header_list": [[k.lower(), v] for k, v in request.headers.items()],  # repeated headers kept
        "body": body,
        "body_bytes": len(raw),
        "outcome": "started",
        "t": time.time(),
    }
    if KEEP_RECORDS:
        RECORDS.append(rec)
    STATS["total"] += 1
    STATS["active"] += 1
    STATS["peak"] = max(STATS["peak"], STATS["active"])
    try:
        return await _respond(request, body or {}, rec)
    except (ConnectionResetError, asyncio.CancelledError):
        rec["outcome"] = "disconnected"
        STATS["disconnected"] += 1
        raise
    finally:
        STATS["active"] -= 1


# Events no OpenAI server sends: each must pass to the client untouched and count no tokens.
GARBAGE_EVENTS = (
    b"data: {not json\n\n",
    b"data: [1, 2, 3]\n\n",
    b": a comment line\n\n",
    b"data: \xff\xfe\x00 binary\n\n",
    b'event: odd\ndata: "a string"\n\n',
    b'data: {"choices": "not a list"}\n\n',
    b'data: {"choices": [{"delta": "not an object"}, 7]}\n\n',
    b'data: {"usage": {"prompt_tokens": -5, "completion_tokens": "many"}, "choices": [{"delta": {}}]}\n\n',
)


async def _respond(request: web.Request, body: dict, rec: dict) -> web.StreamResponse:
    h = request.headers
    if "x-test-first-byte-delay-ms" in h:
        await asyncio.sleep(float(h["x-test-first-byte-delay-ms"]) / 1000)
    if h.get("x-test-reset") == "headers":
        rec["outcome"] = "reset"
        request.transport.close()  # nothing sent: Envoy sees a reset before the response headers
        raise ConnectionResetError("x-test-reset")
    if "x-test-status" in h:
        status = int(h["x-test-status"])
        rec["outcome"] = f"status {status}"
        err = {"error": {"message": "injected failure", "type": "server_error", "code": status}}
        return web.json_response(err, status=status)
    n = int(h.get("x-test-tokens", body.get("max_tokens") or body.get("max_completion_tokens") or 8))
    delay = float(h.get("x-test-delay-ms", DEFAULT_DELAY_MS)) / 1000
    cut = int(h["x-test-cut-after"]) if "x-test-cut-after" in h else None
    stall = int(h["x-test-stall-after"]) if "x-test-stall-after" in h else None
    error_after = int(h["x-test-error-after"]) if "x-test-error-after" in h else None
    unterminated = h.get("x-test-unterminated") == "1"
    model = body.get("model", "?")
    chat = request.path.endswith("/chat/completions")
    pt = _prompt_tokens(body)
    usage = {"prompt_tokens": pt, "completion_tokens": n, "total_tokens": pt + n}
    if request.path.endswith("/embeddings"):
        rec["outcome"] = "completed"
        STATS["completed"] += 1
        return web.json_response(
            {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}], "model": model,
             "usage": {"prompt_tokens": pt, "total_tokens": pt}}
        )
    garbage = h.get("x-test-garbage") == "1"
    if not body.get("stream") and garbage:
        rec["outcome"] = "completed"
        STATS["completed"] += 1
        return web.Response(body=b"<html>not json \xff</html>", content_type="application/json")
    if not body.get("stream"):
        for _ in range(n):
            if delay:
                await asyncio.sleep(delay)
        text = " ".join(f"t{i}" for i in range(n))
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"} if chat else {
            "index": 0, "text": text, "finish_reason": "length"}
        rec["outcome"] = "completed"
        STATS["completed"] += 1
        return web.json_response({"id": "cmpl-1", "object": "chat.completion" if chat else "text_completion",
                                  "created": 1, "model": model, "choices": [choice], "usage": usage})
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    resp = web.StreamResponse(status=200, headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
    await resp.prepare(request)

    def chunk(choices: list, usage_value=None, with_usage_key: bool = include_usage) -> bytes:
        obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk" if chat else "text_completion",
               "created": 1, "model": model, "choices": choices}
        if with_usage_key:
            obj["usage"] = usage_value
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    if chat:
        await resp.write(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]))
    for i in range(n):
        if delay:
            await asyncio.sleep(delay)
        if cut is not None and i >= cut:
            rec["outcome"] = "cut"
            request.transport.close()  # abrupt: no terminating chunk
            return resp
        if error_after is not None and i >= error_after:
            err = {"error": {"message": "injected mid-stream failure", "type": "server_error", "code": 500}}
            await resp.write(b"data: " + orjson.dumps(err) + b"\n\ndata: [DONE]\n\n")
            await resp.write_eof()
            rec["outcome"] = "error event"
            return resp
        if stall is not None and i >= stall:
            rec["outcome"] = "stalled"
            await asyncio.sleep(60)
        if garbage:
            await resp.write(GARBAGE_EVENTS[i % len(GARBAGE_EVENTS)])
        piece = {"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None} if chat else {
            "index": 0, "text": f"t{i} ", "finish_reason": None}
        await resp.write(chunk([piece]))
    last = {"index": 0, "delta": {}, "finish_reason": "length"} if chat else {"index": 0, "text": "", "finish_reason": "length"}
    tail = chunk([last])
    await resp.write(tail[:-2] if unterminated and not include_usage else tail)
    if include_usage:
        await resp.write(chunk([], usage)[:-2] if unterminated else chunk([], usage))
    if not unterminated:
        await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    rec["outcome"] = "completed"
    STATS["completed"] += 1
    return resp


async def requests_(request: web.Request) -> web.Response:
    rid = request.query.get("id")
    recs = [r for r in RECORDS if rid is None or r["id"] == rid]
    return web.Response(body=orjson.dumps(recs), content_type="application/json")


async def stats(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(STATS), content_type="application/json")


def main() -> None:
    global DEFAULT_DELAY_MS, KEEP_RECORDS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--model", default=None, help="accepted for symmetry with the simulator; any model is served")
    ap.add_argument("--token-delay-ms", type=float, default=0.0, help="time per generated token")
    ap.add_argument("--no-records", action="store_true", help="keep no per-request records (GET /_requests stays empty)")
    args = ap.parse_args()
    DEFAULT_DELAY_MS = args.token_delay_ms
    KEEP_RECORDS = not args.no_records
    app = web.Application(client_max_size=64 << 20)
    app.router.add_get("/_requests", requests_)
    app.router.add_get("/_stats", stats)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
