"""TokenPool / TokenEntitlement custom resources through the real `kubernetes` client, against API server
responses replayed by a fake transport (tests/scaler/kube_responses/, see its README): list, watch (events,
bookmark, 410 → relist), config building with per-object errors, status documents and the merge patch."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import urllib3
from kubernetes import client

from extproc.app import TokenpoolsServer
from extproc.engine import Engine
from extproc.scaler.controller import Controller
from extproc.scaler.kube import ENTITLEMENTS, MERGE_PATCH, POOLS, CustomResources, KubeSync, build_config, status_patches
from tests.k8s.schemas import errors as manifest_errors

HERE = Path(__file__).resolve().parent / "kube_responses"
BASE = "/apis/tokenpools.io/v1alpha1/namespaces/tokenpools"


class _Body(io.BytesIO):
    """A response body that, like a socket's, reports itself closed once read to the end."""

    def read(self, size=-1):
        data = super().read(size)
        if not data:
            self.close()
        return data

    def read1(self, size=-1):
        return self.read(size)


class _Blocking(_Body):
    """A watch that stays open (no events) until released, then ends."""

    def __init__(self, release: threading.Event) -> None:
        super().__init__(b"")
        self.release = release

    def read(self, size=-1):
        self.release.wait(10)
        return super().read(size)


