"""Three `tokenpools serve --state redis://...` processes, each behind its own Envoy, one backend, one pool.

The backend counts what really runs at once: its peak concurrency must stay within the pool's slots while
clients hammer all three Envoys; killing one server (SIGKILL, mid-flight) gives its share to the others within
the lease.
"""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from extproc.stack import Stack, serve_command_line, wait_http

from ..envoy.harness import free_port, start_envoy, start_standin
from .harness import claims

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SLOTS = 12
CONFIG = f"""
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {{name: shared}}
spec:
  model: m-shared
  perReplica: {{tokensPerSecond: 10000000, concurrency: {SLOTS}, kvCacheTokens: 1000000}}
  queue: {{timeoutSeconds: 2}}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {{name: sh-g, labels: {{tokenpools.io/demo: "true"}}}}
spec:
  tenantId: tenant-g
  poolRef: {{name: shared}}
  qos: {{serviceClass: guaranteed, sloTargetMs: 500}}
  resources: {{concurrency: 4}}
  auth: {{apiKeys: [key-sh-g]}}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {{name: sh-s, labels: {{tokenpools.io/demo: "true"}}}}
spec:
  tenantId: tenant-s
  poolRef: {{name: shared}}
  qos: {{serviceClass: spot, sloTargetMs: 5000}}
  auth: {{apiKeys: [key-sh-s]}}
"""
INTERVAL, LEASE = 0.2, 1.0


def _get(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def _chat(port: int, key: str) -> int:
    body = json.dumps({"model": "m-shared", "stream": True, "max_tokens": 8,
                       "messages": [{"role": "user", "content": "hello"}]}).encode()  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("POST", "/v1/chat/completions", body, {
            "content-type": "application/json", "authorization": f"Bearer {key}", "x-test-delay-ms": "30",
        })  # fmt: skip
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return -1  # the server behind this Envoy was killed mid-stream
    finally:
        conn.close()


def test_three_servers_behind_envoys_share_one_pool(redis_server, tmp_path):
    stack = Stack()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG)
    backend = free_port()
    servers = []  # (name, proc, ext_proc port, status port, listen port)
    try:
        start_standin(stack, tmp_path, backend)
        for name in ("r0", "r1", "r2"):
            ext, status = free_port(), free_port()
            url = f"{redis_server.url}?interval={INTERVAL}&lease={LEASE}&replica={name}"
            cmd = serve_command_line(str(cfg), ext, status, ["--scaler-port", "0", "--state", url])
            servers.append((name, stack.start(name, cmd, tmp_path / f"{name}.log", cwd=REPO), ext, status, free_port()))
        for name, proc, ext, status, listen in servers:
            wait_http(f"http://127.0.0.1:{status}/healthz", 30, proc)
            start_envoy(stack, tmp_path, f"envoy-{name}", listen, free_port(), ext, backend)
        # Past every replica's probation: each holds a share.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            st = [_get(s[3], "/status/state") for s in servers]
            if all(x["mode"] == "redis" and not x["probation"] and x["share"]["shared"] > 0.1 for x in st):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"replicas did not settle: {st}")

        stop = threading.Event()
        codes: dict[int, int] = {}
        lock = threading.Lock()

        def client(port: int, key: str) -> None:
            while not stop.is_set():
                code = _chat(port, key)
                with lock:
                    codes[code] = codes.get(code, 0) + 1
                if code != 200:
                    time.sleep(0.05)

        with ThreadPoolExecutor(max_workers=30) as pool:
            for i in range(30):
                listen = servers[i % 3][4]
                pool.submit(client, listen, "key-sh-g" if i % 5 == 0 else "key-sh-s")
            time.sleep(3.0)
            victim = servers[2]
            victim[1].send_signal(signal.SIGKILL)  # mid-flight: no goodbye, its requests die with it
            t_kill = time.monotonic()
            gone = None
            while time.monotonic() - t_kill < LEASE + 3:
                if gone is None and victim[0] not in claims(redis_server.url):
                    gone = time.monotonic() - t_kill
                st = [_get(s[3], "/status/state") for s in servers[:2]]
                total = sum(x["share"]["shared"] for x in st)
                if gone is not None and total >= 0.97 and all(x["live_replicas"] == 2 for x in st):
                    break
                time.sleep(0.05)
            regained = time.monotonic() - t_kill
            time.sleep(1.5)  # the survivors now serve the whole pool
            stop.set()
        stats = _get(backend, "/_stats")
        time.sleep(2 * INTERVAL)
        survivors = [_get(s[3], "/status") for s in servers[:2]]
    finally:
        stack.stop()

    assert stats["peak"] <= SLOTS, stats  # never more at once than the pool has (over all three replicas)
    assert stats["peak"] >= SLOTS // 2, stats  # and the pool was really used (shares are floored per replica)
    assert codes.get(200, 0) > 50 and codes.get(429, 0) > 0, codes
    assert gone is not None and gone <= LEASE + 2 * INTERVAL + 0.5, (gone, claims)
    # Once its record is gone each survivor re-splits at its next sync and applies the new share at once (a
    # membership change does not wait for the next control period).
    assert regained - gone <= 2 * INTERVAL + 0.3, (regained, gone, st)
    for snap in survivors:  # books balanced once the clients stopped
        assert snap["pools"]["shared"]["in_flight"] == 0, snap["pools"]
