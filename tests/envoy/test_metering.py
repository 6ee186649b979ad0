"""Response metering: SSE chunk counting, exact usage, and stripping the usage chunk we asked for."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.envoy.metering import ResponseMeter, usage_tokens


def event(obj) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def chat_stream(n: int, usage: bool, usage_null: bool = True) -> bytes:
    def chunk(choices, u=None):
        obj = {"id": "c", "object": "chat.completion.chunk", "choices": choices}
        if usage and usage_null:
            obj["usage"] = u
        elif u is not None:
            obj["usage"] = u
        return event(obj)

    out = chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
    for i in range(n):
        out += chunk([{"index": 0, "delta": {"content": f"t{i}"}}])
    out += chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
    if usage:
        out += chunk([], {"prompt_tokens": 11, "completion_tokens": n, "total_tokens": 11 + n})
    return out + b"data: [DONE]\n\n"


def feed_all(meter: ResponseMeter, data: bytes, cuts: list[int]) -> bytes:
    out = b""
    prev = 0
    for c in sorted(set(cuts)) + [len(data)]:
        out += meter.feed(data[prev:c])
        prev = c
    return out + meter.finish()


def test_counts_and_takes_final_usage():
    m = ResponseMeter("chat", sse=True, strip_usage=False)
    data = chat_stream(5, usage=True)
    assert m.feed(data) == data  # not stripping: bytes pass unchanged
    assert m.finish() == b""
    assert m.output_tokens == 5
    assert (m.input_tokens, m.final_output_tokens) == (11, 5)


def test_strip_drops_usage_chunk_and_usage_null():
    m = ResponseMeter("chat", sse=True, strip_usage=True)
    out = feed_all(m, chat_stream(3, usage=True), [])
    assert out == chat_stream(3, usage=False)  # exactly what a client without include_usage would get
    assert m.dropped_events == 1
    assert m.final_output_tokens == 3 and m.input_tokens == 11


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 12), cuts=st.lists(st.integers(0, 4000), max_size=12), strip=st.booleans())
def test_any_chunking_gives_the_same_result(n, cuts, strip):
    data = chat_stream(n, usage=True)
    cuts = [c % (len(data) + 1) for c in cuts]
    m = ResponseMeter("chat", sse=True, strip_usage=strip)
    out = feed_all(m, data, cuts)
    assert out == (chat_stream(n, usage=False) if strip else data)
    assert m.output_tokens == n
    assert m.final_output_tokens == n and m.input_tokens == 11


def test_crlf_events_and_comments():
    data = b": keep-alive\r\n\r\n" + event({"choices": [{"delta": {"content": "a"}}]}).replace(b"\n\n", b"\r\n\r\n")
    m = ResponseMeter("chat", sse=True, strip_usage=True)
    assert feed_all(m, data, [3, 20]) == data
    assert m.output_tokens == 1


def test_completions_and_unterminated_tail():
    m = ResponseMeter("completions", sse=True, strip_usage=True)
    tail = b'data: {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1}}'  # no blank line at the end
    out = feed_all(m, event({"choices": [{"text": "x"}]}) + tail, [])
    assert out == event({"choices": [{"text": "x"}]})
    assert m.final_output_tokens == 1 and m.input_tokens == 2


def test_non_streaming_json():
    body = orjson.dumps({"choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": 4, "completion_tokens": 9}})
    m = ResponseMeter("chat", sse=False, strip_usage=False)
    assert feed_all(m, body, [5, 17]) == body
    assert (m.input_tokens, m.final_output_tokens) == (4, 9)
    # Without usage we still know something came back; over the cap we give up parsing.
    m = ResponseMeter("chat", sse=False, strip_usage=False)
    feed_all(m, orjson.dumps({"choices": [{"message": {"content": "hi"}}]}), [])
    assert m.usage is None and m.final_output_tokens == 1
    m = ResponseMeter("chat", sse=False, strip_usage=False, json_cap=10)
    feed_all(m, body, [])
    assert m.usage is None


def test_responses_api_stream():
    data = event({"type": "response.output_text.delta", "delta": "a"}) * 3 + event(
        {"type": "response.completed", "response": {"usage": {"input_tokens": 5, "output_tokens": 3}}}
    )
    m = ResponseMeter("responses", sse=True, strip_usage=False)
    feed_all(m, data, [7])
    assert m.output_tokens == 3 and (m.input_tokens, m.final_output_tokens) == (5, 3)


def test_error_event_is_noted():
    m = ResponseMeter("chat", sse=True, strip_usage=False)
    feed_all(m, event({"error": {"message": "boom"}}), [])
    assert m.error == {"message": "boom"}


def test_usage_shapes():
    assert usage_tokens({"prompt_tokens": 3, "total_tokens": 3}) == (3, 0)  # embeddings
    assert usage_tokens({"input_tokens": 1, "output_tokens": 2}) == (1, 2)
    assert usage_tokens({"prompt_tokens": -1, "completion_tokens": True}) == (None, None)
    assert usage_tokens(None) == (None, None)
