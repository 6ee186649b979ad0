"""The status page: GET / serves it, and a real headless Chromium renders the entitlement rows from live data."""

from __future__ import annotations

import asyncio
import os
import re

import aiohttp
import pytest

from bench.screenshot import chromium_binary, chromium_command, run_chromium

from .conftest import with_busy_server


def test_the_status_server_serves_the_page_and_it_needs_nothing_external():
    async def body(server):
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{server.status_port}/") as r:
                return r.status, r.headers["Content-Type"], await r.text()

    status, ctype, html = asyncio.run(with_busy_server(body, warmup_s=0.1, traffic_s=1))
    assert status == 200 and ctype.startswith("text/html")
    assert '<tbody id="entrows">' in html and "fetch(" in html
    # No CDN, fonts or scripts from elsewhere: the page must work on an air-gapped operator box.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "external resource in status.html"
    assert "@import" not in html


@pytest.mark.integration
def test_chromium_renders_the_entitlement_rows():
    if chromium_binary() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is required under CI=true (make test installs it: apt-get install -y chromium)")
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium)")

    async def body(server):
        url = f"http://127.0.0.1:{server.status_port}/"
        return (await run_chromium(chromium_command(url, "--dump-dom", budget_ms=3000))).decode()

    dom = asyncio.run(with_busy_server(body))
    dom = dom[: dom.index("<script")]  # the rendered document, not the templates in the script
    rows = re.findall(r'<tr data-entitlement="([^"]+)"', dom)
    assert rows == ["guaranteed-a", "guaranteed-c", "spot-b"], dom[-3000:]
    assert 'data-pool="paper-spark"' in dom
    assert "waiting for the first poll" not in dom and 'class="dot ok"' in dom
    spot = dom[dom.index('data-entitlement="spot-b"'):]
    spot = spot[: spot.index("</tr>")]
    assert 'class="cls spot"' in spot and "≤10" in spot  # no baseline: use against its burst ceiling
