"""Fuzzing the request parser, the response meter and the ext_proc exchange (docs/RELIABILITY.md).

    python -m bench.fuzz --inputs 100000 [--seed N] [--atheris]

Prints JSON: inputs run per target, exceptions (anything a target must not raise), the first few failures,
seconds. Exit status 1 when there was any exception.

Targets (hypothesis; the input budget is split between them by SHARES):
  parse-structured  OpenAI requests of every endpoint kind built from structured strategies, then mutated:
                    fields replaced by arbitrary JSON (wrong types, huge and non-finite numbers, unicode, lone
                    surrogates), fields dropped, duplicate keys, deep nesting, invalid bytes, truncation.
                    Only BadRequest may escape `openai.parse`; a body it accepts must estimate and rewrite
                    (`upstream_body`) without error, into valid JSON with the fields we inject.
  parse-raw         Arbitrary bytes and JSON-ish token soup into `openai.parse`: only BadRequest.
  meter-valid       Valid chat/completions SSE streams (LF or CRLF, comments, event/id lines, `usage: null`
                    fields) cut into arbitrary chunks: the meter never raises; counted tokens = content chunks;
                    usage is taken; what the client receives is the input minus exactly the usage chunk we
                    asked for (and minus the `usage: null` fields); nothing dropped when the client asked.
  meter-garbage     Arbitrary bytes and mutated valid streams, any chunking, SSE or JSON, stripping or not:
                    never raises, token counts ≥ 0, pass-through modes return the input byte for byte.
  exchange          Whole ext_proc message sequences (random headers, keys, paths, methods, encodings, body
                    chunks, trailers, upstream statuses and bodies, aborts at any point) through `Exchange`
                    against the real engine: no handler raises, every answer serialises, and once every
                    stream ended the books balance (engine invariants, nothing in flight or queued, no live
                    exchange, no duplicate release).
--atheris additionally runs a coverage-guided libFuzzer pass (atheris) over parse and the meter for the same
number of inputs, in a child process (libFuzzer exits the process when it is done).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import subprocess
import sys
import time
import traceback
from typing import Any

import orjson

from extproc.envoy.metering import ResponseMeter
from extproc.envoy.openai import ENDPOINTS, INJECT_FIELD, BadRequest, parse, upstream_body
from extproc.envoy.tokens import TokenEstimator

KINDS = tuple(ENDPOINTS.values())  # chat, completions, embeddings, responses
SHARES = {"parse-structured": 0.35, "parse-raw": 0.15, "meter-valid": 0.25, "meter-garbage": 0.18, "exchange": 0.07}
MAX_FAILURES_KEPT = 5


class Results:
    def __init__(self) -> None:
        self.inputs: dict[str, int] = {}
        self.examples: dict[str, int] = {}  # hypothesis examples (each gives 1 + MUTANTS inputs)
        self.exceptions: dict[str, int] = {}
        self.failures: list[dict[str, str]] = []

    def ran(self, target: str) -> None:
        self.inputs[target] = self.inputs.get(target, 0) + 1

    def failed(self, target: str, data: Any, exc: BaseException) -> None:
        self.exceptions[target] = self.exceptions.get(target, 0) + 1
        if len(self.failures) < MAX_FAILURES_KEPT:
            self.failures.append(
                {"target": target, "input": repr(data)[:600], "error": "".join(traceback.format_exception(exc))[-1500:]}
            )


# ---- invariants, one input each ---------------------------------------------------------------------------------
_ESTIMATOR = TokenEstimator()


def check_parse(kind: str, raw: bytes, reserved: int) -> None:
    """Only BadRequest may escape parse; an accepted body must estimate and rewrite cleanly."""
    try:
        req = parse(kind, raw)
    except BadRequest as exc:
        assert exc.code and str(exc), "a BadRequest needs a code and a message"
        return
    est = _ESTIMATOR.estimate(req)
    assert est.tokens >= 0 and est.known_tokens >= 0 and est.text_bytes >= 0, est
    budget = req.output_budget
    assert budget is None or budget >= 0, budget
    assert req.fanout >= 1 and req.segments >= 0 and req.text_bytes >= 0 and req.extra_tokens >= 0, req
    body = upstream_body(req, reserved)
    if body is not None:
        doc = orjson.loads(body)
        assert doc["model"] == req.model
        if req.max_tokens is None and kind in INJECT_FIELD and reserved > 0:
            assert doc[INJECT_FIELD[kind]] >= 1
        if req.injects_usage:
            assert doc["stream_options"]["include_usage"] is True


def feed_all(meter: ResponseMeter, data: bytes, cuts: list[int]) -> bytes:
    out = b""
    last = 0
    for c in sorted(set(c for c in cuts if 0 < c < len(data))):
        out += meter.feed(data[last:c])
        last = c
    out += meter.feed(data[last:])
    return out + meter.finish()


def check_meter_counts(meter: ResponseMeter) -> None:
    assert meter.output_tokens >= 0 and meter.final_output_tokens >= 0, meter.output_tokens
    assert meter.input_tokens is None or meter.input_tokens >= 0
    assert meter.dropped_events >= 0


def check_meter_garbage(data: bytes, cuts: list[int], sse: bool, strip: bool, kind: str) -> None:
    meter = ResponseMeter(kind, sse, strip)
    out = feed_all(meter, data, cuts)
    check_meter_counts(meter)
    if not (sse and strip):
        assert out == data, "pass-through must return the input byte for byte"


def check_meter_valid(stream: dict, cuts: list[int]) -> None:
    """stream: {"kind", "events": [(bytes, payload-or-None, content?)], "usage_event": index or None,
    "usage": {...}, "strip": bool, "sent": bytes}."""
    data = stream["sent"]
    meter = ResponseMeter(stream["kind"], True, stream["strip"])
    out = feed_all(meter, data, cuts)
    check_meter_counts(meter)
    contents = sum(1 for _, _, c in stream["events"] if c)
    assert meter.output_tokens == contents, (meter.output_tokens, contents)
    usage = stream["usage"]
    if usage is not None:
        assert meter.final_output_tokens == usage["completion_tokens"]
        assert meter.input_tokens == usage["prompt_tokens"]
    else:
        assert meter.final_output_tokens == contents
    if not stream["strip"]:
        assert out == data and meter.dropped_events == 0
        return
    assert meter.dropped_events == (1 if stream["usage_event"] is not None else 0)
    if not stream["usage_null"]:  # byte for byte: the input minus exactly the usage chunk
        expected = b"".join(raw for i, (raw, _, _) in enumerate(stream["events"]) if i != stream["usage_event"])
        assert out == expected, (out, expected)
        return
    # `"usage": null` fields are removed (those events are re-serialised): compare what the client parses.
    want = [p for i, (_, p, _) in enumerate(stream["events"]) if i != stream["usage_event"] and p is not None]
    for p in want:
        if isinstance(p, dict) and "usage" in p and p["usage"] is None:
            del p["usage"]
    assert _payloads(out) == want, (_payloads(out), want)


def _payloads(sse: bytes) -> list[Any]:
    out = []
    for block in sse.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = [ln[5:].lstrip(b" ") for ln in block.split(b"\n") if ln.startswith(b"data:")]
        if data:
            payload = b"\n".join(data).strip()
            out.append(orjson.loads(payload) if payload.startswith(b"{") else payload.decode())
    return out


# ---- the exchange target ---------------------------------------------------------------------------------------------
EXCHANGE_CONFIG = """
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {name: p}
spec:
  model: m
  perReplica: {tokensPerSecond: 100000, concurrency: 2, kvCacheTokens: 20000}
  queue: {maxQueued: 2, timeoutSeconds: 5}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: g, labels: {tokenpools.io/demo: "true"}}
