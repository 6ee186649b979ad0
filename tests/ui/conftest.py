"""A live TokenpoolsServer (in-process, free ports, the demo config, with a controller) and traffic through its
ext_proc gRPC, for the operator views' tests."""

from __future__ import annotations

import asyncio
import logging

import structlog

from extproc.app import TokenpoolsServer
from extproc.config import load_file
from extproc.stack import default_config_path
from extproc.ui.traffic import drive

# guaranteed-a and -c within their 6 slots; spot-b far over what the pool has left, so it gets 429s.
USERS = {"demo-key-a": 4, "demo-key-b": 14, "demo-key-c": 3}


async def with_busy_server(body, warmup_s: float = 2.0, traffic_s: float = 30.0):
    """Run `await body(server)` while traffic flows; stop everything afterwards."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    server = TokenpoolsServer(load_file(default_config_path()), ext_proc_port=0, status_port=0, scaler_port=0)
    await server.start()
    traffic = asyncio.create_task(drive(server.ext_proc_port, USERS, traffic_s, max_tokens=32, hold_s=1.5))
    try:
        await asyncio.sleep(warmup_s)
        return await body(server)
    finally:
        traffic.cancel()
        await asyncio.gather(traffic, return_exceptions=True)
        await server.stop(grace=0.5)
