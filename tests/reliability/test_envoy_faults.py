"""Reliability cases through a real Envoy (docs/RELIABILITY.md): malformed and hostile requests, identity
abuse, upstream faults, and the ext_proc server going away. Every test ends with the books balanced (the
`balanced` fixture: nothing in flight, reserved or queued, no live exchange in the adapter).
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import time

import aiohttp
import pytest

from tests.envoy.harness import CHAT, CONFIG, Response, Running, chat, free_port, sse_events, start_envoy, start_server, tid

pytestmark = pytest.mark.integration

def error(resp: Response, status: int, code: str) -> dict:
    assert resp.status == status, (resp.status, resp.body[:300])
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert err["code"] == code, err
    return err


def raw_request(s: Running, path: str, body: bytes | list[bytes], headers: list[tuple[str, str]],
                timeout: float = 20.0) -> Response:  # fmt: skip
    """One HTTP/1.1 request with headers as a list (repeats allowed); a list body is sent chunked, no length."""
    conn = http.client.HTTPConnection("127.0.0.1", s.listen, timeout=timeout)
    try:
        conn.putrequest("POST", path, skip_accept_encoding=True)
        for k, v in headers:
            conn.putheader(k, v)
        if isinstance(body, list):
            conn.putheader("transfer-encoding", "chunked")
            conn.endheaders()
            for piece in body:
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.send(b"0\r\n\r\n")
        else:
            conn.putheader("content-length", str(len(body)))
            conn.endheaders(body)
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def nothing_upstream(s: Running, t: str) -> None:
    assert s.upstream_requests(t) == [], "the backend must not see a refused request"


# ---- request bodies ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [b"[]", b'"a string"', b"42", b"null", b"[{\"model\": \"m-big\"}]"])
def test_json_that_is_not_an_object_is_400(balanced: Running, raw: bytes):
    t = tid()
    error(balanced.post(CHAT, raw, headers={"x-test-id": t}), 400, "invalid_json")
    nothing_upstream(balanced, t)


@pytest.mark.parametrize(
    "extra, code",
    [
        ({"max_tokens": "10"}, "invalid_value"),  # a string
        ({"max_tokens": 2.5}, "invalid_value"),
        ({"max_tokens": 0}, "invalid_value"),
        ({"max_tokens": True}, "invalid_value"),
        ({"max_tokens": 10**30}, "invalid_value"),  # beyond 64 bits: orjson reads it as a float
        ({"n": "2"}, "invalid_value"),
        ({"stream": "yes"}, "invalid_value"),
        ({"stream_options": [1]}, "invalid_value"),
        ({"messages": "hello"}, "invalid_messages"),
        ({"messages": [{"role": "user", "content": 7}]}, "invalid_messages"),
        ({"model": 7}, "missing_model"),
    ],
)
def test_wrong_types_are_400(balanced: Running, extra: dict, code: str):
    t = tid()
    error(balanced.post(CHAT, {**chat(), **extra}, headers={"x-test-id": t}), 400, code)
    nothing_upstream(balanced, t)


def test_max_tokens_10_to_the_12_can_never_fit_400_over_kv(balanced: Running):
    """A valid integer larger than the pool's whole KV cache: 400 over_kv at once (no Retry-After: waiting cannot
    help), not a 429 and not a queue slot."""
    t = tid()
    resp = balanced.post(CHAT, chat(max_tokens=10**12), headers={"x-test-id": t})
    error(resp, 400, "over_kv")
    assert "retry-after" not in resp.headers
    nothing_upstream(balanced, t)


def test_missing_model_and_empty_messages_are_400(balanced: Running):
    t = tid()
    body = chat()
    del body["model"]
    error(balanced.post(CHAT, body, headers={"x-test-id": t}), 400, "missing_model")
    error(balanced.post(CHAT, chat(messages=[]), headers={"x-test-id": t}), 400, "invalid_messages")
    error(balanced.post("/v1/completions", {"model": "m-big", "prompt": []}, headers={"x-test-id": t}), 400, "invalid_prompt")
    nothing_upstream(balanced, t)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "m-big", "messages": [{"role": "user", "content": "caf\xe9"}]}',  # Latin-1, not UTF-8
        b'{"model": "m-big", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        b'{"model": "m-big", "messages": [{"role": "user", "content": "\\ud800 lone surrogate"}]}',
        b'\xef\xbb\xbf{"model": "m-big", "messages": [{"role": "user", "content": "BOM"}]}',
    ],
)
def test_invalid_utf8_is_400(balanced: Running, raw: bytes):
    t = tid()
    error(balanced.post(CHAT, raw, headers={"x-test-id": t}), 400, "invalid_json")
    nothing_upstream(balanced, t)


def test_deeply_nested_json_is_400_and_moderate_nesting_passes(balanced: Running):
    s = balanced
    t = tid()
    head = json.dumps(chat())[:-1].encode()
    for depth in (200, 5000):  # past our limit of 128; past orjson's own 1024
        raw = head + b', "metadata": ' + b"[" * depth + b"]" * depth + b"}"
        error(s.post(CHAT, raw, headers={"x-test-id": t}), 400, "invalid_json")
    nothing_upstream(s, t)
    # 100 levels in a field we pass through, no max_tokens: the body is rewritten (max_tokens injected) and sent.
    raw = head + b', "metadata": ' + b"[" * 100 + b"]" * 100 + b"}"
    resp = s.post(CHAT, raw, headers={"x-test-id": t})
    assert resp.status == 200, resp.body
    (rec,) = s.upstream_requests(t)
    assert rec["body"]["max_tokens"] == 24


def test_duplicate_keys_last_wins_for_us_and_the_upstream(balanced: Running):
    """Duplicate keys: the last one wins (orjson, and Python's json in vLLM), so what we admit is what runs."""
    s = balanced
    t = tid()
    raw = (b'{"model": "m-tiny", "model": "m-big", "max_tokens": 1000000000000, "max_tokens": 3, '
           b'"messages": [{"role": "user", "content": "hi"}]}')  # fmt: skip
    resp = s.post(CHAT, raw, headers={"x-test-id": t})
    assert resp.status == 200, resp.body  # admitted on m-big with 3 tokens: not over_kv, not model_not_found
    assert resp.json()["usage"]["completion_tokens"] == 3
    (rec,) = s.upstream_requests(t)
    assert rec["body"]["model"] == "m-big" and rec["body"]["max_tokens"] == 3  # the upstream reads it the same way


def test_gzip_request_body_is_415(balanced: Running):
    t = tid()
    body = gzip.compress(json.dumps(chat()).encode())
    resp = balanced.post(CHAT, body, headers={"x-test-id": t, "content-encoding": "gzip"})
    error(resp, 415, "unsupported_content_encoding")
    resp = balanced.post(CHAT, json.dumps(chat(max_tokens=1)).encode(), headers={"content-encoding": "identity"})
    assert resp.status == 200, resp.body
    nothing_upstream(balanced, t)


def test_chunked_body_without_content_length(balanced: Running):
    s = balanced
    t = tid()
    payload = json.dumps(chat(content="y" * 300_000, max_tokens=2)).encode()
    pieces = [payload[i : i + 7000] for i in range(0, len(payload), 7000)]
    headers = [("content-type", "application/json"), ("authorization", "Bearer key-big-a"), ("x-test-id", t)]
    resp = raw_request(s, CHAT, pieces, headers)
    assert resp.status == 200, resp.body
    (rec,) = s.upstream_requests(t)
    assert rec["body_bytes"] == len(payload) and rec["body"]["messages"][0]["content"] == "y" * 300_000


# ---- identity --------------------------------------------------------------------------------------------------------
def test_key_in_query_string_is_ignored_and_not_logged(balanced: Running):
    s = balanced
    t = tid()
    secret = f"sk-query-{t}"
    for param in ("api_key", "key", "api-key"):
        resp = s.post(f"{CHAT}?{param}={secret}", chat(), key=None, headers={"x-test-id": t})
        error(resp, 401, "invalid_api_key")
    nothing_upstream(s, t)
    # A marker request with a path of its own, so we know Envoy has written the lines above to its log.
    marker = f"/v1/marker-{t}"
    error(s.post(marker, chat()), 404, "unknown_url")
    s.wait_for(lambda: marker in (s.workdir / "envoy.log").read_text(errors="replace"), timeout=15, interval=0.2)
    for name in ("envoy", "tokenpools"):
        assert secret not in (s.workdir / f"{name}.log").read_text(errors="replace"), name
    assert f"{CHAT} 401" in (s.workdir / "envoy.log").read_text(errors="replace").replace('"', "")


def test_spoofed_identity_headers(balanced: Running):
    s = balanced
    t = tid()
    spoof = [("x-tokenpools-entitlement", "big-a"), ("x-tokenpools-tenant", "tenant-a"),
             ("x-tokenpools-class", "dedicated"), ("x-tokenpools-request-id", "forged"),
             ("X-TokenPools-Tenant", "tenant-z"), ("x-tokenpools-debug", "1")]  # fmt: skip
    base = [("content-type", "application/json"), ("x-test-id", t)]
    body = json.dumps(chat(max_tokens=2)).encode()
    # Without a key, naming an entitlement in a header gets nobody in (no trusted header is configured).
    error(raw_request(s, CHAT, body, base + spoof), 401, "invalid_api_key")
    nothing_upstream(s, t)
    before = s.status()["entitlements"]
    resp = raw_request(s, CHAT, body, base + spoof + [("authorization", "Bearer key-big-b")])
    assert resp.status == 200, resp.body
    (rec,) = s.upstream_requests(t)
    seen: dict[str, list[str]] = {}
    for k, v in rec["header_list"]:
        if k.startswith("x-tokenpools-"):
            seen.setdefault(k, []).append(v)
    assert seen == {
        "x-tokenpools-entitlement": ["big-b"],
        "x-tokenpools-tenant": ["tenant-b"],
        "x-tokenpools-class": ["spot"],
        "x-tokenpools-request-id": [resp.headers["x-tokenpools-request-id"]],
    }, seen
    after = s.status()["entitlements"]
    assert after["big-b"]["admitted_total"] == before["big-b"]["admitted_total"] + 1  # charged to the real caller
    assert after["big-a"]["admitted_total"] == before["big-a"]["admitted_total"]


# ---- upstream faults ---------------------------------------------------------------------------------------------------
def test_upstream_429_is_passed_on_and_released(balanced: Running):
    s = balanced
    before = s.adapter()
    resp = s.post(CHAT, chat(), headers={"x-test-status": "429"})
    assert resp.status == 429 and resp.json()["error"]["message"] == "injected failure"
    assert s.adapter()["released"] == before["released"] + 1


def test_upstream_reset_before_first_byte_is_503_and_released(balanced: Running):
    s = balanced
    before = s.adapter()
    t = tid()
    resp = s.post(CHAT, chat(), headers={"x-test-reset": "headers", "x-test-id": t})
    assert resp.status == 503, resp.body  # Envoy's local reply: upstream reset before response started
    assert len(s.upstream_requests(t)) == 1  # it reached the backend, which hung up without a byte
    after = s.adapter()
    assert after["released"] == before["released"] + 1 and after["finished"] == before["finished"]


async def _stream(s: Running, payload: dict, headers: dict, give_up: float = 15.0) -> tuple[int | None, bytes, str]:
    """(status or None, bytes received, how it ended: "eof" | "cut" (payload error) | "client timeout")."""
    got = b""
    status = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        try:
            async with asyncio.timeout(give_up):
                async with session.post(f"http://127.0.0.1:{s.listen}{CHAT}", json=payload,
                                        headers={"authorization": "Bearer key-big-a", **headers}) as resp:  # fmt: skip
                    status = resp.status
                    try:
                        async for piece in resp.content.iter_any():
                            got += piece
                    except aiohttp.ClientPayloadError:
                        return status, got, "cut"
                    return status, got, "eof"
        except TimeoutError:
            return status, got, "client timeout"  # leaving the session closes the connection


def test_upstream_timeout_before_first_byte_client_gives_up_and_it_is_released(balanced: Running):
    """No upstream timeout is configured (route timeout 0: generations vary too much; x-envoy-upstream-rq-timeout-ms
    from clients is not honoured), so a backend that never answers is bounded by the client's own timeout (and
    Envoy's 900 s stream_idle_timeout): when the client gives up, the reservation goes back at once."""
    s = balanced
    before = s.adapter()
    t = tid()
    headers = {"x-test-first-byte-delay-ms": "4000", "x-envoy-upstream-rq-timeout-ms": "300", "x-test-id": t}
    status, got, how = asyncio.run(_stream(s, chat(max_tokens=2), headers, give_up=1.0))
    assert (status, got, how) == (None, b"", "client timeout")
    s.wait_for(lambda: s.adapter()["released"] == before["released"] + 1, timeout=3)
    assert s.status()["entitlements"]["big-a"]["in_flight"] == 0
    assert s.adapter()["finished"] == before["finished"]


def test_upstream_stall_mid_stream_client_gives_up_and_streamed_tokens_are_charged(balanced: Running):
    s = balanced
    before = s.adapter()
    status, got, how = asyncio.run(_stream(s, chat(stream=True, max_tokens=50), {"x-test-stall-after": "3"}, give_up=1.5))
    assert status == 200 and how == "client timeout", (status, how)
    assert got.count(b'"content":"t') == 3
    s.wait_for(lambda: s.adapter()["finished"] == before["finished"] + 1, timeout=5)
    after = s.adapter()
    assert after["output_tokens"] - before["output_tokens"] == 3  # the tokens the GPU produced are charged


def test_upstream_error_event_mid_stream(balanced: Running):
    s = balanced
    before = s.adapter()
    status, got, how = asyncio.run(_stream(s, chat(stream=True, max_tokens=50), {"x-test-error-after": "2"}))
    assert status == 200 and how == "eof"
    events = sse_events(got)
    assert events[-1] == "[DONE]" and events[-2]["error"]["message"] == "injected mid-stream failure"
    after = s.adapter()
    assert after["finished"] == before["finished"] + 1
    assert after["output_tokens"] - before["output_tokens"] == 2


def test_garbage_sse_passes_untouched_and_is_not_counted(balanced: Running):
    from extproc.envoy.standin import GARBAGE_EVENTS

    s = balanced
    before = s.adapter()
    status, got, how = asyncio.run(_stream(s, chat(stream=True, max_tokens=8), {"x-test-garbage": "1"}))
    assert status == 200 and how == "eof"
    for event in GARBAGE_EVENTS:
        assert event in got, event  # byte for byte, binary included
    assert got.count(b'"content":"t') == 8 and b'"choices":[]' not in got  # our usage chunk was still dropped
    assert got.endswith(b"data: [DONE]\n\n")
    after = s.adapter()
    assert after["output_tokens"] - before["output_tokens"] == 8
    assert after["exact_usage"] == before["exact_usage"] + 1
    assert after["dropped_usage_chunks"] == before["dropped_usage_chunks"] + 1


def test_garbage_json_response_passes_and_settles(balanced: Running):
    s = balanced
    before = s.adapter()
    resp = s.post(CHAT, chat(max_tokens=3), headers={"x-test-garbage": "1"})
    assert resp.status == 200 and resp.body == b"<html>not json \xff</html>"
    after = s.adapter()
    assert after["finished"] == before["finished"] + 1 and after["exact_usage"] == before["exact_usage"]


def test_unterminated_sse_is_metered_at_the_end(balanced: Running):
    s = balanced
    before = s.adapter()
    status, got, how = asyncio.run(_stream(s, chat(stream=True, max_tokens=4), {"x-test-unterminated": "1"}))
    assert status == 200 and how == "eof"
    # The unterminated last event was our injected usage chunk: parsed at the end of the body, and dropped.
    assert b'"usage"' not in got and b"[DONE]" not in got
    assert got.count(b'"content":"t') == 4
    after = s.adapter()
    assert after["exact_usage"] == before["exact_usage"] + 1
    assert after["dropped_usage_chunks"] == before["dropped_usage_chunks"] + 1
    # A client that asked for usage gets the unterminated chunk as it came.
    payload = chat(stream=True, max_tokens=4, stream_options={"include_usage": True})
    status, got, how = asyncio.run(_stream(s, payload, {"x-test-unterminated": "1"}))
    assert status == 200 and how == "eof" and got.endswith(b"}") and b'"completion_tokens":4' in got


# ---- ext_proc server down ----------------------------------------------------------------------------------------------
def test_ext_proc_stopped_and_restarted_on_the_same_port(stack: Running, tmp_path):
    """failure_mode_allow: false. While the server is down every request gets 503 from Envoy and none reaches
    the backend; once it is back on the same port Envoy reconnects by itself, and the new server's books balance."""
    from extproc.stack import Stack

    s = stack
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    ext_proc, status_port, listen, admin = free_port(), free_port(), free_port(), free_port()
    own = Stack()


    def call(t: str) -> int:
        return s.request("POST", listen, CHAT, json.dumps(chat(max_tokens=1)).encode(),
                         {"authorization": "Bearer key-big-a", "x-test-id": t}, timeout=10).status  # fmt: skip

    try:
        server = start_server(own, tmp_path, config, ext_proc, status_port)
        start_envoy(own, tmp_path, "envoy-restart", listen, admin, ext_proc, s.upstream)
        assert call(tid()) == 200
        server.terminate()  # SIGTERM: the server drains and exits
        server.wait(10)
        down = tid()
        statuses = []
        for _ in range(10):  # right after the stop (connection refused) and after the health check noticed
            statuses.append(call(down))
        assert set(statuses) == {503}, statuses
        assert s.upstream_requests(down) == []  # failed closed: nothing went through unchecked
        start_server(own, tmp_path, config, ext_proc, status_port)
        back = tid()
        deadline = time.monotonic() + 15
        while (code := call(back)) != 200 and time.monotonic() < deadline:
            assert code == 503, code
            time.sleep(0.1)
        assert code == 200
        # The new server's books balance once its requests are done.
        doc = json.loads(s.request("GET", status_port, "/status", timeout=5).body)
        assert all(e["in_flight"] == 0 and e["queued"] == 0 and e["reserved_kv_tokens"] == 0
                   for e in doc["entitlements"].values())  # fmt: skip
        assert json.loads(s.request("GET", status_port, "/status/adapter", timeout=5).body)["live_requests"] == 0
    finally:
        own.stop()
