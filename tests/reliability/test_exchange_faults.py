"""Faults at the layer where they happen: config changes, capacity changes and clock jumps, driven through the
ext_proc state machine (Exchange) against the real engine with a controlled clock. No Envoy, no sockets.

Every test ends with the books balanced: engine invariants hold, nothing in flight, reserved or queued, and
the gateway has no live exchange left.
"""

from __future__ import annotations

import asyncio

from extproc.app import TokenpoolsServer
from extproc.config import load_text
from extproc.envoy.service import QUEUE_GRACE_S, Exchange, Gateway
from tests.envoy.extproc_msgs import (
    CONFIG,
    chat,
    immediate,
    kinds,
    request_body,
    request_headers,
    response_body,
    response_headers,
    streamed,
)

# Pool "one": 1 slot, at most 3 queued, a short queue timeout (the safety-net test waits it out in real time).
# Entitlement g1 holds two keys, so one can be revoked while the other keeps working.
QUEUE_TIMEOUT = 0.3
BASE = CONFIG.replace("queue: {timeoutSeconds: 2}", f"queue: {{timeoutSeconds: {QUEUE_TIMEOUT}, maxQueued: 3}}").replace(
    "auth: {apiKeys: [k-g1]}", "auth: {apiKeys: [k-g1, k-g1-old]}"
)
assert BASE != CONFIG


def without(text: str, name: str) -> str:
    """The config text without the document named `name`."""
    docs = text.split("\n---\n")
    kept = [d for d in docs if f"metadata: {{name: {name}," not in d and f"metadata: {{name: {name}}}" not in d]
    assert len(kept) == len(docs) - 1, name
    return "\n---\n".join(kept)


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def server(text: str = BASE) -> tuple[TokenpoolsServer, Gateway, Clock]:
    """A TokenpoolsServer that is never started: its reload() is the real one, its gateway is driven by hand."""
    clock = Clock()
    srv = TokenpoolsServer(load_text(text), clock=clock)
    return srv, srv.gateway, clock


def send(gw: Gateway, payload: dict, key: str = "k-g1") -> tuple[Exchange, list]:
    ex = Exchange(gw, asyncio.Queue())
    first = ex.handle(request_headers(key))
    if first:  # refused at the headers (401, ...)
        return ex, first
    return ex, ex.handle(request_body(payload))


def status(out: list) -> int:
    assert kinds(out) == ["immediate_response"], kinds(out)
    return immediate(out[0])[0]


def code(out: list) -> str:
    return immediate(out[0])[2]["error"]["code"]


def stream_and_finish(ex: Exchange, tokens: int = 2) -> bytes:
    ex.handle(response_headers(200, "text/event-stream"))
    chunk = b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
    sent = b""
    for _ in range(tokens):
        sent += b"".join(streamed(r, "response_body")[0] for r in ex.handle(response_body(chunk, False)))
    out = ex.handle(response_body(b"data: [DONE]\n\n", True))
    assert ex.done and ex.settled
    return sent + b"".join(streamed(r, "response_body")[0] for r in out)


def assert_balanced(gw: Gateway) -> None:
    eng = gw.engine
    eng.check_invariants()
    snap = eng.snapshot(gw.clock())
    for name, p in snap["pools"].items():
        assert p["in_flight"] == 0 and p["queued"] == 0 and p["used"]["kv_cache_tokens"] == 0, (name, p)
        assert p["used"]["concurrency"] == 0, (name, p)
    for name, e in snap["entitlements"].items():
        assert e["in_flight"] == 0 and e["queued"] == 0 and e["reserved_kv_tokens"] == 0, (name, e)
    assert eng.inflight == {} and eng.waiting == {}
    assert eng.reserved_total == eng.released_total and eng.duplicate_releases == 0
    assert gw.live == {} and not gw.in_flight


# ---- config changes --------------------------------------------------------------------------------------------
async def _entitlement_deleted():
    srv, gw, clock = server()
    running, out = send(gw, chat(stream=True, max_tokens=4))
    assert kinds(out) == ["request_headers", "request_body"]
    queued = [send(gw, chat(max_tokens=4))[0] for _ in range(2)]
    assert all(q.state == "queued" for q in queued)
    srv.reload(load_text(without(BASE, "g1")))  # the operator deletes the entitlement
    # Its waiters are refused at once (403: waiting cannot help), and leave the queue.
    for q in queued:
        out = q.handle_signal(q.inbox.get_nowait())
        assert status(out) == 403 and code(out) == "entitlement_removed"
        q.settle()  # the stream's finally: nothing more to release
    # New requests with its key: the key went with it.
    _, out = send(gw, chat())
    assert status(out) == 401 and code(out) == "invalid_api_key"
    # The one in flight runs to its end and is finished normally (usage charged, reservation released).
    sent = stream_and_finish(running)
    assert sent.count(b'"content"') == 2
    assert gw.stats.finished == 1 and gw.engine.duplicate_releases == 0
    assert "g1" not in gw.engine.snapshot(clock())["entitlements"]  # retired once drained
    assert_balanced(gw)


def test_entitlement_deleted_while_queued_and_in_flight():
    asyncio.run(_entitlement_deleted())


async def _revoked_key():
    srv, gw, clock = server()
    old, out = send(gw, chat(max_tokens=2), key="k-g1-old")
    assert kinds(out) == ["request_headers", "request_body"]
    srv.reload(load_text(BASE.replace("auth: {apiKeys: [k-g1, k-g1-old]}", "auth: {apiKeys: [k-g1]}")))
    _, out = send(gw, chat(), key="k-g1-old")
    assert status(out) == 401 and code(out) == "invalid_api_key"  # revoked: refused before admission
    # Admitted before the revocation: it finishes normally.
    old.handle(response_headers(200))
    old.handle(response_body(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 2}}', True))
    assert old.settled and gw.stats.finished == 1
    # The entitlement itself is unchanged: the remaining key still works.
    ex, out = send(gw, chat(max_tokens=1), key="k-g1")
    assert kinds(out) == ["request_headers", "request_body"]
    ex.settle()
    assert_balanced(gw)


