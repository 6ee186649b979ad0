"""Screenshot of the status page (GET / on the status server) with live traffic, in a real headless Chromium.

    python -m bench.screenshot --out docs/img/status.png
    python -m bench.screenshot --serve 60 --status-port 9464   # no screenshot: the same server and traffic for
                                                              # 60 s, to try `tokenpools top` or a browser on

Starts a TokenpoolsServer in-process on free ports with the demo config (extproc/stack.py default_config_path():
the paper's Exp 1 pool and tenants) and a controller (so desired replicas show), drives closed-loop traffic
through its ext_proc gRPC the way Envoy would (extproc/ui/traffic.py: guaranteed-a and guaranteed-c within
their baselines, spot-b over-subscribed so it gets 429s), waits a few seconds so there are rates, then runs

    chromium --headless --screenshot=OUT --window-size=1400,900 --virtual-time-budget=3000 http://127.0.0.1:PORT/

Needs Debian's chromium (`apt-get install -y chromium`); as root it runs with --no-sandbox. The helpers here
(chromium_binary, chromium_command) are also used by tests/ui to render the page with --dump-dom.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

# A demo mix for the demo config: guaranteed-a and -c within their 6 slots, spot-b asking for far more than the
# pool has left. Holding each request ~3 s keeps throughput near what the 16-slot pool really does.
DEMO_USERS = {"demo-key-a": 5, "demo-key-b": 16, "demo-key-c": 4}


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium_command(url: str, *args: str, budget_ms: int = 3000, size: str = "1400,900") -> list[str]:
    binary = chromium_binary()
    if binary is None:
        raise FileNotFoundError("chromium not found (Debian: apt-get install -y chromium)")
    cmd = [binary, "--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--disable-extensions",
           f"--window-size={size}", f"--virtual-time-budget={budget_ms}"]  # fmt: skip
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    return [*cmd, *args, url]


async def run_chromium(cmd: list[str], timeout: float = 60.0) -> bytes:
    """Run chromium without blocking the event loop (the server it looks at runs on the same loop)."""
    with tempfile.TemporaryDirectory(prefix="tokenpools-chromium-") as profile:
        proc = await asyncio.create_subprocess_exec(
            *cmd[:-1], f"--user-data-dir={profile}", cmd[-1],
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"chromium exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
        return out


async def demo_server(warmup_s: float, traffic_s: float, status_port: int = 0):
    """A started server with the demo config and traffic running; returns (server, traffic task)."""
    import structlog

    from extproc.app import TokenpoolsServer
    from extproc.config import load_file
    from extproc.stack import default_config_path
    from extproc.ui.traffic import drive

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    server = TokenpoolsServer(load_file(default_config_path()), ext_proc_port=0, status_port=status_port, scaler_port=0)
    await server.start()
    traffic = asyncio.create_task(drive(server.ext_proc_port, DEMO_USERS, traffic_s, max_tokens=48, hold_s=3.0))
    await asyncio.sleep(warmup_s)
    return server, traffic


async def cdp_screenshot(url: str, out: Path, wait_s: float, size: str = "1400,900", timeout: float = 60.0) -> None:
    """Load `url` in headless Chromium, let it run `wait_s` *real* seconds, and save a PNG of the window.

    Through the DevTools protocol rather than `chromium --screenshot --virtual-time-budget=...`: under a virtual
    time budget the page's clocks (Date.now, performance.now) are virtual too, while the server's counters move
    in real time, so the page's rates (counter deltas / seconds between polls) would be wrong."""
    import base64
    import re

    import aiohttp

    binary = chromium_binary()
    if binary is None:
        raise FileNotFoundError("chromium not found (Debian: apt-get install -y chromium)")
    w, h = (int(x) for x in size.split(","))
    with tempfile.TemporaryDirectory(prefix="tokenpools-chromium-") as profile:
        cmd = [binary, "--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--disable-extensions",
               f"--window-size={w},{h}", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
               f"--user-data-dir={profile}"]  # fmt: skip
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--no-sandbox")
        proc = await asyncio.create_subprocess_exec(*cmd, "about:blank", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(timeout):
                port = None
                while port is None:
                    line = await proc.stderr.readline()  # type: ignore[union-attr]
                    if not line:
                        raise RuntimeError("chromium exited before its DevTools endpoint was up")
                    m = re.search(rb"DevTools listening on ws://[^:]+:(\d+)/", line)
                    port = int(m.group(1)) if m else None
                async with aiohttp.ClientSession() as session:
                    async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
                        page = next(t for t in await r.json() if t.get("type") == "page")
                    async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                        ids = iter(range(1, 1 << 30))

                        async def call(method: str, **params):
                            mid = next(ids)
                            await ws.send_json({"id": mid, "method": method, "params": params})
                            while True:
                                msg = await ws.receive_json()
                                if msg.get("id") == mid:
                                    if "error" in msg:
                                        raise RuntimeError(f"{method}: {msg['error']}")
                                    return msg.get("result", {})

                        await call("Emulation.setDeviceMetricsOverride", width=w, height=h, deviceScaleFactor=1, mobile=False)
                        await call("Page.enable")
                        await call("Page.navigate", url=url)
                        await asyncio.sleep(wait_s)
                        shot = await call("Page.captureScreenshot", format="png")
                        out.write_bytes(base64.b64decode(shot["data"]))
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 5)
                except asyncio.TimeoutError:
                    proc.kill()
                    await proc.wait()


async def _main(out: Path, warmup_s: float, wait_s: float, size: str) -> None:
    server, traffic = await demo_server(warmup_s, warmup_s + wait_s + 20)
    try:
        url = f"http://127.0.0.1:{server.status_port}/"
        out.parent.mkdir(parents=True, exist_ok=True)
        await cdp_screenshot(url, out, wait_s, size)
    finally:
        traffic.cancel()
        await asyncio.gather(traffic, return_exceptions=True)
        await server.stop(grace=0.5)
    print(f"wrote {out}", file=sys.stderr)


async def _serve(seconds: float, port: int) -> None:
    """Only the server and its traffic, for `tokenpools top` or a browser: python -m bench.screenshot --serve 60."""
    server, traffic = await demo_server(0.0, seconds, port)
    try:
        print(f"status page: http://127.0.0.1:{server.status_port}/  (tokenpools top --url http://127.0.0.1:{server.status_port})", file=sys.stderr, flush=True)
        await asyncio.gather(traffic, return_exceptions=True)
    finally:
        await server.stop(grace=0.5)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/img/status.png"))
    ap.add_argument("--warmup", type=float, default=6.0, help="seconds of traffic before the screenshot")
    ap.add_argument("--wait", type=float, default=3.5, help="real seconds the page runs (polls once a second) before the shot")
    ap.add_argument("--window-size", default="1400,900")
    ap.add_argument("--serve", type=float, default=None, metavar="SECONDS",
                    help="no screenshot: run the demo server with traffic this long (for tokenpools top or a browser)")
    ap.add_argument("--status-port", type=int, default=0, help="with --serve: the status port (default: any free one)")
    args = ap.parse_args(argv)
    if args.serve is not None:
        asyncio.run(_serve(args.serve, args.status_port))
        return
    asyncio.run(_main(args.out, args.warmup, args.wait, args.window_size))


if __name__ == "__main__":
    main()
