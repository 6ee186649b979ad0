"""The ext_proc state machine (Exchange) against the real engine, without gRPC or Envoy: fast and exact."""

from __future__ import annotations

import asyncio

import orjson

from extproc.config import load_text
from extproc.engine import Engine
from extproc.envoy.service import DRAIN_FACTOR, Exchange, Gateway

from .extproc_msgs import (
    CONFIG,
    chat,
    immediate,
    kinds,
    removed_headers,
    request_body,
    request_headers,
    response_body,
    response_headers,
    set_headers,
    streamed,
)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(max_body: int = 1 << 20) -> tuple[Gateway, Clock]:
    clock = Clock()
    config = load_text(CONFIG)
    return Gateway(Engine(config, clock()), config, clock=clock, max_body_bytes=max_body), clock


def exchange(gw: Gateway) -> Exchange:
    return Exchange(gw, asyncio.Queue())


def ent(gw: Gateway, name: str) -> dict:
    return gw.engine.snapshot(gw.clock())["entitlements"][name]


def admitted(gw: Gateway, payload: dict, key: str = "k-g1", extra=None) -> tuple[Exchange, list]:
    ex = exchange(gw)
    assert ex.handle(request_headers(key, extra=extra)) == []
    return ex, ex.handle(request_body(payload))


def sse(*objs) -> bytes:
    return b"".join(b"data: " + orjson.dumps(o) + b"\n\n" for o in objs) + b"data: [DONE]\n\n"


async def _admit_and_finish():
    gw, _ = make()
    ex, out = admitted(gw, chat(stream=True), extra={"x-tokenpools-entitlement": "g2", "x-tokenpools-x": "1"})
    assert kinds(out) == ["request_headers", "request_body"]
    h = set_headers(out[0], "request_headers")
    assert h["x-tokenpools-entitlement"] == "g1" and h["x-tokenpools-class"] == "guaranteed"
    assert h["x-tokenpools-tenant"] == "t1" and len(h["x-tokenpools-request-id"]) == 32
    # the spoofed one is overwritten, the tenant's key goes no further
    assert removed_headers(out[0], "request_headers") == ["x-tokenpools-x", "authorization"]
    body, eos = streamed(out[1], "request_body")
    assert eos and orjson.loads(body)["max_tokens"] == 10  # the entitlement default, injected
    assert orjson.loads(body)["stream_options"] == {"include_usage": True}
    assert ent(gw, "g1")["in_flight"] == 1

    out = ex.handle(response_headers(200, "text/event-stream"))
    rl = set_headers(out[0], "response_headers")
    assert rl["ratelimit-limit"] == "1" and rl["ratelimit-remaining"] == "0"
    c = {"choices": [{"delta": {"content": "a"}}], "usage": None}
    u = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}
    stream = sse(c, c, u)
    first = ex.handle(response_body(stream[:40], False))
    rest = ex.handle(response_body(stream[40:], True))
    sent = b"".join(streamed(r, "response_body")[0] for r in first + rest)
    assert sent == sse({"choices": [{"delta": {"content": "a"}}]}, {"choices": [{"delta": {"content": "a"}}]})
    assert streamed(rest[-1], "response_body")[1] and ex.done
    assert ent(gw, "g1")["in_flight"] == 0 and ent(gw, "g1")["reserved_kv_tokens"] == 0
    assert gw.stats.exact_usage == 1 and gw.stats.output_tokens == 2 and gw.stats.input_tokens == 9
    released = gw.engine.duplicate_releases
    ex.settle()  # the stream's finally: already settled, nothing happens
    assert gw.engine.duplicate_releases == released and gw.live == {}


def test_admit_forward_meter_finish():
    asyncio.run(_admit_and_finish())


def test_abort_after_admit_releases_once():
    gw, _ = make()
    ex, out = admitted(gw, chat())
    assert ent(gw, "g1")["in_flight"] == 1
    ex.settle()
    ex.settle()
    assert ent(gw, "g1")["in_flight"] == 0 and gw.stats.released == 1
    assert gw.engine.duplicate_releases == 0
    assert gw.in_flight == {} and gw.live == {}