def test_revoked_key_is_401_and_in_flight_work_finishes():
    asyncio.run(_revoked_key())


# ---- capacity ----------------------------------------------------------------------------------------------------
async def _pool_to_zero(replicas_return: bool):
    srv, gw, clock = server()
    running, _ = send(gw, chat(max_tokens=2))
    queued = [send(gw, chat(max_tokens=2))[0] for _ in range(3)]
    assert all(q.state == "queued" for q in queued)
    _, out = send(gw, chat(max_tokens=2))
    assert status(out) == 429 and code(out) == "queue_full"  # the queue is full
    gw.dispatch(gw.engine.set_replicas("one", 0, clock()))  # the pool loses its only replica
    # New work: 503 with the pool's scale-up time; the queued requests keep their place (a replica may return).
    _, out = send(gw, chat(max_tokens=2))
    assert status(out) == 503 and code(out) == "no_capacity"
    assert immediate(out[0])[1]["retry-after"] == "30"
    assert all(q.inbox.empty() for q in queued)
    # The request in flight ends normally and is released; nothing is admitted onto a pool with no replica.
    running.handle(response_headers(200))
    running.handle(response_body(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 2}}', True))
    assert running.settled and all(q.inbox.empty() for q in queued)
    if replicas_return:
        clock.t += 0.1
        gw.dispatch(gw.engine.set_replicas("one", 1, clock()))
        # The head is admitted at once: g1 is whole again and starts with a full bucket (engine_faults test).
        first = queued[0]
        assert first.inbox.get_nowait() == ("admitted", None)
        assert kinds(first.handle_signal(("admitted", None))) == ["request_headers", "request_body"]
        first.settle()
        rest = queued[1:]
        for q in rest:  # each release admits the next
            sig = q.inbox.get_nowait()
            assert sig == ("admitted", None)
            q.handle_signal(sig)
            q.settle()
    else:
        clock.t += QUEUE_TIMEOUT + 0.01
        gw.tick()
        for q in queued:
            out = q.handle_signal(q.inbox.get_nowait())
            assert status(out) == 429 and code(out) == "queue_timeout"
            assert immediate(out[0])[1]["retry-after"] == "30"  # no capacity: the scale-up time
            q.settle()
    assert_balanced(gw)


def test_pool_to_zero_replicas_with_full_queue_times_out():
    asyncio.run(_pool_to_zero(replicas_return=False))


def test_pool_to_zero_replicas_then_back_admits_the_queue():
    asyncio.run(_pool_to_zero(replicas_return=True))


# ---- clock jumps ---------------------------------------------------------------------------------------------------
async def _clock_forward():
    srv, gw, clock = server()
    running, _ = send(gw, chat(stream=True, max_tokens=4))
    waiting, _ = send(gw, chat(max_tokens=4))
    assert waiting.state == "queued"
    clock.t += 3600.0  # NTP steps the wall clock an hour ahead
    gw.tick()
    # The waiter's deadline passed in engine time: 429 queue_timeout, not a hang and not an admission.
    out = waiting.handle_signal(waiting.inbox.get_nowait())
    assert status(out) == 429 and code(out) == "queue_timeout"
    waiting.settle()
    # The stream in flight is unaffected and finishes with its usage; its slot is free again.
    stream_and_finish(running)
    ex, out = send(gw, chat(max_tokens=1))
    assert kinds(out) == ["request_headers", "request_body"]
    ex.settle()
    # Buckets refilled to their depth, not by an hour of rate.
    snap = gw.engine.snapshot(clock())["pools"]["one"]
    assert snap["surplus_tokens"] <= gw.engine.pools["one"].surplus.depth + 1e-6
    assert_balanced(gw)


def test_clock_jump_forward():
    asyncio.run(_clock_forward())


async def _clock_backward():
    srv, gw, clock = server()
    running, _ = send(gw, chat(stream=True, max_tokens=4))
    waiting, _ = send(gw, chat(max_tokens=4))
    assert waiting.state == "queued"
    clock.t -= 3600.0  # the wall clock steps an hour back: the engine holds its own time (never runs backwards)
    gw.tick()
    assert waiting.inbox.empty()
    # A release still admits the waiter at once.
    stream_and_finish(running)
    assert waiting.inbox.get_nowait() == ("admitted", None)
    assert kinds(waiting.handle_signal(("admitted", None))) == ["request_headers", "request_body"]
    # A new waiter queued while the wall clock is behind: the engine's time stands still until the wall clock
    # catches up, so its deadline would not pass for an hour; the adapter's safety net answers it after the
    # queue timeout + grace, in real time.
    late, _ = send(gw, chat(max_tokens=4))
    assert late.state == "queued"
    loop = asyncio.get_running_loop()
    started = loop.time()
    sig = await asyncio.wait_for(late.inbox.get(), QUEUE_TIMEOUT + QUEUE_GRACE_S + 2.0)
    waited = loop.time() - started
    assert sig == ("expire", None)
    out = late.handle_signal(sig)
    assert status(out) == 429 and code(out) == "queue_timeout"
    assert waited <= QUEUE_TIMEOUT + QUEUE_GRACE_S + 0.5, waited
    waiting.settle()
    late.settle()
    assert_balanced(gw)


def test_clock_jump_backward():
    asyncio.run(_clock_backward())
