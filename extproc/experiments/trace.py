"""What a run leaves behind, whatever ran it: one record per logical request, periodic samples, and binned
token/busy counters. `metrics.py` turns a Trace into the numbers of results.json; sim and live share it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .workload import Experiment

BIN_S = 0.1  # width of the token / busy-slot bins, simulated seconds


class Req:
    """One logical request as the user sees it: retries after a 429 (or an eviction) continue the same request,
    so its TTFT counts from the first attempt's arrival at the gateway."""

    __slots__ = (
        "rid", "tenant", "user", "arrival", "input", "output", "attempts", "rejects", "reasons", "queued",
        "evicted", "admitted", "first_token", "last_token", "finished", "gave_up", "itls", "outstanding_at_arrival",
        "attempt_id", "replica", "generated",
    )  # fmt: skip

    def __init__(self, rid: str, tenant: str, user: str, arrival: float, input_tokens: int, output_tokens: int):
        self.rid = rid
        self.tenant = tenant
        self.user = user
        self.arrival = arrival
        self.input = input_tokens
        self.output = output_tokens
        self.attempts = 0
        self.rejects = 0  # 429 answers (and 403s) received
        self.reasons: dict[str, int] = {}
        self.queued = 0  # attempts held in the gateway queue
        self.evicted = 0
        self.admitted: float | None = None  # when the attempt that ran was admitted
        self.first_token: float | None = None  # of the attempt that ran to the end
        self.last_token: float | None = None
        self.finished: float | None = None
        self.gave_up = False  # the user left (its load ended, or a 403/400) before it was served
        self.itls: list[float] = []
        self.outstanding_at_arrival = 0  # this tenant's requests admitted or queued when it first arrived
        self.attempt_id: str | None = None
        self.replica: int | None = None
        self.generated = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival

    def reject(self, reason: str) -> None:
        self.rejects += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


@dataclass
class Trace:
    experiment: Experiment
    policy: str
    mode: str
    seed: int
    requests: list[Req] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    bin_s: float = BIN_S
    busy: np.ndarray | None = None  # slot-seconds of running sequences per bin (sim: exact, live: sampled)
    tokens: np.ndarray | None = None  # tokens processed per bin (prefill + output), whole pool
    tenant_tokens: dict[str, np.ndarray] = field(default_factory=dict)  # input + output served per bin
    tenant_weighted: dict[str, np.ndarray] = field(default_factory=dict)  # input + 2 × output (VTC's measure)
    events: list[dict[str, Any]] = field(default_factory=list)  # config/capacity changes applied
    info: dict[str, Any] = field(default_factory=dict)  # runner facts (wall time, lag, invariant checks, ...)

    def __post_init__(self) -> None:
        n = int(self.experiment.horizon / self.bin_s) + 1
        if self.busy is None:
            self.busy = np.zeros(n)
        if self.tokens is None:
            self.tokens = np.zeros(n)
        for t in self.experiment.tenants:
            self.tenant_tokens.setdefault(t.name, np.zeros(n))
            self.tenant_weighted.setdefault(t.name, np.zeros(n))

    def add_interval(self, arr: np.ndarray, start: float, end: float, value_per_s: float) -> None:
        """Spread value_per_s × (end − start) over the bins [start, end) touches (clipped to the horizon)."""
        h = self.experiment.horizon
        start, end = max(0.0, start), min(h, end)
        if end <= start or value_per_s == 0:
            return
        b = self.bin_s
        i0, i1 = int(start / b), int(end / b)
        if i0 == i1:
            arr[i0] += value_per_s * (end - start)
            return
        arr[i0] += value_per_s * ((i0 + 1) * b - start)
        if i1 > i0 + 1:
            arr[i0 + 1 : i1] += value_per_s * b
        if i1 < len(arr):
            arr[i1] += value_per_s * (end - i1 * b)

    def add_point(self, arr: np.ndarray, t: float, value: float) -> None:
        if 0 <= t < self.experiment.horizon:
            arr[int(t / self.bin_s)] += value