spec:
  tenantId: t
  poolRef: {name: p}
  qos: {serviceClass: guaranteed}
  resources: {concurrency: 1}
  defaults: {maxTokens: 16}
  auth: {apiKeys: [k]}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: s, labels: {tokenpools.io/demo: "true"}}
spec:
  tenantId: t2
  poolRef: {name: p}
  qos: {serviceClass: preemptible}
  burst: {concurrency: 2}
  auth: {apiKeys: [ks]}
"""


def run_exchanges(plans: list[dict], loop: asyncio.AbstractEventLoop) -> None:
    loop.run_until_complete(_exchanges(plans))


async def _exchanges(plans: list[dict]) -> None:
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from extproc.config import load_text
    from extproc.engine import Engine
    from extproc.envoy.service import Exchange, Gateway

    config = _config(load_text)
    t = [1000.0]
    gw = Gateway(Engine(config, t[0]), config, clock=lambda: t[0], max_body_bytes=4096)
    exchanges = []

    def hmap(items: list[tuple[str, str]]):
        values = [base_pb2.HeaderValue(key=k, raw_value=v.encode("utf-8", "surrogatepass")) for k, v in items]
        return base_pb2.HeaderMap(headers=values)

    def answer(ex, responses) -> None:
        for r in responses:
            r.SerializeToString()  # every answer must be a valid message

    for plan in plans:
        ex = Exchange(gw, asyncio.Queue())
        exchanges.append(ex)
        steps = plan["steps"]
        for step in steps:
            if ex.done:
                break
            kind = step[0]
            if kind == "req_headers":
                msg = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=hmap(step[1]), end_of_stream=step[2]))
            elif kind == "req_body":
                msg = pb.ProcessingRequest(request_body=pb.HttpBody(body=step[1], end_of_stream=step[2]))
            elif kind == "req_trailers":
                msg = pb.ProcessingRequest(request_trailers=pb.HttpTrailers())
            elif kind == "resp_headers":
                if ex.state not in ("forwarded", "response_body"):
                    continue
                msg = pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=hmap(step[1]), end_of_stream=step[2]))
            elif kind == "resp_body":
                if ex.state not in ("forwarded", "response_body"):
                    continue
                msg = pb.ProcessingRequest(response_body=pb.HttpBody(body=step[1], end_of_stream=step[2]))
            elif kind == "resp_trailers":
                if ex.state not in ("forwarded", "response_body"):
                    continue
                msg = pb.ProcessingRequest(response_trailers=pb.HttpTrailers())
            elif kind == "tick":
                t[0] += step[1]
                gw.tick()
                continue
            else:  # "abort": the stream ends here (client gone, Envoy reset)
                break
            answer(ex, ex.handle(msg))
            # Deliver what the engine signalled to any exchange (admitted / rejected / evicted).
            for other in exchanges:
                while not other.inbox.empty():
                    item = other.inbox.get_nowait()
                    if item[0] != "expire":
                        answer(other, other.handle_signal(item))
        if plan["abort_now"]:
            ex.settle()
    for ex in exchanges:  # every stream ends: the servicer's finally
        while not ex.inbox.empty():
            item = ex.inbox.get_nowait()
            if item[0] != "expire" and not ex.done:
                answer(ex, ex.handle_signal(item))
        ex.settle()
    eng = gw.engine
    eng.check_invariants()
    assert not eng.inflight and not eng.waiting, (eng.inflight, eng.waiting)
    assert eng.reserved_total == eng.released_total, (eng.reserved_total, eng.released_total)
    assert eng.duplicate_releases == 0, eng.duplicate_releases
    assert gw.live == {} and not gw.in_flight, (gw.live, gw.in_flight)


_CONFIG_CACHE: list = []


def _config(load_text):
    if not _CONFIG_CACHE:
        _CONFIG_CACHE.append(load_text(EXCHANGE_CONFIG))
    return _CONFIG_CACHE[0]


# ---- hypothesis strategies -------------------------------------------------------------------------------------------
def strategies():
    from hypothesis import strategies as st

    names = ["model", "messages", "role", "content", "type", "text", "image_url", "prompt", "input", "instructions",
             "max_tokens", "max_completion_tokens", "max_output_tokens", "n", "stream", "stream_options",
             "include_usage", "tools", "tool_calls", "name", "usage"]  # fmt: skip
    text = st.one_of(st.text(max_size=40), st.sampled_from(["", "user", "image_url", "input_image", "text", "m", "\ud800"]))
    leaf = st.one_of(
        st.none(), st.booleans(), st.integers(-3, 10**6), st.integers(-(2**80), 2**80),
        st.floats(allow_nan=True, allow_infinity=True), text,
    )  # fmt: skip
    value = st.recursive(
        leaf,
        lambda c: st.one_of(
            st.lists(c, max_size=4), st.dictionaries(st.one_of(st.sampled_from(names), st.text(max_size=6)), c, max_size=4)
        ),
        max_leaves=16,
    )  # fmt: skip
    token_ids = st.lists(st.integers(0, 200_000), min_size=1, max_size=20)
    part = st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": text}),
        st.fixed_dictionaries({"type": st.sampled_from(["image_url", "input_image", "input_audio", "video"]),
                               "image_url": st.fixed_dictionaries({"url": text})}),  # fmt: skip
    )
    content = st.one_of(st.none(), text, st.lists(part, max_size=3))
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool"]), "content": content},
        optional={"name": text, "tool_calls": st.lists(value, max_size=2)},
    )
    prompt = st.one_of(text, st.lists(text, min_size=1, max_size=3), token_ids, st.lists(token_ids, min_size=1, max_size=3))
    common = {
        "max_tokens": st.integers(1, 4096), "max_completion_tokens": st.integers(1, 4096),
        "max_output_tokens": st.integers(1, 4096), "n": st.integers(1, 4), "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
        "tools": st.lists(value, max_size=2), "instructions": text, "temperature": st.floats(0, 2),
    }  # fmt: skip
    per_kind = {
        "chat": {"messages": st.lists(message, min_size=1, max_size=4)},
        "completions": {"prompt": prompt},
        "embeddings": {"input": prompt},
        "responses": {"input": st.one_of(text, st.lists(st.one_of(text, message), min_size=1, max_size=3))},
    }

    @st.composite
    def request(draw):
        kind = draw(st.sampled_from(KINDS))
        doc = {"model": draw(st.sampled_from(["m", "qwen3-8b", "x" * 3]))}
        for k, s in per_kind[kind].items():
            doc[k] = draw(s)
        for k in draw(st.lists(st.sampled_from(sorted(common)), max_size=4, unique=True)):
            doc[k] = draw(common[k])
        # Mutations: wrong types / arbitrary values, dropped fields.
        for k in draw(st.lists(st.sampled_from(names + ["temperature"]), max_size=3)):
            if draw(st.booleans()):
                doc[k] = draw(value)
            else:
                doc.pop(k, None)
        how = draw(st.sampled_from(["as-is"] * 6 + ["dup-key", "deep", "deep", "deep", "bytes", "truncate", "wrap"]))
        depth = draw(st.sampled_from([2, 64, 127, 128, 129, 200, 253, 254, 255, 256, 300, 600, 1023, 1100]))
        if how == "deep" and depth < 900 and draw(st.booleans()):  # deep inside the document, where parse looks
            nested: list = []
            for _ in range(depth - 1):
                nested = [nested]
            target = doc.get("messages") if kind == "chat" else doc.get("input")
            if isinstance(target, list) and target and isinstance(target[0], dict) and draw(st.booleans()):
                target[0][draw(st.sampled_from(["name", "tool_calls", "content", "extra"]))] = nested
            else:
                doc[draw(st.sampled_from(["tools", "metadata", "response_format", "stream_options", "max_tokens"]))] = nested
            how = "as-is"
        raw = json.dumps(doc, ensure_ascii=draw(st.booleans()), allow_nan=True).encode("utf-8", "surrogatepass")
        if how == "dup-key" and raw.startswith(b"{") and len(raw) > 2:
            k = draw(st.sampled_from(names))
            dup = json.dumps(draw(value), allow_nan=True).encode("utf-8", "surrogatepass")
            raw = b"{" + json.dumps(k).encode() + b": " + dup + b", " + raw[1:]
        elif how == "deep":
            field = draw(st.sampled_from(["metadata", "messages", "tools", "input", "prompt"]))
            raw = raw[:-1] + b', "' + field.encode() + b'": ' + b"[" * depth + b"]" * depth + b"}"
        elif how == "bytes":
            pos = draw(st.integers(0, len(raw)))
            raw = raw[:pos] + draw(st.binary(min_size=1, max_size=8)) + raw[pos:]
        elif how == "truncate":
            raw = raw[: draw(st.integers(0, len(raw)))]
        elif how == "wrap":
            raw = draw(st.sampled_from([b"[", b'{"x": ', b" \t\n"])) + raw + draw(st.sampled_from([b"]", b"}", b"", b"\x00"]))
        return kind, raw, draw(st.integers(0, 10**6))

    soup = st.lists(
        st.one_of(
            st.sampled_from([b"{", b"}", b"[", b"]", b":", b",", b'"model"', b'"m"', b'"messages"', b'"prompt"',
                             b'"max_tokens"', b"-1", b"0", b"1e999", b"18446744073709551616", b"null", b"true",
                             b'"\\ud800"', b'"\\u0000"', b"\xff", b"\xc3\x28", b"NaN", b" "]),  # fmt: skip
            st.binary(max_size=6),
        ),
        max_size=40,
    ).map(b"".join)
    raw_input = st.tuples(st.sampled_from(KINDS), st.one_of(st.binary(max_size=512), soup))

    @st.composite
    def valid_stream(draw):
        kind = draw(st.sampled_from(["chat", "completions"]))
        strip = draw(st.booleans())
        with_usage = draw(st.booleans())
        usage_null = with_usage and draw(st.booleans())  # OpenAI's "usage": null on every other chunk
        delim = draw(st.sampled_from([b"\n\n", b"\r\n\r\n"]))
        nl = b"\r\n" if delim == b"\r\n\r\n" else b"\n"
        events: list[tuple[bytes, Any, bool]] = []

        def event(obj: Any, content: bool, extra_lines: list[bytes] = ()) -> None:
            payload = obj if isinstance(obj, bytes) else orjson.dumps(obj)
            raw = b"".join(ln + nl for ln in extra_lines) + b"data: " + payload + delim
            events.append((raw, obj if not isinstance(obj, bytes) else payload.decode(), content))

        for _ in range(draw(st.integers(0, 12))):
            piece = draw(st.one_of(st.text(max_size=12), st.sampled_from(["", "\n\n", "data: x\n\n", "\r\n", "é🙂"])))
            if kind == "chat":
                choice = {"index": 0, "delta": {"content": piece} if draw(st.booleans()) else {"reasoning_content": piece}}
            else:
                choice = {"index": 0, "text": piece}
            obj = {"id": "x", "object": "chunk", "choices": [choice]}
            if usage_null:
                obj["usage"] = None
            extra = draw(st.lists(st.sampled_from([b"event: message", b"id: 7", b": keep-alive"]), max_size=2))
            event(obj, bool(piece), extra)
            if draw(st.integers(0, 5)) == 0:  # a comment-only event between chunks
                events.append((b": ping" + delim, None, False))
        usage = None
        usage_event = None
        if with_usage:
            usage = {"prompt_tokens": draw(st.integers(0, 10**6)), "completion_tokens": draw(st.integers(0, 10**6))}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            usage_event = len(events)
            event({"id": "x", "object": "chunk", "choices": [], "usage": usage}, False)
        event(b"[DONE]", False)
        sent = b"".join(raw for raw, _, _ in events)
        # Only a stream whose usage we asked for (strip) or the client asked for has a usage chunk.
        return {"kind": kind, "events": events, "usage_event": usage_event if strip else None, "usage": usage,
                "strip": strip, "usage_null": usage_null, "sent": sent}  # fmt: skip

    cuts = st.lists(st.integers(0, 4000), max_size=12)

    @st.composite
    def garbage(draw):
        if draw(st.booleans()):
            data = draw(st.binary(max_size=600))
        else:
            data = draw(valid_stream())["sent"]
            for _ in range(draw(st.integers(1, 4))):
                pos = draw(st.integers(0, len(data)))
                op = draw(st.sampled_from(["insert", "delete", "truncate", "flip"]))
                if op == "insert":
                    spice = [b"\n\n", b"\r\n", b"data: ", b"{", b'"usage": ', b"\xff", b"[]", b'{"choices": []}']
                    data = data[:pos] + draw(st.sampled_from(spice)) + data[pos:]
                elif op == "delete":
                    data = data[:pos] + data[pos + draw(st.integers(1, 20)) :]
                elif op == "truncate":
                    data = data[:pos]
                elif data:
                    i = min(pos, len(data) - 1)
                    data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
        return data, draw(cuts), draw(st.booleans()), draw(st.booleans()), draw(st.sampled_from(KINDS))

    header_value = st.one_of(
        st.text(max_size=20), st.sampled_from(["", "gzip", "identity", "Bearer k", "Bearer ks", "bearer  k ", "99999999999"])
    )

    def _body_steps(draw, steps: list, kind: str, data: bytes) -> None:
        """`data` as KIND_body steps cut at up to 4 drawn places, and sometimes KIND_trailers ending it."""
        pieces = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=4))))
        chunks = [data[a:b] for a, b in zip([0] + pieces, pieces + [len(data)])]
        trailers = draw(st.integers(0, 5)) == 0
        for i, c in enumerate(chunks):
            steps.append((f"{kind}_body", c, i == len(chunks) - 1 and not trailers))
        if trailers:
            steps.append((f"{kind}_trailers",))

    @st.composite
    def plan(draw):
        key = draw(st.sampled_from(["Bearer k", "Bearer ks", "Bearer nope", "", "Basic k", "Bearer k"]))
        path = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
                                     "/v1/models", "/v1/chat/completions?x=1", "/v1/chat/completions/", "/nope"]))  # fmt: skip
        method = draw(st.sampled_from(["POST"] * 5 + ["GET"]))
        headers = [(":method", method), (":path", path), ("content-type", "application/json")]
        if key:
            headers.append(("authorization", key))
        for name in draw(st.lists(st.sampled_from(["content-encoding", "content-length", "x-tokenpools-entitlement",
                                                   "authorization", "x-other"]), max_size=2)):  # fmt: skip
            headers.append((name, draw(header_value)))
        steps: list[tuple] = [("req_headers", headers, draw(st.integers(0, 9)) == 0)]
        kind, raw, _ = draw(request()) if draw(st.integers(0, 3)) else (None, draw(st.binary(max_size=64)), 0)
        if draw(st.booleans()) and raw.startswith(b"{"):  # a body the pool "m" accepts, usually
            try:
                doc = orjson.loads(raw)
                if isinstance(doc, dict):
                    doc["model"] = "m"
                    raw = orjson.dumps(doc)
            except (orjson.JSONDecodeError, TypeError):  # not JSON, or too deep to write back: keep it
                pass
        if draw(st.integers(0, 6)) == 0:
            raw = raw * draw(st.integers(2, 200))  # maybe over the 4 KiB limit
        _body_steps(draw, steps, "req", raw)
        if draw(st.booleans()):
            steps.append(("tick", draw(st.sampled_from([0.0, 0.5, 1.0, 6.0]))))
        status = draw(st.sampled_from(["200"] * 4 + ["500", "429", "204", "abc", ""]))
        ctype = draw(st.sampled_from(["text/event-stream", "application/json", ""]))
        steps.append(("resp_headers", [(":status", status), ("content-type", ctype)], draw(st.integers(0, 9)) == 0))
        if ctype == "text/event-stream" and draw(st.booleans()):
            body = draw(valid_stream())["sent"]
        else:
            body = draw(garbage())[0]
        _body_steps(draw, steps, "resp", body)
        cut = draw(st.integers(1, len(steps)))
        if draw(st.integers(0, 2)) == 0:
            steps = steps[:cut] + [("abort",)]
        return {"steps": steps, "abort_now": draw(st.integers(0, 3)) == 0}

    rnd = st.integers(0, 2**32 - 1).map(random.Random)  # drives the cheap mutants of each example (reproducible)
    return {
        "parse-structured": st.tuples(request(), rnd),
        "parse-raw": st.tuples(raw_input, rnd),
        "meter-valid": st.tuples(st.tuples(valid_stream(), cuts), rnd),
        "meter-garbage": st.tuples(garbage(), rnd),
        "exchange": st.tuples(st.lists(plan(), min_size=1, max_size=3), st.none()),
    }


# Inputs run per hypothesis example: the example itself, then cheap mutants drawn from its seeded Random
# (generating an example costs ~10 ms of hypothesis; a mutant costs microseconds to build and check).
MUTANTS = {"parse-structured": 7, "parse-raw": 3, "meter-valid": 7, "meter-garbage": 7, "exchange": 0}
_SPICE = (b"\n\n", b"\r\n", b"data: ", b"{", b"}", b"[", b"]", b'"', b"\\", b"\xff", b"\xc3", b"\x00", b",", b":",
          b'"usage": ', b'{"choices": []}', b"null", b"1e999", b"-1", b"[DONE]")  # fmt: skip


def mutate(data: bytes, rnd: random.Random) -> bytes:
    for _ in range(rnd.randint(1, 3)):
        pos = rnd.randint(0, len(data))
        op = rnd.randrange(4)
        if op == 0:
            data = data[:pos] + rnd.choice(_SPICE) + data[pos:]
        elif op == 1:
            data = data[:pos] + data[pos + rnd.randint(1, 16) :]
        elif op == 2 and data:
            i = min(pos, len(data) - 1)
            data = data[:i] + bytes([data[i] ^ rnd.randint(1, 255)]) + data[i + 1 :]
        else:
            data = data[:pos]
    return data


def chunking(n: int, rnd: random.Random) -> list[int]:
    style = rnd.randrange(3)
    if style == 0:  # byte by byte near a random point, else large pieces
        start = rnd.randint(0, max(0, n - 1))
        return list(range(start, min(n, start + 24)))
    if style == 1:
        return [rnd.randint(0, n) for _ in range(rnd.randint(1, 10))]
    step = rnd.randint(1, 64)
    return list(range(step, n, step))


def inputs_of(target: str, data: Any):
    """(input, check) pairs for one hypothesis example: the example, then its mutants."""
    payload, rnd = data
    if target == "parse-structured":
        kind, raw, reserved = payload
        yield payload, lambda: check_parse(kind, raw, reserved)
        for _ in range(MUTANTS[target]):
            m = mutate(raw, rnd)
            yield (kind, m), lambda m=m: check_parse(kind, m, reserved)
    elif target == "parse-raw":
        kind, raw = payload
        yield payload, lambda: check_parse(kind, raw, 100)
        for _ in range(MUTANTS[target]):
            m = mutate(raw, rnd)
            k = rnd.choice(KINDS)
            yield (k, m), lambda m=m, k=k: check_parse(k, m, 100)
    elif target == "meter-valid":
        stream, cuts = payload
        yield payload, lambda: check_meter_valid(stream, cuts)
        for _ in range(MUTANTS[target]):
            c = chunking(len(stream["sent"]), rnd)
            yield (stream["sent"], c), lambda c=c: check_meter_valid(stream, c)
    elif target == "meter-garbage":
        raw, cuts, sse, strip, kind = payload
        yield payload, lambda: check_meter_garbage(raw, cuts, sse, strip, kind)
        for _ in range(MUTANTS[target]):
            m = mutate(raw, rnd) if rnd.random() < 0.5 else raw
            c = chunking(len(m), rnd)
            sse2, strip2 = rnd.random() < 0.8, rnd.random() < 0.5
            yield (m, c, sse2, strip2), lambda m=m, c=c, a=sse2, b=strip2: check_meter_garbage(m, c, a, b, kind)
    else:
        yield payload, None  # the exchange target is run by the caller (it needs the event loop)


def run_hypothesis(inputs: int, seed: int, results: Results) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    strats = strategies()
    loop = asyncio.new_event_loop()

    def body(target: str, data: Any) -> None:
        results.examples[target] = results.examples.get(target, 0) + 1
        for one, check in inputs_of(target, data):
            if results.inputs.get(target, 0) >= budget[target]:
                return
            results.ran(target)
            try:
                if check is None:
                    run_exchanges(one, loop)
                else:
                    check()
            except Exception as exc:  # counted, not raised: the run goes on and reports them all
                results.failed(target, one, exc)

    budget = {t: max(1, round(inputs * share)) for t, share in SHARES.items()}
    try:
        for target, share in SHARES.items():
            n = -(-budget[target] // (1 + MUTANTS[target]))  # examples needed (each brings its mutants)

            def make(target: str):
                @hseed(seed)
                @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
                          suppress_health_check=list(HealthCheck))  # fmt: skip
                @given(strats[target])
                def fuzz(data):
                    body(target, data)

                return fuzz

            make(target)()
    finally:
        loop.close()


# ---- atheris ----------------------------------------------------------------------------------------------------------
def atheris_child(inputs: int, seed: int, report_path: str) -> None:
    """Runs in its own process: libFuzzer ends the process itself (exit(), no Python atexit) when the runs are
    done, so the counts go to `report_path` as they grow, and failures to stderr at once."""
    import atheris

    import inspect

    import extproc.envoy.metering
    import extproc.envoy.openai
    import extproc.envoy.tokens

    # Coverage feedback from our parser, meter and estimator (instrument_all() would take a minute to start).
    for mod in (extproc.envoy.openai, extproc.envoy.metering, extproc.envoy.tokens):
        for obj in vars(mod).values():
            fns = [obj] if inspect.isfunction(obj) else list(vars(obj).values()) if inspect.isclass(obj) else []
            for fn in fns:
                fn = getattr(fn, "__func__", fn)
                if inspect.isfunction(fn) and fn.__module__ == mod.__name__:
                    atheris.instrument_func(fn)
    results = Results()
    started = time.perf_counter()

    def report() -> None:
        doc = {"inputs": sum(results.inputs.values()), "per_target": results.inputs,
               "exceptions": sum(results.exceptions.values()), "failures": results.failures,
               "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
        with open(report_path, "w") as f:
            json.dump(doc, f)

    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        which = fdp.ConsumeIntInRange(0, 2)
        kind = KINDS[fdp.ConsumeIntInRange(0, 3)]
        if which == 0:
            target, raw = "atheris-parse", fdp.ConsumeBytes(fdp.remaining_bytes())
        elif which == 1:  # arbitrary bytes as the value of a field parse looks into
            field = (b'"messages"', b'"prompt"', b'"input"', b'"max_tokens"')[fdp.ConsumeIntInRange(0, 3)]
            target = "atheris-parse-field"
            raw = b'{"model": "m", ' + field + b": " + fdp.ConsumeBytes(fdp.remaining_bytes()) + b"}"
        else:
            target = "atheris-meter"
        results.ran(target)
        try:
            if target == "atheris-meter":
                sse, strip = fdp.ConsumeBool(), fdp.ConsumeBool()
                cuts = [fdp.ConsumeIntInRange(0, 512) for _ in range(fdp.ConsumeIntInRange(0, 6))]
                body = fdp.ConsumeBytes(fdp.remaining_bytes())
                meter = ResponseMeter(kind, sse, strip)
                out = feed_all(meter, body, cuts)
                check_meter_counts(meter)
                if not (sse and strip):
                    assert out == body
            else:
                check_parse(kind, raw, 64)
        except Exception as exc:
            results.failed(target, data, exc)
            sys.stderr.write("ATHERIS-FAILURE " + json.dumps(results.failures[-1] if results.failures else {}) + "\n")
        n = sum(results.inputs.values())
        if n % 1000 == 0 or n >= inputs:
            report()

    atheris.Setup([sys.argv[0], f"-runs={inputs}", f"-seed={seed + 1}", "-max_len=4096"], one_input)
    atheris.Fuzz()


def run_atheris(inputs: int, seed: int) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "atheris.json")
        cmd = [sys.executable, "-m", "bench.fuzz", "--atheris-child", report, "--inputs", str(inputs), "--seed", str(seed)]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=root)
        doc = json.load(open(report)) if os.path.exists(report) else {"inputs": 0, "exceptions": 0, "failures": []}
    doc["exit_status"] = proc.returncode
    done = [ln for ln in proc.stderr.splitlines() if ln.startswith("Done ") or "DONE" in ln]
    doc["libfuzzer"] = done[-2:]
    crashes = [ln for ln in proc.stderr.splitlines() if ln.startswith("ATHERIS-FAILURE")]
    doc["exceptions"] = max(doc.get("exceptions", 0), len(crashes))
    if proc.returncode != 0:  # libFuzzer found a crash outside our try (or the child failed to start)
        doc["exceptions"] = doc["exceptions"] + 1
        doc["failures"] = doc.get("failures", []) + [{"target": "atheris", "error": proc.stderr[-2000:]}]
    return doc


# ---- main -----------------------------------------------------------------------------------------------------------
def run(inputs: int, seed: int = 0, use_atheris: bool = False) -> dict:
    import structlog

    old = structlog.get_config()
    # The exchange target refuses a lot of requests; their debug lines are not what we are looking for.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        results = Results()
        started = time.perf_counter()
        run_hypothesis(inputs, seed, results)
        doc: dict[str, Any] = {
            "inputs": sum(results.inputs.values()),
            "per_target": results.inputs,
            "hypothesis_examples": sum(results.examples.values()),
            "exceptions": sum(results.exceptions.values()),
            "exceptions_per_target": results.exceptions,
            "failures": results.failures,
            "seed": seed,
            "seconds": round(time.perf_counter() - started, 1),
            "engine": "hypothesis",
        }
        if use_atheris:
            doc["atheris"] = run_atheris(inputs, seed)
        return doc
    finally:
        structlog.configure(**old)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=100_000, help="inputs in all (hypothesis; atheris runs as many again)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--atheris", action="store_true", help="also run a coverage-guided atheris (libFuzzer) pass")
    ap.add_argument("--atheris-child", metavar="REPORT", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.atheris_child:
        atheris_child(args.inputs, args.seed, args.atheris_child)
        return 0
    doc = run(args.inputs, args.seed, args.atheris)
    print(json.dumps(doc, indent=2))
    bad = doc["exceptions"] + (doc.get("atheris", {}).get("exceptions", 0))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
