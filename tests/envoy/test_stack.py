"""`tokenpools up` end to end: starts, serves a completion for a demo key through Envoy, stops on Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from extproc.stack import wait_http

from .harness import REPO, Running, free_port

pytestmark = pytest.mark.integration


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_up_serves_and_stops_cleanly(tmp_path):
    ports = {name: free_port() for name in ("listen", "admin", "ext_proc", "status", "backend")}
    cmd = [
        sys.executable, "-m", "extproc.cli", "up",
        "--listen-port", str(ports["listen"]), "--admin-port", str(ports["admin"]),
        "--ext-proc-port", str(ports["ext_proc"]), "--status-port", str(ports["status"]),
        "--backend-port", str(ports["backend"]), "--logs", str(tmp_path),
    ]  # fmt: skip
    out = open(tmp_path / "up.out", "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{ports['admin']}/ready", 60, proc)
        deadline = time.monotonic() + 20
        while b"Ctrl-C stops everything" not in (tmp_path / "up.out").read_bytes():
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "up.out").read_text()
            time.sleep(0.1)
        banner = (tmp_path / "up.out").read_text()
        assert "Bearer demo-key-a" in banner and f"127.0.0.1:{ports['listen']}/v1/chat/completions" in banner
        children = _children(proc.pid)
        assert len(children) == 3  # backend, tokenpools, envoy

        client = Running(tmp_path, ports["listen"], ports["admin"], ports["ext_proc"], ports["status"], ports["backend"])
        resp = client.post("/v1/chat/completions", {"model": "qwen3-8b", "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": "Say hello"}]},
                           key="demo-key-a")  # fmt: skip
        assert resp.status == 200, resp.body
        assert resp.json()["usage"]["completion_tokens"] == 4
        assert client.post("/v1/chat/completions", {"model": "qwen3-8b"}, key="not-a-demo-key").status == 401
        assert json.loads(client.request("GET", ports["status"], "/status").body)["entitlements"]["guaranteed-a"][
            "admitted_total"
        ] == 1

        proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers
        assert proc.wait(20) == 0
        for pid in children:  # every child is gone, none left behind
            assert not _is_running(pid), pid
    except BaseException:
        for log in sorted(tmp_path.glob("*.log")) + [tmp_path / "up.out"]:  # shown by pytest on failure
            print(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def _is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
