from __future__ import annotations

import pytest

from tests.envoy.harness import Running


@pytest.fixture
def balanced(stack: Running):
    """After the test: nothing in flight, reserved or queued anywhere, and no live exchange in the adapter.
    (`stack`, the shared Envoy + server + stand-in, is in tests/conftest.py.)"""
    yield stack
    try:
        stack.wait_for(stack.idle, timeout=10)
        stack.wait_for(lambda: stack.adapter()["live_requests"] == 0, timeout=5)
    except AssertionError:
        print(stack.status())
        print(stack.log_tail("tokenpools"))
        raise
