"""Structured logs: one JSON line per reject with rid, never the API key or the prompt."""

from __future__ import annotations

import asyncio
import io
import re

import orjson
import pytest
import structlog

from extproc.config import load_text
from extproc.engine import Engine
from extproc.envoy.service import Exchange, Gateway
from extproc.telemetry import configure_logging
from extproc.telemetry import logs as tlogs
from tests.envoy.extproc_msgs import immediate, request_body, request_headers

from .driver import CONFIG

KEY = "sk-live-7f3a9c1d2e4b6a8f"
PROMPT = "Summarise the merger memo for Project Bluebird"


@pytest.fixture
def captured():
    stream = io.StringIO()
    yield stream
    structlog.reset_defaults()
    tlogs.DECISIONS = False


def lines(stream: io.StringIO) -> list[dict]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def reject_with_key(level: str, stream: io.StringIO) -> list:
    configure_logging(level, "json", stream, cache=False)
    cfg = load_text(CONFIG.replace("k-n", KEY))
    gw = Gateway(Engine(cfg, 1000.0), cfg, clock=lambda: 1000.0)
    body = {"model": "m-noq", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3}

    async def drive():
        out = []
        for _ in range(2):  # one slot, no queue: the second is a 429
            ex = Exchange(gw, asyncio.Queue())
            ex.handle(request_headers(KEY, extra={"x-api-key": KEY}))
            out.append(ex.handle(request_body(body)))
        return out

    return asyncio.run(drive())


def test_reject_line_has_rid_and_no_secret(captured):
    out = reject_with_key("info", captured)
    status, headers, _ = immediate(out[1][0])
    assert status == 429
    got = lines(captured)
    rejects = [line for line in got if line["event"] == "rejected"]
    assert len(rejects) == 1 and len(got) == 1  # info: only the reject, no per-decision lines
    r = rejects[0]
    assert re.fullmatch(r"[0-9a-f]{32}", r["rid"])
    assert r["entitlement"] == "n" and r["reason"] == "queue_full" and r["status"] == 429
    assert r["level"] == "info" and r["logger"] == "tokenpools.envoy"
    assert "retry_after" in r and re.match(r"\d{4}-\d\d-\d\dT", r["timestamp"])
    text = captured.getvalue()
    assert KEY not in text and PROMPT not in text and "Bearer" not in text


def test_debug_has_one_line_per_decision_and_still_no_secret(captured):
    reject_with_key("debug", captured)
    got = lines(captured)
    decisions = [line for line in got if line["event"] == "decision"]
    assert [d["result"] for d in decisions] == ["admit", "reject"]
    assert all(d["level"] == "debug" and len(d["rid"]) == 32 for d in decisions)
    # The reject's lines share its rid: decision, rejected, reply.
    rid = decisions[1]["rid"]
    assert {line["event"] for line in got if line.get("rid") == rid} == {"decision", "rejected", "reply"}
    text = captured.getvalue()
    assert KEY not in text and PROMPT not in text


def test_redaction_is_a_second_line_of_defence(captured):
    configure_logging("info", "json", captured, cache=False)
    structlog.get_logger("tokenpools.test").info("oops", authorization=f"Bearer {KEY}", body=PROMPT, rid="r1")
    structlog.get_logger("tokenpools.test").info(f"upstream said: bad header Bearer {KEY}", detail=f"bearer  {KEY} x")
    line, quoted = lines(captured)
    assert line["authorization"] == line["body"] == tlogs.REDACTED and line["rid"] == "r1"
    assert quoted["event"] == "upstream said: bad header Bearer [redacted]" and quoted["detail"].endswith("[redacted] x")
    assert KEY not in captured.getvalue() and PROMPT not in captured.getvalue()


def test_console_format_and_level_filter(captured):
    configure_logging("warning", "console", captured, cache=False)
    log = structlog.get_logger("tokenpools.test")
    log.info("hidden")
    log.warning("shown", rid="r2")
    text = captured.getvalue()
    assert "hidden" not in text and "shown" in text and "rid=r2" in text
    with pytest.raises(ValueError):
        configure_logging("info", "xml", captured)
