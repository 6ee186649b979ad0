"""A replica is ready (gRPC health SERVING, /healthz 200) only once it holds a share of the pools: during its
first lease with shared state it admits next to nothing, so probes and Envoy's health check must keep traffic
away from it. /livez stays 200 throughout (alive, only not ready)."""

from __future__ import annotations

import http.client
import time

import pytest

from extproc.stack import Stack

from ..envoy.harness import free_port, start_server

pytestmark = pytest.mark.integration

CONFIG = """
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {name: ready}
spec:
  model: m-ready
  perReplica: {tokensPerSecond: 10000000, concurrency: 8, kvCacheTokens: 1000000}
"""
LEASE = 1.5


def _get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def test_not_ready_until_it_holds_a_share(redis_server, tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG)
    stack = Stack()
    seen: list[tuple[float, int, str, int]] = []
    try:
        ext, status = free_port(), free_port()
        url = f"{redis_server.url}?interval=0.2&lease={LEASE}&replica=r0"
        start_server(stack, tmp_path, cfg, ext, status, ["--state", url], name="r0", ready="/livez", timeout=30)
        t0 = time.monotonic()
        while time.monotonic() - t0 < LEASE + 2.0:
            code, text = _get(status, "/healthz")
            live, _ = _get(status, "/livez")
            seen.append((time.monotonic() - t0, code, text.strip(), live))
            if code == 200:
                break
            time.sleep(0.05)
        state = _get(status, "/status/state")[1]
    finally:
        stack.stop()
    assert seen[0][1:3] == (503, "joining"), seen[:3]  # first lease: probation, no share yet
    assert seen[-1][1:3] == (200, "ok"), seen[-3:]  # then ready, once its share is granted
    assert 0.5 * LEASE <= seen[-1][0] <= LEASE + 1.0, seen[-1]
    assert all(live == 200 for *_, live in seen)  # alive all along
    assert '"probation":false' in state.replace(" ", "")


def test_memory_store_is_ready_at_once():
    from extproc.state import MemoryStore

    assert MemoryStore().ready()
