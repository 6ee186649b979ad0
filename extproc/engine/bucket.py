"""Token bucket for the throughput dimension.

The level may go negative: a request is charged its reservation up front and reconciled with real usage at the
end; when real usage exceeds the reservation the bucket goes into debt and refill repays it. Time is passed in
and never moves the bucket backwards (a clock that jumps back is ignored rather than trusted).
"""

from __future__ import annotations

import math


class TokenBucket:
    __slots__ = ("rate", "depth", "level", "t")

    def __init__(self, rate: float, depth: float, now: float) -> None:
        self.rate = rate
        self.depth = depth
        self.level = depth
        self.t = now

    def refill(self, now: float) -> float:
        """Bring the level up to `now`; return what overflowed the depth (spilled to the pool by the caller)."""
        dt = now - self.t
        if dt <= 0.0:
            return 0.0
        self.t = now
        level = self.level + self.rate * dt
        if level > self.depth:  # the level never starts above the depth (set_rate clamps it)
            self.level = self.depth
            return level - self.depth
        self.level = level
        return 0.0

    def need(self, cost: float) -> float:
        """What must be in the bucket to start a request of `cost`: a request larger than the whole bucket waits
        for a full bucket and then drives it negative, so any size can eventually run."""
        return cost if cost < self.depth else self.depth

    def can_take(self, cost: float) -> bool:
        return self.level >= self.need(cost)

    def time_until(self, cost: float) -> float:
        """Seconds of refill until `can_take(cost)` holds (inf when the rate is zero)."""
        missing = self.need(cost) - self.level
        if missing <= 0.0:
            return 0.0
        return missing / self.rate if self.rate > 0.0 else math.inf

    def set_rate(self, rate: float, depth: float, now: float) -> float:
        spill = self.refill(now)
        self.rate = rate
        self.depth = depth
        if self.level > depth:
            self.level = depth
        return spill
