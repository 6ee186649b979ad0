from __future__ import annotations

import pytest

from .driver import Outcome, run_scenario


@pytest.fixture(scope="session")
def scraped() -> Outcome:
    """One server, driven once (admits, a queue wait, 429s), scraped at GET /metrics."""
    return run_scenario()