async def _queue_then_admit():
    gw, _ = make()
    first, _ = admitted(gw, chat())
    second, out = admitted(gw, chat())
    assert out == [] and second.state == "queued" and ent(gw, "g1")["queued"] == 1
    first.handle(response_headers(200, eos=False))
    first.handle(response_body(b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1}}', True))
    # Finishing the first admitted the second: the event went to its inbox.
    assert second.inbox.get_nowait() == ("admitted", None)
    out = second.handle_signal(("admitted", None))
    assert kinds(out) == ["request_headers", "request_body"] and second.admitted
    assert ent(gw, "g1")["in_flight"] == 1 and ent(gw, "g1")["queued"] == 0
    second.settle()


def test_queue_then_admit():
    asyncio.run(_queue_then_admit())


async def _queue_deadline():
    gw, clock = make()
    first, _ = admitted(gw, chat())
    second, _ = admitted(gw, chat())
    clock.t += 2.5  # past the pool's 2 s queue timeout
    gw.tick()
    sig = second.inbox.get_nowait()
    assert sig[0] == "rejected"
    (resp,) = second.handle_signal(sig)
    status, headers, body = immediate(resp)
    assert status == 429 and body["error"]["code"] == "queue_timeout"
    assert int(headers["retry-after"]) >= 1 and headers["ratelimit-remaining"] == "0"
    assert ent(gw, "g1")["queued"] == 0 and second.settled and second.rid not in gw.live
    first.settle()


def test_queue_deadline_rejects():
    asyncio.run(_queue_deadline())


async def _abort_while_queued():
    gw, _ = make()
    first, _ = admitted(gw, chat())
    second, _ = admitted(gw, chat())
    second.settle()  # client gone while waiting
    assert ent(gw, "g1")["queued"] == 0
    first.settle()
    assert ent(gw, "g1")["in_flight"] == 0
    assert gw.engine.duplicate_releases == 0


def test_abort_while_queued():
    asyncio.run(_abort_while_queued())


