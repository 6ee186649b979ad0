"""OpenAI request parsing and the upstream body rewrite."""

from __future__ import annotations

import orjson
import pytest

from extproc.envoy.openai import BadRequest, endpoint_of, parse, upstream_body


def body(**kw) -> bytes:
    return orjson.dumps(kw)


def test_endpoint_normalisation():
    assert endpoint_of("/v1/chat/completions?x=1") == "/v1/chat/completions"
    assert endpoint_of("/v1/completions/") == "/v1/completions"
    assert endpoint_of("/") == "/"


def test_chat_fields():
    req = parse("chat", body(model="m", messages=[{"role": "system", "content": "abcd"},
                                                  {"role": "user", "content": [{"type": "text", "text": "héllo"},
                                                                               {"type": "image_url", "image_url": {}}]}],
                             max_completion_tokens=7, n=2, stream=True))  # fmt: skip
    assert req.model == "m" and req.stream
    assert req.max_tokens == 7 and req.fanout == 2 and req.output_budget == 14
    assert req.segments == 2
    assert req.text_bytes == 4 + len("héllo".encode())
    assert req.extra_tokens == 576  # one image
    assert req.injects_usage  # streaming and did not ask for usage


def test_chat_counts_tool_calls_and_tools():
    plain = parse("chat", body(model="m", messages=[{"role": "user", "content": "hi"}]))
    tools = parse("chat", body(model="m", messages=[{"role": "user", "content": "hi"}],
                               tools=[{"type": "function", "function": {"name": "f"}}]))  # fmt: skip
    assert tools.text_bytes > plain.text_bytes


def test_completions_batch_and_token_ids():
    req = parse("completions", body(model="m", prompt=["ab", "cde"], max_tokens=3, n=2))
    assert req.segments == 2 and req.text_bytes == 5 and req.fanout == 4 and req.output_budget == 12
    ids = parse("completions", body(model="m", prompt=[1, 2, 3, 4]))
    assert ids.exact and ids.extra_tokens == 4 and ids.text_bytes == 0
    batch_ids = parse("completions", body(model="m", prompt=[[1, 2], [3]]))
    assert batch_ids.exact and batch_ids.extra_tokens == 3 and batch_ids.fanout == 2


def test_embeddings_reserve_no_output():
    req = parse("embeddings", body(model="m", input=["a", "bb"]))
    assert req.output_budget == 0 and req.text_bytes == 3
    assert upstream_body(req, 64) is None  # nothing injected into embeddings


def test_responses_api():
    req = parse("responses", body(model="m", input=[{"role": "user", "content": "abc"}], instructions="xy",
                                  max_output_tokens=9))  # fmt: skip
    assert req.max_tokens == 9 and req.text_bytes == 5 and not req.injects_usage
    assert orjson.loads(upstream_body(parse("responses", body(model="m", input="q")), 50))["max_output_tokens"] == 50


@pytest.mark.parametrize(
    "raw, code",
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (body(messages=[]), "missing_model"),
        (body(model="m"), "invalid_messages"),
        (body(model="m", messages="hi"), "invalid_messages"),
        (body(model="m", messages=["hi"]), "invalid_messages"),
        (body(model="m", messages=[{"content": 5}]), "invalid_messages"),
        (body(model="m", messages=[{"content": "x"}], max_tokens=0), "invalid_value"),
        (body(model="m", messages=[{"content": "x"}], max_tokens="9"), "invalid_value"),
        (body(model="m", messages=[{"content": "x"}], max_tokens=True), "invalid_value"),
        (body(model="m", messages=[{"content": "x"}], stream="yes"), "invalid_value"),
        (body(model="m", messages=[{"content": "x"}], n=0), "invalid_value"),
    ],
)
def test_bad_chat_bodies(raw, code):
    with pytest.raises(BadRequest) as exc:
        parse("chat", raw)
    assert exc.value.code == code


def test_bad_prompt():
    with pytest.raises(BadRequest):
        parse("completions", body(model="m", prompt=[{"x": 1}]))
    with pytest.raises(BadRequest):
        parse("embeddings", body(model="m"))


def test_upstream_body_injections():
    req = parse("chat", body(model="m", messages=[{"role": "user", "content": "x"}], stream=True, n=2,
                             stream_options={"include_usage": False, "other": 1}))  # fmt: skip
    out = orjson.loads(upstream_body(req, 64))
    assert out["max_tokens"] == 32  # the per-choice share of what the engine reserved
    assert out["stream_options"] == {"include_usage": True, "other": 1}
    assert out["messages"] == req.body["messages"]
    # The client asked for usage and sent max_tokens: its bytes go through unchanged.
    req = parse("chat", body(model="m", messages=[{"content": "x"}], stream=True, max_tokens=5,
                             stream_options={"include_usage": True}))  # fmt: skip
    assert not req.injects_usage and upstream_body(req, 5) is None
