"""Hot reload of the config file: applied atomically under load, refused (old config kept) when invalid."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.app import TokenpoolsServer
from extproc.config import load_file
from tests.envoy.harness import CHAT, Running, free_port, sse_events, start_envoy, start_server, start_standin

POOL = """apiVersion: tokenpools.io/v1alpha1
kind: TokenPool
metadata: {{name: r}}
spec:
  model: m-r
  perReplica: {{tokensPerSecond: 10000000, concurrency: {conc}, kvCacheTokens: 1000000}}
  queue: {{maxQueued: 64, timeoutSeconds: 2}}
"""
ENT = """---
apiVersion: tokenpools.io/v1alpha1
kind: TokenEntitlement
metadata: {{name: {name}, labels: {{tokenpools.io/demo: "true"}}}}
spec:
  tenantId: {name}
  poolRef: {{name: r}}
  qos: {{serviceClass: {cls}}}
  {limits}
  defaults: {{maxTokens: 8}}
  auth: {{apiKeys: [key-{name}]}}
"""


def render(conc: int = 8, spot_ceiling: int = 6, with_x: bool = True) -> str:
    text = POOL.format(conc=conc)
    text += ENT.format(name="g", cls="guaranteed", limits="resources: {concurrency: 3}")
    text += ENT.format(name="s", cls="spot", limits=f"burst: {{concurrency: {spot_ceiling}}}")
    if with_x:
        text += ENT.format(name="x", cls="elastic", limits="resources: {concurrency: 1}")
    return text


BAD_YAML = "apiVersion: tokenpools.io/v1alpha1\nkind: TokenPool\nmetadata: {name: r\n"  # unterminated flow map
BAD_FIELD = render().replace("tenantId: s", "tenantID: s")  # a typo: unknown field


# ---- in-process: refused changes keep the running config ---------------------------------------------------------
def test_bad_reload_keeps_old_config(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text(render())

    async def main():
        server = TokenpoolsServer(load_file(path), ext_proc_port=0, status_port=0, config_path=str(path))
        await server.start()
        try:
            async def get(path: str) -> bytes:  # the server runs on this loop: ask it without blocking
                reader, writer = await asyncio.open_connection("127.0.0.1", server.status_port)
                writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
                data = await reader.read()
                writer.close()
                return data.split(b"\r\n\r\n", 1)[1]

            async def status() -> dict:
                return orjson.loads(await get("/status"))

            async def until(pred, timeout=10.0):
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    doc = await status()
                    if pred(doc):
                        return doc
                    await asyncio.sleep(0.05)
                raise AssertionError(f"not within {timeout}s: {doc['config']}")

            first = (await status())["config"]
            assert first["ok"] and first["generation"] == 1 and first["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()

            path.write_text(BAD_YAML)  # not YAML at all
            doc = await until(lambda d: d["config"]["reloads"]["error"] == 1)
            assert not doc["config"]["ok"] and "not valid YAML" in doc["config"]["last_error"]
            assert str(path) in doc["config"]["last_error"]
            assert set(doc["entitlements"]) == {"g", "s", "x"} and doc["config"]["generation"] == 1
            assert server.engine.admit("r1", "s", 1, 1, server.clock()).verdict.value == "admit"  # still serving
            server.gateway.dispatch(server.engine.release("r1", server.clock()))

            path.write_text(BAD_FIELD)  # valid YAML, invalid document: the error names document and field
            doc = await until(lambda d: d["config"]["reloads"]["error"] == 2)
            assert "tenantID" in doc["config"]["last_error"] and "TokenEntitlement" in doc["config"]["last_error"]

            dup = render().replace("apiKeys: [key-x]", "apiKeys: [key-g]")  # one key, two entitlements
            path.write_text(dup)
            doc = await until(lambda d: d["config"]["reloads"]["error"] == 3)
            assert "key-g" not in doc["config"]["last_error"]  # never a key in an error message
            assert server.gateway.keys.lookup("key-x") == "x"  # the old key map still answers

            text = (await get("/metrics")).decode()
            reloads = {
                s.labels["result"]: s.value
                for fam in text_string_to_metric_families(text) if fam.name == "tokenpools_config_reloads"
                for s in fam.samples if s.name.endswith("_total")
            }  # fmt: skip
            assert reloads == {"ok": 0, "error": 3}, reloads

            path.write_text(render(spot_ceiling=2, with_x=False))  # valid: applied, the error clears
            doc = await until(lambda d: d["config"]["generation"] == 2)
            assert doc["config"]["ok"] and doc["config"]["last_error"] is None
            assert set(doc["entitlements"]) == {"g", "s"}
            assert doc["entitlements"]["s"]["ceiling"]["concurrency"] == 2
            assert server.gateway.keys.lookup("key-x") is None

            path.write_text(render(spot_ceiling=2, with_x=False))  # same bytes again: nothing to do
            await asyncio.sleep(0.5)
            assert (await status())["config"]["generation"] == 2
            assert server.reload_file() is None  # what SIGHUP calls
        finally:
            await server.stop()

    asyncio.run(main())


# ---- real Envoy: reloads under load lose no request and leak no reservation ----------------------------------------
def _request(r: Running, key: str, stream: bool, results: list) -> None:
    payload = {"model": "m-r", "messages": [{"role": "user", "content": "hi"}], "stream": stream, "max_tokens": 6}
    try:
        resp = r.post(CHAT, payload, key=key, headers={"x-test-delay-ms": "20"}, timeout=30)
    except Exception as exc:  # a reset or a timeout is a lost request
        results.append((key, f"{type(exc).__name__}: {exc}", False))
        return
    complete = True
    if resp.status == 200:
        complete = sse_events(resp.body)[-1] == "[DONE]" if stream else bool(resp.json()["choices"])
    results.append((key, resp.status, complete))


@pytest.mark.integration
def test_hot_reload_under_load_loses_no_request_and_leaks_nothing(tmp_path: Path):
    r = Running(tmp_path, *(free_port() for _ in range(5)))
    stack = r.stack
    path = tmp_path / "config.yaml"
    path.write_text(render())
    try:
        start_standin(stack, tmp_path, r.upstream)
        start_server(stack, tmp_path, path, r.ext_proc, r.status_port)
        start_envoy(stack, tmp_path, "envoy", r.listen, r.admin, r.ext_proc, r.upstream)

        results: list = []
        stop = threading.Event()

        def user(key: str, stream: bool) -> None:
            while not stop.is_set():
                _request(r, key, stream, results)

        users = [threading.Thread(target=user, args=(k, s)) for k in ("key-g", "key-s", "key-s", "key-x") for s in (True, False)]
        for t in users:
            t.start()
        variants = [render(8, 6), render(4, 2, with_x=False), BAD_YAML, render(8, 3), BAD_FIELD, render(6, 6, with_x=False), render(8, 4)]
        deadline = time.monotonic() + 6.0
        writes = 0
        while time.monotonic() < deadline:
            path.write_text(variants[writes % len(variants)])
            writes += 1
            time.sleep(0.3)
        final = render(8, 4)
        path.write_text(final)
        digest = hashlib.sha256(final.encode()).hexdigest()

        r.wait_for(lambda: r.status()["config"]["sha256"] == digest, timeout=10)
        stop.set()
        for t in users:
            t.join(timeout=60)

        lost = [res for res in results if not isinstance(res[1], int) or not res[2]]
        assert not lost, lost[:5]
        by_status: dict = {}
        for key, code, _ in results:
            by_status.setdefault(key, {}).setdefault(code, 0)
            by_status[key][code] += 1
        assert by_status["key-g"].get(200, 0) > 10 and set(by_status["key-g"]) <= {200}, by_status  # guaranteed: always
        assert set(by_status["key-s"]) <= {200, 429}, by_status  # spot: admitted or a clean 429
        # x comes and goes with the config: 401 while it is out, 403 (entitlement_removed) when it goes while waiting
        assert set(by_status["key-x"]) <= {200, 429, 401, 403}, by_status
        assert by_status["key-x"].get(200, 0) > 0 and by_status["key-x"].get(401, 0) > 0, by_status

        cfg = r.status()["config"]
        assert cfg["reloads"]["ok"] >= 4 and cfg["reloads"]["error"] >= 2, cfg
        assert cfg["ok"], cfg

        r.wait_for(r.idle, timeout=10)
        assert r.adapter()["live_requests"] == 0
        assert r.status()["entitlements"]["s"]["ceiling"]["concurrency"] == 4  # the final file is what runs
    finally:
        stack.stop()
