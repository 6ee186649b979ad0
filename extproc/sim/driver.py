"""A minimal discrete-event driver: runs a Scheduler over timed arrivals in virtual time.

The scheduler only moves when stepped; this loop owns the clock, feeds arrivals whose time has come,
steps, and jumps over idle gaps to the next arrival. `on_finish` lets closed-loop clients submit their
next request when one finishes.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from extproc.sim.scheduler import Request, Scheduler, StepResult


@dataclass(frozen=True, slots=True)
class Arrival:
    time: float
    request_id: str
    prompt_tokens: int
    max_tokens: int


def run_virtual(
    scheduler: Scheduler,
    arrivals: Iterable[Arrival],
    on_finish: Callable[[Request], Iterable[Arrival]] | None = None,
    on_step: Callable[[StepResult], None] | None = None,
    until: float = float("inf"),
) -> tuple[list[Request], float]:
    """Run until no work is left (or `until`); returns (finished requests, end time)."""
    heap: list[tuple[float, int, Arrival]] = []
    seq = 0
    for a in arrivals:
        heap.append((a.time, seq, a))
        seq += 1
    heapq.heapify(heap)
    done: list[Request] = []
    now = 0.0 if not heap else min(0.0, heap[0][0])
    while now < until and (heap or scheduler.has_work):
        while heap and heap[0][0] <= now:
            a = heapq.heappop(heap)[2]
            scheduler.add(a.request_id, a.prompt_tokens, a.max_tokens, a.time)
        if not scheduler.has_work:
            now = heap[0][0]  # idle: jump to the next arrival
            continue
        result = scheduler.step(now)
        if result.num_tokens == 0:
            # Work left but nothing schedulable: the state cannot change, so this would spin forever.
            raise RuntimeError(f"scheduler stalled at t={now}: {scheduler.num_waiting} waiting, "
                               f"{scheduler.num_running} running, {scheduler.free_blocks} free blocks")
        now = result.end
        if on_step is not None:
            on_step(result)
        for req in result.finished:
            done.append(req)
            if on_finish is not None:
                for a in on_finish(req):
                    heapq.heappush(heap, (a.time, seq, a))
                    seq += 1
    return done, now
