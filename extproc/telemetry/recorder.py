"""What the ext_proc adapter records per request: plain counters and histograms, nothing exported here.

The request path only adds to dicts keyed by small tuples and bisects into fixed buckets (a few hundred ns per
call, see bench/telemetry.py); metrics.py reads these at collection time through OpenTelemetry. Label tuples
per entitlement are built once (`who`), so a request builds no attribute dict.

Decision results: `admit`, `queue`, `reject` (the engine's first answer), then for a queued request its
outcome (`admit` or `reject`), and `evict` when admitted preemptible work is terminated. So a queued request
counts twice (queue, then its outcome); `reject` counts every request the engine turned down, which is every
engine 429 (plus 403/503 for reasons such as not_bound/no_capacity: see extproc/envoy/errors.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import structlog

from .histogram import DECISION_LATENCY_S, ESTIMATE_RATIO, QUEUE_WAIT_S, Histogram
from .labels import DEFAULT_MAX_ENTITLEMENTS, EntitlementLabels

log = structlog.get_logger("tokenpools.decisions")

NONE = "none"  # the reason label of an admit


class Recorder:
    def __init__(self, max_entitlements: int = DEFAULT_MAX_ENTITLEMENTS, allow: Iterable[str] | None = None) -> None:
        self.labels = EntitlementLabels(max_entitlements, allow)
        # (result, reason, class, entitlement label) -> count
        self.decisions: Counter[tuple[str, str, str, str]] = Counter()
        # (class, entitlement label) -> reconciled tokens
        self.input_tokens: Counter[tuple[str, str]] = Counter()
        self.output_tokens: Counter[tuple[str, str]] = Counter()
        self.decision_latency = Histogram(DECISION_LATENCY_S)
        self.queue_wait: dict[tuple[str, str], Histogram] = {}  # (class, result)
        self.estimate_ratio: dict[str, Histogram] = {}  # model (a configured pool's model, so bounded)
        self._who: dict[str, tuple[str, str]] = {}

    def who(self, entitlement: str, service_class: str) -> tuple[str, str]:
        """(class, entitlement label) for one entitlement: built once, then a dict lookup."""
        w = self._who.get(entitlement)
        if w is None or w[0] != service_class:  # new, or its class changed on reload
            w = self._who[entitlement] = (service_class, self.labels(entitlement))
        return w

    def decided(self, who: tuple[str, str], result: str, reason: str, seconds: float) -> None:
        self.decisions[(result, reason, *who)] += 1
        self.decision_latency.observe(seconds)

    def dequeued(self, who: tuple[str, str], result: str, reason: str, waited: float) -> None:
        self.decisions[(result, reason, *who)] += 1
        h = self.queue_wait.get((who[0], result))
        if h is None:
            h = self.queue_wait[(who[0], result)] = Histogram(QUEUE_WAIT_S)
        h.observe(waited)

    def evicted(self, who: tuple[str, str]) -> None:
        self.decisions[("evict", "evicted", *who)] += 1

    def settled(self, who: tuple[str, str], model: str, estimated: int | None, actual: int | None, out: int) -> None:
        """A finished request's reconciled usage; `actual` is the backend's input count (None: not reported,
        then the estimate stands in for it and no estimate error is recorded)."""
        self.input_tokens[who] += actual if actual is not None else (estimated or 0)
        self.output_tokens[who] += out
        if actual and estimated is not None:
            h = self.estimate_ratio.get(model)
            if h is None:
                h = self.estimate_ratio[model] = Histogram(ESTIMATE_RATIO)
            h.observe(estimated / actual)
