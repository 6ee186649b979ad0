from __future__ import annotations

import pytest

from .harness import Running, start


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Running:
    """Envoy + `tokenpools serve` + the stand-in backend, shared by the integration tests (each uses its own pool)."""
    workdir = tmp_path_factory.mktemp("envoy-stack")
    running = start(workdir)
    try:
        yield running
    finally:
        running.stack.stop()


@pytest.fixture
def settled(stack: Running):
    """Every test leaves the books balanced: nothing in flight, reserved or queued once its requests ended."""
    yield stack
    try:
        stack.wait_for(stack.idle, timeout=10)
    except AssertionError:
        print(stack.status())
        print(stack.log_tail("tokenpools"))
        raise
