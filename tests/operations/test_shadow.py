"""Shadow mode through the ext_proc adapter: every request is forwarded, would-be refusals are counted."""

from __future__ import annotations

import asyncio

from extproc.config import load_text
from extproc.engine import Engine
from extproc.envoy.service import Exchange, Gateway
from tests.envoy.extproc_msgs import CONFIG, chat, kinds, request_body, request_headers


def _gateway(shadow: bool) -> Gateway:
    text = CONFIG.replace("  model: m-one\n", "  model: m-one\n  shadow: true\n") if shadow else CONFIG
    config = load_text(text)
    return Gateway(Engine(config, 1000.0), config, clock=lambda: 1000.0)


def _send(gw: Gateway, n: int) -> list[list[str]]:
    out = []
    for _ in range(n):
        ex = Exchange(gw, asyncio.Queue())
        ex.handle(request_headers("k-g1"))
        out.append(kinds(ex.handle(request_body(chat()))))
    return out


def test_shadow_pool_forwards_everything_and_counts_would_be_refusals():
    """Pool `one` has one slot: enforcing, the second and third requests wait; in shadow all three go upstream
    and the adapter counts two would-be queued requests, the engine the same with their reason."""
    async def both():
        return _send(_gateway(False), 3), _send(gw, 3)

    gw = _gateway(True)
    enforcing, shadow = asyncio.run(both())
    assert enforcing == [["request_headers", "request_body"], [], []]  # queued: no answer yet
    assert shadow == [["request_headers", "request_body"]] * 3
    assert dict(gw.stats.shadow) == {"queue:over_concurrency": 2}
    snap = gw.engine.snapshot(1000.0)
    assert snap["pools"]["one"]["shadow"] and snap["entitlements"]["g1"]["shadow_would"]["queue"] == 2
    assert snap["pools"]["one"]["used"]["concurrency"] == 3
