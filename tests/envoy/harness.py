"""Real processes on free 127.0.0.1 ports: the stand-in backend, `tokenpools serve`, and Envoy."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extproc.envoy.bootstrap import EnvoyPorts, render
from extproc.stack import Stack, envoy_command, serve_command_line, wait_http, wait_port

REPO = Path(__file__).resolve().parents[2]
DIGEST_KEY = "secret-key-digest"  # stored in the config only as its SHA-256 digest

# Pools for the tests; each test uses its own so tests do not disturb one another.
#   m-big    plenty of everything: admit, metering, large prompts, the 200-request run
#   m-tiny   one slot, 1.5 s queue: queue then admit, queue deadline, abort while queued
#   m-noq    one slot, no queue: immediate 429 with Retry-After
#   m-evict  two slots shared by a preemptible and a guaranteed entitlement
CONFIG = """
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {name: big}
spec:
  model: m-big
  perReplica: {tokensPerSecond: 10000000, concurrency: 32, kvCacheTokens: 50000000}
  queue: {maxQueued: 1000, maxQueuedPerEntitlement: 1000, timeoutSeconds: 30}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {name: tiny}
spec:
  model: m-tiny
  perReplica: {tokensPerSecond: 10000000, concurrency: 1, kvCacheTokens: 1000000}
  queue: {timeoutSeconds: 1.5}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {name: noq}
spec:
  model: m-noq
  perReplica: {tokensPerSecond: 10000000, concurrency: 1, kvCacheTokens: 1000000}
  queue: {maxQueued: 0}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {name: evict}
spec:
  model: m-evict
  perReplica: {tokensPerSecond: 10000000, concurrency: 2, kvCacheTokens: 1000000}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: big-a, labels: {tokenpools.io/demo: "true"}}
spec:
  tenantId: tenant-a
  poolRef: {name: big}
  qos: {serviceClass: guaranteed, sloTargetMs: 500}
  resources: {concurrency: 16}
  defaults: {maxTokens: 24}
  auth: {apiKeys: [key-big-a]}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: big-b, labels: {tokenpools.io/demo: "true"}}
spec:
  tenantId: tenant-b
  poolRef: {name: big}
  qos: {serviceClass: spot, sloTargetMs: 5000}
  burst: {concurrency: 24}
  auth: {apiKeys: [key-big-b]}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: big-d}
spec:
  tenantId: tenant-d
  poolRef: {name: big}
  qos: {serviceClass: elastic, sloTargetMs: 1000}
  resources: {concurrency: 4}
  auth: {apiKeySha256: [DIGEST]}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: tiny-a, labels: {tokenpools.io/demo: "true"}}
spec:
  tenantId: tenant-a
  poolRef: {name: tiny}
  qos: {serviceClass: guaranteed}
  resources: {concurrency: 1}
  auth: {apiKeys: [key-tiny-a]}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: noq-a, labels: {tokenpools.io/demo: "true"}}
spec:
  tenantId: tenant-a
  poolRef: {name: noq}
  qos: {serviceClass: guaranteed}
  resources: {concurrency: 1}
  auth: {apiKeys: [key-noq-a]}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: ev-g, labels: {tokenpools.io/demo: "true"}}
spec:
  tenantId: tenant-g
  poolRef: {name: evict}
  qos: {serviceClass: guaranteed, sloTargetMs: 500}
  resources: {concurrency: 2}
  auth: {apiKeys: [key-ev-g]}
---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {name: ev-p, labels: {tokenpools.io/demo: "true"}}
spec:
  tenantId: tenant-p
  poolRef: {name: evict}
  qos: {serviceClass: preemptible}
  burst: {concurrency: 2}
  auth: {apiKeys: [key-ev-p]}
