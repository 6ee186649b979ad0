"""TokenPool and TokenEntitlement: Kubernetes-style documents, the same locally (a YAML file) and as CRDs.

Field names are camelCase on the wire (as in Kubernetes) and snake_case in Python. Unknown fields are errors,
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import enum
from typing import Literal

import msgspec

API_VERSION = "tokenpools.io/v1alpha1"


class _Spec(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Base for every spec fragment: camelCase names, no unknown fields, immutable."""


class ServiceClass(str, enum.Enum):
    DEDICATED = "dedicated"
    GUARANTEED = "guaranteed"
    ELASTIC = "elastic"
    SPOT = "spot"
    PREEMPTIBLE = "preemptible"


# Class weight w_κ (DESIGN.md §2).
CLASS_WEIGHT = {
    ServiceClass.DEDICATED: 1000.0,
    ServiceClass.GUARANTEED: 1000.0,
    ServiceClass.ELASTIC: 100.0,
    ServiceClass.SPOT: 1.0,
    ServiceClass.PREEMPTIBLE: 0.1,
}
# Classes whose baseline is reserved (counted for binding, protected from backfill).
RESERVED_CLASSES = frozenset({ServiceClass.DEDICATED, ServiceClass.GUARANTEED})
# Classes with a baseline at all (spot and preemptible live on surplus only).
BASELINE_CLASSES = RESERVED_CLASSES | {ServiceClass.ELASTIC}


class Metadata(_Spec):
    name: str
    namespace: str = "default"
    labels: dict[str, str] = {}


class ModelGeometry(_Spec):
    """KV capacity derived from the model: bytes per token = 2 · layers · kvHeads · headDim · bytesPerElement."""

    layers: int
    kv_heads: int
    head_dim: int
    kv_cache_gi_b: float = msgspec.field(name="kvCacheGiB")
    bytes_per_element: int = 2

    @property
    def kv_cache_tokens(self) -> int:
        per_token = 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_element
        return int(self.kv_cache_gi_b * 2**30 // per_token)


class Replicas(_Spec):
    min: int = 0
    max: int = 1
    current: int | None = None  # None: start at max(min, 1)


class PerReplica(_Spec):
    tokens_per_second: float  # input + output tokens per second one replica sustains
    concurrency: int  # sequences resident at once (vLLM max_num_seqs)
    kv_cache_tokens: int | None = None
    model_geometry: ModelGeometry | None = None


class Queue(_Spec):
    max_queued: int = 1024  # per pool
    max_queued_per_entitlement: int = 256
    timeout_seconds: float = 10.0  # how long a request may wait for capacity before a 429


class Control(_Spec):
    """Control-loop constants; defaults are the paper's (arXiv 2603.00356) where it gives them."""

    period_seconds: float = 1.0
    alpha_slo: float = 2.0
    alpha_burst: float = 1.0
    alpha_debt: float = 4.0
    gamma_debt: float = 0.7
    gamma_burst: float = 0.7
    # Throughput buckets hold this many seconds of their rate: how far a tenant may run ahead of its rate.
    # Requests are charged input + max_tokens up front, so this should cover a typical request's duration.
    burst_seconds: float = 5.0
    # An entitlement with no request for this long is idle: an idle elastic entitlement holds no headroom.
    idle_seconds: float = 3.0
    # Who may use the unused part of dedicated/guaranteed baselines. "preemptible" (default): only preemptible
    # work, which is evicted when the owner needs it, so a guaranteed request within baseline is always admitted
    # at once. "idle": also all burst work while the owner is idle — better utilisation, but an owner coming
    # back may wait for borrowed capacity to drain.
    lend_reserved: Literal["preemptible", "idle"] = "preemptible"
    # When a pool has no replicas, how long until capacity is likely (scale-from-zero), for Retry-After.
    scale_up_seconds: float = 30.0


class TokenPoolSpec(_Spec):
    model: str
    per_replica: PerReplica
    replicas: Replicas = Replicas()
    control: Control = Control()
    queue: Queue = Queue()
    default_max_tokens: int = 256
    # Decide and record, never enforce: every request of the pool is admitted; /status and the metrics show
    # what would have been queued or rejected. For trying a policy on live traffic before turning it on.
    shadow: bool = False


class Resources(_Spec):
    tokens_per_second: float | None = None
    kv_cache_tokens: int | None = None
    concurrency: int | None = None


class PoolRef(_Spec):
    name: str


class QoS(_Spec):
    service_class: ServiceClass
    slo_target_ms: float = 1000.0


class Defaults(_Spec):
    max_tokens: int | None = None


class Auth(_Spec):
    api_key_sha256: list[str] = []  # hex SHA-256 digests of the tenant's API keys
    api_keys: list[str] = []  # plaintext: accepted only in a config marked demo


class TokenEntitlementSpec(_Spec):
    tenant_id: str
    pool_ref: PoolRef
    qos: QoS
    resources: Resources = Resources()
    burst: Resources | None = None  # ceilings above baseline, per dimension; absent: the pool's capacity
    defaults: Defaults = Defaults()
    auth: Auth = Auth()
    expires_at: float | None = None  # seconds on the engine's clock (Unix time when live); absent: never
    shadow: bool = False  # decide and record, never enforce (see TokenPoolSpec.shadow); also on when the pool's is


class TokenPool(msgspec.Struct, forbid_unknown_fields=True, frozen=True, tag_field="kind", tag="TokenPool"):
    api_version: Literal["tokenpools.io/v1alpha1"] = msgspec.field(name="apiVersion")
    metadata: Metadata
    spec: TokenPoolSpec


class TokenEntitlement(
    msgspec.Struct, forbid_unknown_fields=True, frozen=True, tag_field="kind", tag="TokenEntitlement"
):
    api_version: Literal["tokenpools.io/v1alpha1"] = msgspec.field(name="apiVersion")
    metadata: Metadata
    spec: TokenEntitlementSpec


Document = TokenPool | TokenEntitlement
