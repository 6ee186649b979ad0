"""The OpenAI-compatible simulator server, end to end on a free 127.0.0.1 port."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from extproc.sim.profiles import get_profile
from extproc.sim.server import SimConfig, SimServer
from extproc.sim.tokens import chat_prompt_tokens, filler_text

MODEL = "test-model"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world, how are you?"}]


@contextlib.asynccontextmanager
async def served(**kw: Any) -> AsyncIterator[tuple[SimServer, aiohttp.ClientSession]]:
    kw.setdefault("profile", get_profile("h100-llama3-8b"))
    kw.setdefault("time_scale", 20.0)
    server = SimServer(SimConfig(model=MODEL, **kw))
    await server.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession(base_url=server.url) as client:
            yield server, client
    finally:
        await server.stop()


async def sse(resp: aiohttp.ClientResponse) -> list[Any]:
    """Parsed `data:` payloads of an SSE response; '[DONE]' kept as a string."""
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = []
    async for line in resp.content:
        line = line.strip()
        if line.startswith(b"data: "):
            data = line[6:]
            events.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return events


def chat_body(max_tokens: int, **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens, **kw}


def content_chunks(events: list[Any]) -> list[dict[str, Any]]:
    return [e for e in events if e != "[DONE]" and e["choices"] and "content" in e["choices"][0]["delta"]
            and e["choices"][0]["delta"]["content"]]


def test_streaming_chat_one_token_per_chunk_without_usage():
    async def main() -> None:
        async with served() as (_, client):
            events = await sse(await client.post("/v1/chat/completions", json=chat_body(6, stream=True)))
            assert events[-1] == "[DONE]"
            assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            chunks = content_chunks(events)
            assert len(chunks) == 6
            assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == filler_text(0, 6)
            assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 5 + ["length"]
            assert all("usage" not in e for e in events[:-1])
            assert all(e["object"] == "chat.completion.chunk" and e["model"] == MODEL for e in events[:-1])
            assert len({e["id"] for e in events[:-1]}) == 1

    asyncio.run(main())


def test_streaming_include_usage_final_chunk():
    async def main() -> None:
        async with served() as (_, client):
            body = chat_body(5, stream=True, stream_options={"include_usage": True})
            events = await sse(await client.post("/v1/chat/completions", json=body))
            assert events[-1] == "[DONE]"
            usage_chunk = events[-2]
            assert usage_chunk["choices"] == []
            assert usage_chunk["usage"] == {"prompt_tokens": chat_prompt_tokens(MESSAGES), "completion_tokens": 5,
                                            "total_tokens": chat_prompt_tokens(MESSAGES) + 5}
            assert len(content_chunks(events)) == 5
            # Completions endpoint, same contract.
            body = {"model": MODEL, "prompt": "abcdefgh" * 4, "max_tokens": 3, "stream": True,
                    "stream_options": {"include_usage": True}}
            events = await sse(await client.post("/v1/completions", json=body))
            assert [e["choices"][0]["text"] for e in events[:-2]] == [filler_text(i, i + 1) for i in range(3)]
            assert events[-2]["choices"] == [] and events[-2]["usage"] == {
                "prompt_tokens": 8, "completion_tokens": 3, "total_tokens": 11}
            assert events[-2]["object"] == "text_completion"

    asyncio.run(main())


def test_non_streaming_usage_and_max_tokens_rules():
    async def main() -> None:
        async with served(default_max_tokens=7) as (_, client):
            r = await client.post("/v1/chat/completions", json=chat_body(9))
            body = await r.json()
            assert r.status == 200 and body["object"] == "chat.completion"
            assert body["choices"][0]["message"] == {"role": "assistant", "content": filler_text(0, 9)}
            assert body["choices"][0]["finish_reason"] == "length"
            p = chat_prompt_tokens(MESSAGES)
            assert body["usage"] == {"prompt_tokens": p, "completion_tokens": 9, "total_tokens": p + 9}
            # max_completion_tokens wins over max_tokens; absent both, the configured default applies.
            r = await client.post("/v1/chat/completions", json={**chat_body(9), "max_completion_tokens": 4})
            assert (await r.json())["usage"]["completion_tokens"] == 4
            r = await client.post("/v1/chat/completions", json={"messages": MESSAGES})  # no model: the served one
            assert (await r.json())["usage"]["completion_tokens"] == 7
            r = await client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3, 4, 5], "max_tokens": 2})
            body = await r.json()
            assert body["object"] == "text_completion" and body["choices"][0]["text"] == filler_text(0, 2)
            assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}

    asyncio.run(main())


def test_stream_interval_groups_tokens():
    async def main() -> None:
        async with served(stream_interval=4) as (_, client):
            events = await sse(await client.post("/v1/chat/completions", json=chat_body(10, stream=True)))
            sizes = [len(c["choices"][0]["delta"]["content"]) // 4 for c in content_chunks(events)]
            assert sizes == [1, 4, 4, 1]  # first token at once, then every 4, then the rest
            assert "".join(c["choices"][0]["delta"]["content"] for c in content_chunks(events)) == filler_text(0, 10)

    asyncio.run(main())


async def wait_for(pred, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_client_disconnect_aborts_and_frees_kv():
    async def main() -> None:
        async with served(time_scale=1.0) as (server, client):
            s = server.scheduler
            # Streaming: read a few chunks, then drop the connection.
            resp = await client.post("/v1/chat/completions", json=chat_body(4000, stream=True))
            for _ in range(4):
                await resp.content.readline()
            assert s.num_running == 1 and s.kv_usage > 0
            resp.close()
            await wait_for(lambda: s.num_running == 0)
            assert s.kv_usage == 0 and s.aborted_total == 1 and s.request_success_total == 0
            # Non-streaming: the client gives up while the request is being generated.
            task = asyncio.create_task(client.post("/v1/completions", json={"prompt": "x" * 400, "max_tokens": 4000}))
            await wait_for(lambda: s.num_running == 1)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await wait_for(lambda: s.num_running == 0)
            assert s.kv_usage == 0 and s.aborted_total == 2 and not server._handles

    asyncio.run(main())


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_match_internal_state():
    async def main() -> None:
        async with served(profile=get_profile("h100-llama3-8b").replace(max_num_seqs=2)) as (server, client):
            body = chat_body(30)
            await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(5)))
            # One long request still running when scraped, plus queued ones.
            slow = [asyncio.create_task(client.post("/v1/chat/completions", json=chat_body(3000))) for _ in range(3)]
            await wait_for(lambda: server.scheduler.num_running == 2 and server.scheduler.generation_tokens_total > 160)
            await server.pause()  # freeze the engine so the scrape and the scheduler agree exactly
            r = await client.get("/metrics")
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
            s = server.scheduler
            m = parse_metrics(text)
            lab = f'engine="0",model_name="{MODEL}"'
            assert m[f"vllm:num_requests_running{{{lab}}}"] == s.num_running == 2
            assert m[f"vllm:num_requests_waiting{{{lab}}}"] == s.num_waiting == 1
            assert m[f"vllm:kv_cache_usage_perc{{{lab}}}"] == pytest.approx(s.kv_usage)
            assert 0 < s.kv_usage < 1
            assert m[f"vllm:prompt_tokens_total{{{lab}}}"] == s.prompt_tokens_total == 7 * chat_prompt_tokens(MESSAGES)
            assert m[f"vllm:generation_tokens_total{{{lab}}}"] == s.generation_tokens_total
            assert m[f"vllm:num_preemptions_total{{{lab}}}"] == s.num_preemptions_total == 0
            assert m[f'vllm:request_success_total{{{lab},finished_reason="length"}}'] == s.request_success_total == 5
            assert m[f"vllm:e2e_request_latency_seconds_count{{{lab}}}"] == 5
            assert m[f"vllm:request_queue_time_seconds_count{{{lab}}}"] == 5
            assert m[f"vllm:time_to_first_token_seconds_count{{{lab}}}"] == 7
            assert m[f'vllm:time_to_first_token_seconds_bucket{{{lab},le="+Inf"}}'] == 7
            # Every token after the first is one inter-token sample (tokens delivered so far).
            itl = m[f"vllm:inter_token_latency_seconds_count{{{lab}}}"]
            assert itl == sum(max(0, h.delivered - 1) for h in server._handles.values()) + 5 * 29
            # Histogram buckets are cumulative and end at the count.
            buckets = [v for k, v in m.items() if k.startswith("vllm:e2e_request_latency_seconds_bucket")]
            assert buckets == sorted(buckets) and buckets[-1] == 5
            assert re.search(r"^# TYPE vllm:request_queue_time_seconds histogram$", text, re.M)
            server.resume()
            for t in slow:
                t.cancel()
            await asyncio.gather(*slow, return_exceptions=True)

    asyncio.run(main())


def test_reported_times_are_simulated_seconds():
    async def main() -> None:
        prof = get_profile("h100-llama3-8b")
        async with served(profile=prof, time_scale=50.0) as (server, client):
            r = await client.post("/v1/completions", json={"prompt": "a" * 32000, "max_tokens": 1})
            assert (await r.json())["usage"]["prompt_tokens"] == 8000
            m = parse_metrics(await (await client.get("/metrics")).text())
            lab = f'engine="0",model_name="{MODEL}"'
            ttft = m[f"vllm:time_to_first_token_seconds_sum{{{lab}}}"]
            queue = m[f"vllm:request_queue_time_seconds_sum{{{lab}}}"]
            # 8000 prompt tokens in chunks of 2048: four back-to-back simulated steps (~0.27 s), whatever
            # the wall time (~5 ms at time_scale 50).
            steps = [prof.step_time(2048, 0, 2048), prof.step_time(2048, 0, 4096), prof.step_time(2048, 0, 6144),
                     prof.step_time(1856, 0, 8000)]
            assert ttft - queue == pytest.approx(sum(steps), rel=1e-6)
            assert 0 <= queue < 1.0  # wake-up latency only (x50 in simulated time)
            stats = await (await client.get("/sim/stats")).json()
            assert stats["time_scale"] == 50.0 and stats["steps"] == 4 and "lag_max_wall_s" in stats
            assert stats["sim_now_s"] > sum(steps)

    asyncio.run(main())


def test_errors_and_small_endpoints():
    async def main() -> None:
        async with served() as (server, client):
            bad = [
                ("/v1/chat/completions", b"{not json", 400),
                ("/v1/chat/completions", orjson.dumps({"model": MODEL}), 400),
                ("/v1/chat/completions", orjson.dumps({"model": MODEL, "messages": []}), 400),
                ("/v1/chat/completions", orjson.dumps({"model": "other", "messages": MESSAGES}), 404),
                ("/v1/chat/completions", orjson.dumps(chat_body(0)), 400),
                ("/v1/chat/completions", orjson.dumps(chat_body(9000)), 400),
                ("/v1/chat/completions", orjson.dumps(chat_body(5, stream_options={"include_usage": True})), 400),
                ("/v1/chat/completions", orjson.dumps(chat_body(5, n=2)), 400),
                ("/v1/completions", orjson.dumps({"model": MODEL, "prompt": {"a": 1}}), 400),
                ("/v1/completions", orjson.dumps({"model": MODEL, "prompt": "x" * 40000}), 400),
            ]
            for path, data, status in bad:
                r = await client.post(path, data=data, headers={"Content-Type": "application/json"})
                body = await r.json()
                assert r.status == status, (data, body)
                assert set(body["error"]) >= {"message", "type", "code"} and body["error"]["code"] == status
            assert server.scheduler.prompt_tokens_total == 0 and not server.scheduler.has_work
            models = await (await client.get("/v1/models")).json()
            assert [m["id"] for m in models["data"]] == [MODEL]
            assert (await client.get("/health")).status == 200

    asyncio.run(main())
