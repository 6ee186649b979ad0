"""No API key or prompt text in the server's logs: requests with a known key and prompt go through a real Envoy
to `tokenpools serve --log-level debug` (every way of ending: admitted, streamed, unknown key, bad JSON, unknown
model and path, upstream 500, upstream cut, client abort), then the server's whole output (stdout + stderr,
whatever the log format: console or JSON) must contain neither string, nor the key's digest."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket

import pytest

from extproc.envoy.bootstrap import EnvoyPorts, render
from extproc.stack import Stack, envoy_command, free_port, wait_http, wait_port
from tests.envoy.harness import Running, start_server, start_standin

pytestmark = pytest.mark.integration

KEY = "sk-tp-LOGCANARY-7f3a9c21d0"
UNKNOWN_KEY = "sk-tp-LOGCANARY-unknown-55e1"
PROMPT = "PROMPT-CANARY Zebra-Quartz-91 tell me a secret"
NEEDLES = ("LOGCANARY", "Zebra-Quartz", hashlib.sha256(KEY.encode()).hexdigest())

CONFIG = f"""
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {{name: p}}
spec:
  model: m-log
  perReplica: {{tokensPerSecond: 1000000, concurrency: 8, kvCacheTokens: 1000000}}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {{name: log-a}}
spec:
  tenantId: t
  poolRef: {{name: p}}
  qos: {{serviceClass: guaranteed}}
  resources: {{concurrency: 4}}
  auth: {{apiKeySha256: [{hashlib.sha256(KEY.encode()).hexdigest()}]}}
"""


def _stack(work):
    (work / "config.yaml").write_text(CONFIG)
    r = Running(work, free_port(), free_port(), free_port(), free_port(), free_port(), Stack())
    try:
        start_standin(r.stack, work, r.upstream)
        start_server(r.stack, work, work / "config.yaml", r.ext_proc, r.status_port, ["--log-level", "debug"])
        (work / "envoy.yaml").write_text(render(EnvoyPorts(r.listen, r.admin, r.ext_proc), [("127.0.0.1", r.upstream)]))
        envoy = r.stack.start("envoy", envoy_command(work / "envoy.yaml", "info", 1), work / "envoy.log")
        wait_http(f"http://127.0.0.1:{r.admin}/ready", 30, envoy)
        wait_port(r.listen, 10, envoy)
        yield r
    finally:
        r.stack.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    yield from _stack(tmp_path_factory.mktemp("logs"))


def chat(stream: bool = False, model: str = "m-log") -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
    if stream:
        body["stream"] = True
    return body


def abort_mid_stream(port: int) -> None:
    raw = json.dumps(chat(stream=True)).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nauthorization: Bearer "
            f"{KEY}\r\nx-test-delay-ms: 50\r\nx-test-tokens: 20\r\ncontent-length: {len(raw)}\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head + raw)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")


def test_no_key_or_prompt_in_server_logs(stack: Running):
    r = stack
    h = {"x-test-tokens": "3"}
    assert r.post("/v1/chat/completions", chat(), key=KEY, headers=h).status == 200
    assert r.post("/v1/chat/completions", chat(stream=True), key=KEY, headers=h).status == 200
    assert r.post("/v1/chat/completions", chat(), key=UNKNOWN_KEY).status == 401
    assert r.post("/v1/chat/completions", b'{"model": "m-log", "messages": "' + PROMPT.encode(), key=KEY).status == 400
    assert r.post("/v1/chat/completions", chat(model="m-" + PROMPT), key=KEY).status == 404
    assert r.post("/v1/not-an-endpoint", chat(), key=KEY).status == 404  # (paths are in the access log by design)
    assert r.post("/v1/chat/completions", chat(), key=KEY, headers={"x-test-status": "500"}).status == 500
    try:  # upstream cut mid-stream: a 502 if the headers had not gone out yet, else a truncated 200
        assert r.post("/v1/chat/completions", chat(stream=True), key=KEY, headers={"x-test-cut-after": "1", **h}).status == 502
    except http.client.IncompleteRead:
        pass
    abort_mid_stream(r.listen)
    r.wait_for(r.idle, timeout=10)
    r.stack.stop()  # flush and close every log
    server_log = (r.workdir / "tokenpools.log").read_text(errors="replace")
    lines = server_log.splitlines()
    assert len(lines) >= 4, server_log  # debug logging is on and captured (a line per refused request at least)
    for needle in NEEDLES:
        assert needle not in server_log, f"{needle!r} in the server log"
    # Envoy at info with the bootstrap's access log: path and status only, no headers or bodies.
    envoy_log = (r.workdir / "envoy.log").read_text(errors="replace")
    assert "/v1/chat/completions" in envoy_log
    assert "LOGCANARY" not in envoy_log and "Zebra-Quartz" not in envoy_log


@pytest.fixture(scope="module")
def upstream_stack(tmp_path_factory):
    yield from _stack(tmp_path_factory.mktemp("upstream-auth"))


def test_the_backend_does_not_receive_the_tenant_key(upstream_stack: Running):
    r = upstream_stack
    assert r.post("/v1/chat/completions", chat(), key=KEY, headers={"x-test-id": "auth-fwd", "x-test-tokens": "1"}).status == 200
    (rec,) = r.upstream_requests("auth-fwd")
    assert rec["headers"]["x-tokenpools-entitlement"] == "log-a"
    assert "authorization" not in rec["headers"], "the tenant's API key reached the backend"


def test_the_backend_does_not_receive_a_key_sent_in_the_query_string(upstream_stack: Running):
    """A valid header key plus a key-like query parameter: the request is served, the parameter is dropped on the
    way upstream (the rest of the query stays)."""
    r = upstream_stack
    path = f"/v1/chat/completions?api_key={KEY}&trace=1&Key=other"
    assert r.post(path, chat(), key=KEY, headers={"x-test-id": "auth-query", "x-test-tokens": "1"}).status == 200
    (rec,) = r.upstream_requests("auth-query")
    assert rec["path"] == "/v1/chat/completions" and rec["query"] == "trace=1", rec["query"]