""".replace("DIGEST", hashlib.sha256(DIGEST_KEY.encode()).hexdigest())

MAX_BODY = 4 * 1024 * 1024


CHAT = "/v1/chat/completions"


def chat(model: str = "m-big", content: str = "hello there", **extra) -> dict:
    """An OpenAI chat body for the harness config's pools (m-big by default)."""
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def tid() -> str:
    """A fresh x-test-id, to find a request's record at the stand-in."""
    return uuid.uuid4().hex[:12]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Running:
    workdir: Path
    listen: int
    admin: int
    ext_proc: int
    status_port: int
    upstream: int
    stack: Stack = field(default_factory=Stack)

    # -- HTTP helpers (plain http.client: one connection per call, always with a timeout) --
    def request(
        self, method: str, port: int, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
        timeout: float = 20.0,
    ) -> Response:  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        finally:
            conn.close()

    def post(self, path: str, payload: Any, key: str | None = "key-big-a", headers: dict[str, str] | None = None,
             timeout: float = 20.0) -> Response:  # fmt: skip
        h = {"content-type": "application/json", **(headers or {})}
        if key is not None:
            h["authorization"] = f"Bearer {key}"
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.request("POST", self.listen, path, body, h, timeout)

    def status(self) -> dict:
        return self.request("GET", self.status_port, "/status", timeout=5).json()

    def adapter(self) -> dict:
        return self.request("GET", self.status_port, "/status/adapter", timeout=5).json()

    def upstream_requests(self, test_id: str) -> list[dict]:
        return self.request("GET", self.upstream, f"/_requests?id={test_id}", timeout=5).json()

    def wait_for(self, predicate, timeout: float = 5.0, interval: float = 0.05):
        """Poll predicate() until truthy; return its value or raise AssertionError with the last value."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        raise AssertionError(f"condition not met within {timeout}s (last: {value!r})")

    def idle(self) -> bool:
        snap = self.status()
        ents = snap["entitlements"].values()
        pools = snap["pools"].values()
        return all(e["in_flight"] == 0 and e["reserved_kv_tokens"] == 0 and e["queued"] == 0 for e in ents) and all(
            p["used"]["concurrency"] == 0 and p["used"]["kv_cache_tokens"] == 0 and p["queued"] == 0 for p in pools
        )

    def log_tail(self, name: str, n: int = 40) -> str:
        path = self.workdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def start_standin(stack: Stack, workdir: Path, port: int, name: str = "upstream"):
    """The stand-in backend (extproc/envoy/standin.py) on `port`, log in workdir/NAME.log; returns once it answers."""
    proc = stack.start(name, [sys.executable, "-m", "extproc.envoy.standin", "--port", str(port)], workdir / f"{name}.log",
                       cwd=REPO)  # fmt: skip
    wait_http(f"http://127.0.0.1:{port}/_stats", 20, proc)
    return proc


def start_server(stack: Stack, workdir: Path, config: Path, ext_proc: int, status_port: int, extra: list[str] | None = None,
                 name: str = "tokenpools", ready: str = "/healthz", timeout: float = 20.0):  # fmt: skip
    """`tokenpools serve` (log in workdir/NAME.log); returns once its status port answers `ready` with 200."""
    proc = stack.start(name, serve_command_line(str(config), ext_proc, status_port, extra), workdir / f"{name}.log", cwd=REPO)
    wait_http(f"http://127.0.0.1:{status_port}{ready}", timeout, proc)
    return proc


def start_envoy(stack: Stack, workdir: Path, name: str, listen: int, admin: int, ext_proc: int, upstream: int):
    bootstrap = workdir / f"{name}.yaml"
    bootstrap.write_text(render(EnvoyPorts(listen, admin, ext_proc), [("127.0.0.1", upstream)]))
    proc = stack.start(name, envoy_command(bootstrap, "warning", concurrency=1), workdir / f"{name}.log")
    wait_http(f"http://127.0.0.1:{admin}/ready", 30, proc)
    wait_port(listen, 10, proc)
    return proc


def start(workdir: Path) -> Running:
    r = Running(workdir, free_port(), free_port(), free_port(), free_port(), free_port())
    config = workdir / "config.yaml"
    config.write_text(CONFIG)
    try:
        start_standin(r.stack, workdir, r.upstream)
        start_server(r.stack, workdir, config, r.ext_proc, r.status_port, ["--max-body-bytes", str(MAX_BODY)])
        start_envoy(r.stack, workdir, "envoy", r.listen, r.admin, r.ext_proc, r.upstream)
    except Exception:
        r.stack.stop()
        raise
    return r


def sse_events(body: bytes) -> list[Any]:
    """Parsed `data:` payloads of an SSE body ('[DONE]' kept as the string)."""
    out: list[Any] = []
    for block in body.split(b"\n\n"):
        for line in block.splitlines():
            if line.startswith(b"data:"):
                payload = line[5:].strip()
                out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return out
