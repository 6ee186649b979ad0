"""The server's clock: Unix seconds that a wall clock stepped back does not drag along."""

from __future__ import annotations

import time

from extproc.app import wall_clock_from_monotonic


def test_a_wall_clock_stepped_back_does_not_move_the_server_clock(monkeypatch):
    clock = wall_clock_from_monotonic()
    first = clock()
    assert abs(first - time.time()) < 1.0  # Unix seconds, as expiresAt is written
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 3600)  # an operator sets the clock back an hour
    second = clock()
    assert 0.0 <= second - first < 1.0  # still moving forward, at the monotonic clock's pace
