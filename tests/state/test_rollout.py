"""A rolling update of tokenpools replicas under load, the way Kubernetes does it (k8s/ha/): one Envoy whose
ext_proc cluster lists every replica and health-checks them (the Service's ready endpoints), a new replica
joins, an old one is told to stop. Clients must not notice: every request answered 200, every stream whole."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from collections import Counter

import pytest
import yaml

from extproc.envoy.bootstrap import EnvoyPorts, render
from extproc.stack import Stack, envoy_command, wait_http, wait_port

from ..envoy.harness import free_port, start_server, start_standin

pytestmark = pytest.mark.integration

CONFIG = """
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {name: roll}
spec:
  model: m-roll
  perReplica: {tokensPerSecond: 10000000, concurrency: 24, kvCacheTokens: 1000000}
  queue: {timeoutSeconds: 5}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: roll-g, labels: {tokenpools.io/demo: "true"}}
spec:
  tenantId: tenant-g
  poolRef: {name: roll}
  qos: {serviceClass: guaranteed, sloTargetMs: 1000}
  resources: {concurrency: 16}
  auth: {apiKeys: [key-roll]}
"""
INTERVAL, LEASE = 0.2, 1.0


TOKENS, DELAY_MS = 30, 100  # 3 s streams: longer than the 2 s a stopping server grants without a drain


def _stream(port: int) -> tuple[int, bool, float]:
    """(status, stream whole, seconds to the first token)"""
    body = json.dumps({"model": "m-roll", "stream": True, "max_tokens": TOKENS,
                       "messages": [{"role": "user", "content": "hello"}]}).encode()  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    t0 = time.monotonic()
    try:
        conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json",
                     "authorization": "Bearer key-roll", "x-test-delay-ms": str(DELAY_MS)})  # fmt: skip
        resp = conn.getresponse()
        first = resp.read1(1 << 16) if resp.status == 200 else b""
        ttft = time.monotonic() - t0
        data = first + resp.read()
        return resp.status, data.rstrip().endswith(b"data: [DONE]"), ttft
    except (OSError, http.client.HTTPException):
        return -1, False, 0.0
    finally:
        conn.close()


def _envoy_yaml(listen: int, admin: int, ext_ports: list[int], backend: int) -> str:
    doc = yaml.safe_load(render(EnvoyPorts(listen, admin, ext_ports[0]), [("127.0.0.1", backend)]))
    (cluster,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == "tokenpools_ext_proc"]
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}} for p in ext_ports
    ]
    cluster["health_checks"][0].update(interval="0.2s", no_traffic_interval="0.2s", unhealthy_threshold=1)
    # Like a Service's endpoints: a replica that is not ready gets nothing, even when few are ready (Envoy's
    # default would route to every replica, dead ones included, below 50 % healthy).
    cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}}
    return yaml.safe_dump(doc, sort_keys=False)


def test_rolling_update_under_load_refuses_nothing(redis_server, tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG)
    stack = Stack()
    names = ("old-a", "old-b", "new-a")
    ports = {n: (free_port(), free_port()) for n in names}  # ext_proc, status
    backend, listen, admin = free_port(), free_port(), free_port()
    codes: Counter = Counter()
    ttfts: list[float] = []
    timeline: list[tuple[float, str]] = []

    def start(name: str):
        ext, status = ports[name]
        url = f"{redis_server.url}?interval={INTERVAL}&lease={LEASE}&replica={name}"
        return start_server(stack, tmp_path, cfg, ext, status, ["--state", url, "--drain-seconds", "15"], name=name,
                            ready="/livez", timeout=30)  # fmt: skip

    try:
        start_standin(stack, tmp_path, backend)
        procs = {n: start(n) for n in ("old-a", "old-b")}
        for n in ("old-a", "old-b"):
            wait_http(f"http://127.0.0.1:{ports[n][1]}/healthz", 20, procs[n])  # ready: holds a share
        boot = tmp_path / "envoy.yaml"
        boot.write_text(_envoy_yaml(listen, admin, [ports[n][0] for n in names], backend))
        envoy = stack.start("envoy", envoy_command(boot, "warning", concurrency=1), tmp_path / "envoy.log")
        wait_http(f"http://127.0.0.1:{admin}/ready", 30, envoy)
        wait_port(listen, 10, envoy)
        time.sleep(1.0)  # Envoy's health checks have seen both old replicas

        stop = threading.Event()
        lock = threading.Lock()

        def client(delay: float) -> None:
            time.sleep(delay)  # spread over a stream's length: arrivals keep coming, not in waves
            while not stop.is_set():
                started = time.monotonic() - t0
                code, whole, ttft = _stream(listen)
                with lock:
                    codes[(code, whole)] += 1
                    ttfts.append((ttft, round(started, 2)))  # (seconds to the first token, when it started)

        threads = [threading.Thread(target=client, args=(i * 0.3,)) for i in range(10)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(2.0)
        timeline.append((time.monotonic() - t0, "new-a starts"))
        procs["new-a"] = start("new-a")
        wait_http(f"http://127.0.0.1:{ports['new-a'][1]}/healthz", 20, procs["new-a"])
        timeline.append((time.monotonic() - t0, "new-a ready"))
        time.sleep(1.0)  # maxSurge 1: the new one is ready, now an old one goes
        procs["old-a"].send_signal(signal.SIGTERM)
        timeline.append((time.monotonic() - t0, "old-a SIGTERM"))
        procs["old-a"].wait(20)
        timeline.append((time.monotonic() - t0, f"old-a exited {procs['old-a'].returncode}"))
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join(30)
        c = http.client.HTTPConnection("127.0.0.1", ports["new-a"][1], timeout=5)
        c.request("GET", "/status/adapter")
        new_a = json.loads(c.getresponse().read())
    finally:
        stack.stop()
    assert sum(codes.values()) > 25, codes
    assert set(codes) == {(200, True)}, (dict(codes), timeline)
    assert procs["old-a"].returncode == 0
    assert "drained" in (tmp_path / "old-a.log").read_text()
    assert new_a["admitted"] > 0, new_a  # the new replica really served part of the traffic
    # ... without making its first requests wait: it became ready with the share of an equal part of the traffic
    # (before that warm-up it queued 5 of 5 and 6 of 8, 0.2-1.7 s to the first token).
    assert new_a["queued"] <= new_a["admitted"] // 4, new_a
    worst = max(ttfts)
    assert worst[0] < 2.0, (worst, timeline)  # far from the queue's 5 s (measured: at most 0.6 s)