async def _evict():
    gw, clock = make()
    p, out = admitted(gw, chat("m-two", stream=True), key="k-p2")
    q, _ = admitted(gw, chat("m-two", stream=True), key="k-p2")
    assert kinds(out) == ["request_headers", "request_body"] and ent(gw, "p2")["in_flight"] == 2
    p.handle(response_headers(200, "text/event-stream"))
    p.handle(response_body(b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n', False))
    g, out = admitted(gw, chat("m-two"), key="k-g2")
    if out == []:
        # An idle guaranteed entitlement is allocated its baseline at the next control period (engine
        # behaviour); then its queued request is admitted by evicting preemptible work.
        assert g.state == "queued"
        clock.t += 1.0
        gw.tick()
        out = g.handle_signal(g.inbox.get_nowait())
    assert kinds(out) == ["request_headers", "request_body"]  # guaranteed got in
    victims = [x for x in (p, q) if not x.inbox.empty()]
    assert len(victims) == 1
    victim = victims[0]
    out = victim.handle_signal(victim.inbox.get_nowait())
    if victim is p:  # mid-stream: an SSE error event, then the reset
        assert kinds(out) == ["response_body", "immediate_response"]
        assert b'"code":"evicted"' in streamed(out[0], "response_body")[0]
    else:  # before the response: a clean 429
        assert kinds(out) == ["immediate_response"]
    assert immediate(out[-1])[2]["error"]["code"] == "evicted"
    assert ent(gw, "p2")["in_flight"] == 1 and ent(gw, "p2")["evicted_total"] == 1
    victim.settle()  # the stream's finally: nothing more to release
    assert gw.engine.duplicate_releases == 0
    for x in (p, q, g):
        x.settle()
    assert ent(gw, "p2")["in_flight"] == 0 and ent(gw, "g2")["in_flight"] == 0


def test_eviction_ends_the_victim():
    asyncio.run(_evict())


def test_refusals():
    gw, _ = make(max_body=1000)
    ex = exchange(gw)
    (r,) = ex.handle(request_headers(None))
    assert immediate(r)[0] == 401
    (r,) = exchange(gw).handle(request_headers("wrong"))
    assert immediate(r)[0] == 401
    (r,) = exchange(gw).handle(request_headers(path="/v1/other"))
    assert immediate(r)[0] == 404
    (r,) = exchange(gw).handle(request_headers(method="GET"))
    assert immediate(r)[0] == 405
    (r,) = exchange(gw).handle(request_headers(eos=True))
    assert immediate(r)[0] == 400
    ex = exchange(gw)
    ex.handle(request_headers())
    (r,) = ex.handle(request_body(b"{oops"))
    assert immediate(r)[2]["error"]["code"] == "invalid_json"
    ex = exchange(gw)
    ex.handle(request_headers())
    (r,) = ex.handle(request_body(chat("nope")))
    assert immediate(r)[0] == 404


def test_oversized_bodies_are_drained_then_413():
    gw, _ = make(max_body=1000)
    ex = exchange(gw)
    assert ex.handle(request_headers()) == []
    assert ex.handle(request_body(b"x" * 800, eos=False)) == []
    assert ex.handle(request_body(b"x" * 800, eos=False)) == []  # over the limit: dropped, not kept
    assert len(ex.body) == 0
    (r,) = ex.handle(request_body(b"x", eos=True))
    status, _, body = immediate(r)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # A declared length far beyond the limit is refused at once.
    big = exchange(gw)
    (r,) = big.handle(request_headers(extra={"content-length": str(DRAIN_FACTOR * 1000 + 1)}))
    assert immediate(r)[0] == 413


def test_request_trailers_end_the_body():
    gw, _ = make()
    ex = exchange(gw)
    ex.handle(request_headers())
    assert ex.handle(request_body(chat(max_tokens=2), eos=False)) == []
    out = ex.on_request_trailers()
    assert kinds(out) == ["request_headers", "request_body", "request_trailers"]
    assert streamed(out[1], "request_body")[1] is False  # the trailers end the stream, not the body
    ex.settle()


def test_passthrough_models_endpoint():
    gw, _ = make()
    ex = exchange(gw)
    out = ex.handle(request_headers(path="/v1/models", method="GET", eos=True))
    assert kinds(out) == ["request_headers"]
    assert set_headers(out[0], "request_headers")["x-tokenpools-entitlement"] == "g1"
    assert kinds(ex.handle(response_headers())) == ["response_headers"]
    out = ex.handle(response_body(b'{"data": []}', True))
    assert streamed(out[0], "response_body") == (b'{"data": []}', True) and ex.done
    assert gw.live == {}


def test_upstream_error_releases():
    gw, _ = make()
    ex, _ = admitted(gw, chat())
    ex.handle(response_headers(503))
    assert ent(gw, "g1")["in_flight"] == 0 and gw.stats.released == 1
    out = ex.handle(response_body(b'{"error": {}}', True))
    assert streamed(out[0], "response_body") == (b'{"error": {}}', True)


def test_engine_refusals_map_to_statuses():
    gw, _ = make()
    _, (r,) = admitted(gw, chat("m-zero"), key="k-zs")
    status, headers, body = immediate(r)
    assert status == 503 and body["error"]["code"] == "no_capacity" and headers["retry-after"] == "30"
    _, (r,) = admitted(gw, chat("m-zero"), key="k-zg")  # a guaranteed baseline a zero-replica pool cannot honour
    status, headers, body = immediate(r)
    assert status == 403 and body["error"]["code"] == "not_bound" and "retry-after" not in headers
    _, (r,) = admitted(gw, chat(max_tokens=200_000))  # more than the pool's whole KV cache
    status, _, body = immediate(r)
    assert status == 400 and body["error"]["code"] == "over_kv"
    assert gw.live == {} and all(ent(gw, n)["in_flight"] == 0 for n in ("g1", "zs", "zg"))
