"""A backend fast enough not to matter: an OpenAI-shaped server with precomputed bytes and no parsing beyond
what it needs. `python -m bench.load.backend --port P`.

Non-streaming requests get a small chat.completion with usage at once. Streaming requests get
`max_tokens` content chunks `--interval-ms` apart (first one at once), the finish chunk, the usage chunk when
`stream_options.include_usage` is in the body (a byte test: the ext_proc injects it), then `[DONE]`.
"""

from __future__ import annotations

import argparse
import asyncio
import re

from aiohttp import web

_MAX = re.compile(rb'"max_(?:completion_)?tokens"\s*:\s*(\d+)')
_CHUNK = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"tok "},"finish_reason":null}]%s}\n\n'
_LAST = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"length"}]%s}\n\n'
_USAGE = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}\n\n'
_DONE = b"data: [DONE]\n\n"
_JSON = (b'{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":'
         b'{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":%d,'
         b'"completion_tokens":1,"total_tokens":%d}}')
INTERVAL = 0.02


async def handle(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    pt = len(raw) // 4 + 7
    if b'"stream":true' not in raw.replace(b" ", b""):
        body = _JSON % (pt, pt + 1)
        return web.Response(body=body, content_type="application/json")
    m = _MAX.search(raw)
    n = int(m.group(1)) if m else 8
    usage = b"include_usage" in raw
    tail = b',"usage":null' if usage else b""
    resp = web.StreamResponse(status=200, headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
    await resp.prepare(request)
    chunk = _CHUNK % tail
    for i in range(n):
        if i:
            await asyncio.sleep(INTERVAL)
        await resp.write(chunk)
    rest = _LAST % tail
    if usage:
        rest += _USAGE % (pt, n, pt + n)
    await resp.write(rest + _DONE)
    await resp.write_eof()
    return resp


def main() -> None:
    global INTERVAL
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--interval-ms", type=float, default=20.0)
    args = ap.parse_args()
    INTERVAL = args.interval_ms / 1000
    app = web.Application(client_max_size=64 << 20)
    app.router.add_route("*", "/{tail:.*}", handle)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None, backlog=4096)


if __name__ == "__main__":
    main()
