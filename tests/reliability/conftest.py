from __future__ import annotations

import pytest

from tests.envoy.harness import Running, start


@pytest.fixture(scope="session")
def rstack(tmp_path_factory) -> Running:
    """Envoy + `tokenpools serve` + the stand-in backend (tests/envoy/harness.py's config) for the reliability
    tests; each test uses pools and test ids of its own."""
    workdir = tmp_path_factory.mktemp("reliability-stack")
    running = start(workdir)
    try:
        yield running
    finally:
        running.stack.stop()


@pytest.fixture
def balanced(rstack: Running):
    """After the test: nothing in flight, reserved or queued anywhere, and no live exchange in the adapter."""
    yield rstack
    try:
        rstack.wait_for(rstack.idle, timeout=10)
        rstack.wait_for(lambda: rstack.adapter()["live_requests"] == 0, timeout=5)
    except AssertionError:
        print(rstack.status())
        print(rstack.log_tail("tokenpools"))
        raise