class FakeAPIServer:
    """urllib3 PoolManager stand-in: answers from recorded responses, in order, per (method, path, watch)."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str, bool], list] = {}
        self.requests: list[dict] = []
        self.release = threading.Event()

    def add(self, method: str, path: str, body: str | bytes | None, watch: bool = False, status: int = 200) -> None:
        self.routes.setdefault((method, BASE + path, watch), []).append((body, status))

    def request(self, method, url, fields=None, body=None, timeout=None, headers=None, preload_content=False, **kw):
        parts = urlsplit(url)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        watch = query.get("watch") == "true"
        self.requests.append({"method": method, "path": parts.path, "query": query, "headers": dict(headers or {}),
                              "body": json.loads(body) if body else None})  # fmt: skip
        queue = self.routes.get((method, parts.path, watch))
        if not queue:
            if watch:  # nothing more recorded: an idle watch
                return urllib3.HTTPResponse(body=_Blocking(self.release), status=200, preload_content=False,
                                            headers={"content-type": "application/json"})  # fmt: skip
            raise AssertionError(f"unexpected request {method} {url}")
        data, status = queue.pop(0)
        raw = data.encode() if isinstance(data, str) else data
        return urllib3.HTTPResponse(body=_Body(raw), status=status, reason="OK", preload_content=False,
                                    headers={"content-type": "application/json"})  # fmt: skip


def recorded(name: str) -> str:
    return (HERE / name).read_text()


def api(fake: FakeAPIServer) -> client.CustomObjectsApi:
    cfg = client.Configuration()
    cfg.host = "https://kube.test"
    api_client = client.ApiClient(cfg)
    api_client.rest_client.pool_manager = fake
    return client.CustomObjectsApi(api_client)


def listed() -> tuple[FakeAPIServer, CustomResources]:
    fake = FakeAPIServer()
    fake.add("GET", "/tokenpools", recorded("list_tokenpools.json"))
    fake.add("GET", "/tokenentitlements", recorded("list_tokenentitlements.json"))
    res = CustomResources(api(fake), "tokenpools")
    res.list_all()
    return fake, res


def test_list_builds_the_config_and_reports_bad_objects_one_by_one():
    fake, res = listed()
    assert [r["path"] for r in fake.requests] == [BASE + "/tokenpools", BASE + "/tokenentitlements"]
    assert res.resource_version == {POOLS: "1010", ENTITLEMENTS: "1010"}
    config, errors = build_config(res.objects)
    assert list(config.pools) == ["paper-spark"]
    assert list(config.entitlements) == ["guaranteed-a", "spot-b"]  # creation order: first come, first bound
    assert config.entitlements["guaranteed-a"].metadata.labels == {"team": "a"}
    assert config.entitlements["guaranteed-a"].metadata.namespace == "tokenpools"
    assert set(errors) == {(POOLS, "broken"), (ENTITLEMENTS, "no-baseline"), (ENTITLEMENTS, "orphan")}
    assert "min <= max" in errors[(POOLS, "broken")]
    assert "needs a baseline" in errors[(ENTITLEMENTS, "no-baseline")]
    assert "no TokenPool named 'broken'" in errors[(ENTITLEMENTS, "orphan")]


def test_watch_events_and_bookmarks():
    fake, res = listed()
    fake.add("GET", "/tokenentitlements", recorded("watch_tokenentitlements.jsonl"), watch=True)
    changes = []
    res.changed = lambda: changes.append(res.generation)
    assert res.watch_once(ENTITLEMENTS, timeout_seconds=60) == 4
    req = fake.requests[-1]
    assert req["query"] == {"watch": "true", "resourceVersion": "1010", "timeoutSeconds": "60", "allowWatchBookmarks": "true"}
    ents = res.objects[ENTITLEMENTS]
    assert "guaranteed-c" in ents and "spot-b" not in ents
    assert ents["guaranteed-a"]["spec"]["resources"] == {"concurrency": 8}
    assert res.resource_version[ENTITLEMENTS] == "1020"  # from the bookmark
    assert len(changes) == 3  # added, modified, deleted; the bookmark is no change
    config, _ = build_config(res.objects)
    assert list(config.entitlements) == ["guaranteed-a", "guaranteed-c"]


def test_an_expired_watch_lists_again():
    fake, res = listed()
    fake.add("GET", "/tokenpools", recorded("watch_tokenpools_expired.jsonl"), watch=True)
    fake.add("GET", "/tokenpools", recorded("list_tokenpools_relist.json"))
    assert res.watch_once(POOLS) == 0
    assert res.resource_version[POOLS] == "1500" and res.relists == 3
    assert res.objects[POOLS]["paper-spark"]["spec"]["replicas"]["max"] == 8 and "broken" not in res.objects[POOLS]


def test_status_is_computed_validated_and_patched_only_when_it_changes():
    fake, res = listed()
    config, errs = build_config(res.objects)
    engine = Engine(config, 0.0)
    ctl = Controller(engine, clock=lambda: 0.0)
    ctl.step(0.0)
    patches = status_patches(res.objects, errs, engine, ctl, stamp="2026-11-20T11:00:00Z")
    by = {(p, n): st for p, n, st in patches}
    # guaranteed-a already carries exactly this status (e.g. written before a restart): nothing to write.
    assert (ENTITLEMENTS, "guaranteed-a") not in by
    pool = by[(POOLS, "paper-spark")]
    assert pool["phase"] == "Ready" and pool["replicas"] == 1 and pool["desiredReplicas"] == 1
    assert pool["required"]["concurrency"] == 6 and pool["observedGeneration"] == 1
    assert by[(POOLS, "broken")]["phase"] == "Invalid" and "min <= max" in by[(POOLS, "broken")]["conditions"][0]["message"]
    assert by[(ENTITLEMENTS, "spot-b")]["phase"] == "Bound"
    assert by[(ENTITLEMENTS, "no-baseline")]["phase"] == "Invalid"
    # Every status document is valid against the CRD's status schema.
    for plural, name, st in patches:
        kind = "TokenPool" if plural == POOLS else "TokenEntitlement"
        obj = {**res.objects[plural][name], "status": {k: v for k, v in st.items() if v is not None}}
        assert not manifest_errors(obj), (name, manifest_errors(obj))
    # The wire: a merge patch of the status subresource.
    fake.add("PATCH", "/tokenpools/paper-spark/status", recorded("patch_status_response.json"))
    res.patch_status(POOLS, "paper-spark", pool)
    req = fake.requests[-1]
    assert req["method"] == "PATCH" and req["path"] == BASE + "/tokenpools/paper-spark/status"
    assert req["headers"]["Content-Type"] == MERGE_PATCH and req["body"] == {"status": pool}


def test_status_clears_what_no_longer_applies_and_keeps_transition_times():
    _, res = listed()
    config, errs = build_config(res.objects)
    engine = Engine(config, 0.0)
    obj = res.objects[ENTITLEMENTS]["guaranteed-a"]
    obj["status"]["stale"] = 1
    (patch,) = [st for p, n, st in status_patches(res.objects, errs, engine, None, "2026-11-21T00:00:00Z") if n == "guaranteed-a"]
    assert patch["stale"] is None  # merge patch: null removes it
    assert patch["conditions"][1]["lastTransitionTime"] == "2026-11-20T10:00:03Z"  # unchanged condition keeps its time


def test_a_running_server_follows_the_custom_resources():
    """KubeSync end to end with its watch threads: a new entitlement arrives by watch, the server reloads
    (engine and API keys), its status is written back; our own status write coming back changes nothing."""
    fake, res = listed()
    fake.add("GET", "/tokenentitlements", recorded("watch_tokenentitlements.jsonl"), watch=True)
    fake.add("PATCH", "/tokenpools/paper-spark/status", recorded("patch_status_response.json"))
    for name in ("broken",):
        fake.add("PATCH", f"/tokenpools/{name}/status", "{}")
    for name in ("guaranteed-a", "guaranteed-c", "spot-b", "no-baseline", "orphan"):
        fake.add("PATCH", f"/tokenentitlements/{name}/status", "{}")
    res2 = CustomResources(api(fake), "tokenpools")
    fake.add("GET", "/tokenpools", recorded("list_tokenpools.json"))
    fake.add("GET", "/tokenentitlements", recorded("list_tokenentitlements.json"))
    kube = KubeSync(res2, reload=None, engine=None, status_period_s=0.1, debounce_s=0.05)
    config = kube.initial()

    async def run():
        server = TokenpoolsServer(config, ext_proc_port=0, status_port=0, scaler_port=0, kube=kube)
        await server.start()
        try:
            async with asyncio.timeout(5):
                while "guaranteed-c" not in server.engine.ents:
                    await asyncio.sleep(0.02)
            assert "spot-b" not in server.engine.ents and server.engine.ents["guaranteed-a"].b_conc == 8
            assert server.gateway.config is server.config
            assert server.gateway.keys.lookup("demo-key-c") == "guaranteed-c"  # its API key works at once
            assert server.gateway.keys.lookup("demo-key-b") is None  # the deleted one's no longer does
            async with asyncio.timeout(5):
                while not any(r["method"] == "PATCH" and r["path"].endswith("guaranteed-c/status") for r in fake.requests):
                    await asyncio.sleep(0.02)
            applied = server.config
            assert kube.sync() is False and server.config is applied  # nothing new
        finally:
            fake.release.set()
            await server.stop(grace=0.2)

    try:
        asyncio.run(run())
    finally:
        fake.release.set()
