"""What the engine answers: verdicts, reasons, and the events a release or a tick produces."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field


class Verdict(enum.Enum):
    ADMIT = "admit"
    QUEUE = "queue"
    REJECT = "reject"


class Reason(str, enum.Enum):
    """Why a request was not admitted at once; also a metrics label, so the set stays small."""

    NOT_BOUND = "not_bound"  # entitlement Pending or Expired
    OVER_CONCURRENCY = "over_concurrency"  # the entitlement's own concurrency ceiling
    OVER_THROUGHPUT = "over_throughput"  # the entitlement's own token-rate ceiling
    OVER_KV = "over_kv"  # the entitlement's own KV ceiling, or a request larger than the pool's KV
    POOL_CONTENDED = "pool_contended"  # no spare capacity and the request's weight does not beat admitted work
    NO_CAPACITY = "no_capacity"  # the pool has zero replicas (scale from zero pending)
    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    EVICTED = "evicted"  # preemptible work terminated to give capacity back
    ENTITLEMENT_REMOVED = "entitlement_removed"


@dataclass(slots=True)
class Decision:
    verdict: Verdict
    request_id: str
    reason: Reason | None = None
    # Seconds until capacity this request needs is expected to be free (REJECT, and QUEUE as a hint).
    retry_after: float | None = None
    # Engine-clock time at which a queued request gives up.
    deadline: float | None = None
    # max_tokens the engine reserved for (the request's own, or the entitlement/pool default).
    max_tokens: int = 0
    # Preemptible requests the adapter must terminate now (their reservations are already released).
    evict: Sequence[str] = ()
    # Shadow mode: what enforcement would have done (QUEUE or REJECT, with `reason`) to a request admitted anyway.
    would: Verdict | None = None


@dataclass(slots=True)
class Events:
    """Side effects of finish/release/tick that the adapter must carry out."""

    admitted: list[str] = field(default_factory=list)  # queued requests now admitted, in order
    rejected: list[Decision] = field(default_factory=list)  # queued requests that gave up (timeout, removal)
    evicted: list[str] = field(default_factory=list)  # in-flight preemptible requests to terminate

    def __bool__(self) -> bool:
        return bool(self.admitted or self.rejected or self.evicted)

    def extend(self, other: Events) -> None:
        self.admitted.extend(other.admitted)
        self.rejected.extend(other.rejected)
        self.evicted.extend(other.evicted)
