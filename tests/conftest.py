from __future__ import annotations

import pytest

from tests.envoy.harness import Running, start


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Running:
    """Envoy + `tokenpools serve` + the stand-in backend (tests/envoy/harness.py's config), started once and
    shared by the integration and reliability tests (each uses pools and test ids of its own)."""
    workdir = tmp_path_factory.mktemp("envoy-stack")
    running = start(workdir)
    try:
        yield running
    finally:
        running.stack.stop()
