"""SIGTERM drains: the server stops being ready, lets the streams it holds finish (still serving newcomers
meanwhile), then exits; `--drain-seconds` bounds the wait. Real Envoy, the stand-in backend, `tokenpools serve`."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from pathlib import Path

import pytest

from extproc.stack import Stack

from ..envoy.harness import free_port, start_envoy, start_server, start_standin

pytestmark = pytest.mark.integration

CONFIG = """
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {name: drain}
spec:
  model: m-drain
  perReplica: {tokensPerSecond: 10000000, concurrency: 8, kvCacheTokens: 1000000}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: drain-a, labels: {tokenpools.io/demo: "true"}}
spec:
  tenantId: tenant-a
  poolRef: {name: drain}
  qos: {serviceClass: guaranteed}
  resources: {concurrency: 8}
  auth: {apiKeys: [key-drain]}
"""


def _chat(port: int, stream: bool, tokens: int, delay_ms: int, out: dict | None = None) -> dict:
    body = json.dumps({"model": "m-drain", "stream": stream, "max_tokens": tokens,
                       "messages": [{"role": "user", "content": "hello"}]}).encode()  # fmt: skip
    res = out if out is not None else {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json",
                     "authorization": "Bearer key-drain", "x-test-delay-ms": str(delay_ms)})  # fmt: skip
        resp = conn.getresponse()
        res["status"] = resp.status
        res["body"] = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        res["error"] = repr(exc)
    finally:
        res["ended"] = time.monotonic()
        conn.close()
    return res


def _healthz(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    finally:
        conn.close()


def _stack(tmp_path: Path, drain: float):
    stack = Stack()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG)
    backend, ext, status, listen = free_port(), free_port(), free_port(), free_port()
    start_standin(stack, tmp_path, backend)
    server = start_server(stack, tmp_path, cfg, ext, status, ["--drain-seconds", str(drain)], name="server", timeout=30)
    start_envoy(stack, tmp_path, "envoy", listen, free_port(), ext, backend)
    return stack, server, status, listen


def _stream_then_sigterm(server, listen: int, tokens: int) -> tuple[dict, threading.Thread, float]:
    """Start a stream of `tokens` tokens, 100 ms apart, through Envoy; SIGTERM the server 0.5 s into it."""
    assert _chat(listen, False, 2, 0)["status"] == 200  # warm: Envoy's health check has seen the server
    long: dict = {}
    t = threading.Thread(target=_chat, args=(listen, True, tokens, 100, long))
    t.start()
    time.sleep(0.5)
    server.send_signal(signal.SIGTERM)
    return long, t, time.monotonic()


def test_sigterm_lets_open_streams_finish_and_serves_newcomers_meanwhile(tmp_path):
    stack, server, status, listen = _stack(tmp_path, drain=20)
    try:
        # ~4 s of tokens: longer than the 2 s the gRPC stop grants open streams without a drain
        long, t, t_term = _stream_then_sigterm(server, listen, 40)
        time.sleep(0.2)
        assert server.poll() is None  # still there: a stream is open
        assert _healthz(status) == 503  # not ready: readiness probes and health checks move traffic away
        newcomer = _chat(listen, False, 2, 0)  # one that still arrives is served, not refused
        t.join(15)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.05)
        exited = time.monotonic()
        rc = server.poll()
    finally:
        stack.stop()
    assert newcomer.get("status") == 200, newcomer
    assert long.get("status") == 200 and long["body"].rstrip().endswith(b"data: [DONE]"), long
    assert long["body"].count(b'"content"') >= 40, long["body"][-300:]  # every token arrived
    assert long["ended"] - t_term > 2.5  # it really was still streaming when the signal came
    assert rc == 0, rc
    assert exited - long["ended"] < 2.0, (exited - long["ended"])  # and the server left once it was done
    log = (tmp_path / "server.log").read_text()
    assert '"draining"' in log or "draining" in log
    assert "drained" in log


def test_drain_is_bounded_by_drain_seconds(tmp_path):
    stack, server, status, listen = _stack(tmp_path, drain=0.5)
    try:
        long, t, t_term = _stream_then_sigterm(server, listen, 100)  # ~10 s of tokens
        server.wait(10)
        took = time.monotonic() - t_term
        t.join(10)
    finally:
        stack.stop()
    assert server.returncode == 0
    assert took < 0.5 + 2.0 + 1.0, took  # drain bound, then the gRPC stop's grace
    assert long.get("error") or not long.get("body", b"").rstrip().endswith(b"data: [DONE]"), long  # cut
    assert long["ended"] - t_term < 5.0
    assert "drain cut short" in (tmp_path / "server.log").read_text()


def test_a_second_signal_stops_at_once(tmp_path):
    stack, server, status, listen = _stack(tmp_path, drain=20)
    try:
        long, t, _ = _stream_then_sigterm(server, listen, 100)  # ~10 s of tokens
        time.sleep(0.5)
        assert server.poll() is None  # draining
        server.send_signal(signal.SIGINT)  # the operator insists (a second Ctrl-C)
        t_second = time.monotonic()
        server.wait(10)
        took = time.monotonic() - t_second
        t.join(10)
    finally:
        stack.stop()
    assert server.returncode == 0
    assert took < 2.0 + 1.0, took  # no more waiting for the stream: only the gRPC stop's grace
