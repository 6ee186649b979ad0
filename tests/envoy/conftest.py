from __future__ import annotations

import pytest

from .harness import Running


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
