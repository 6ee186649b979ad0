"""Metrics export: an OpenTelemetry MeterProvider read by Prometheus (GET /metrics) and, optionally, OTLP.

Nothing here runs on the request path. At collection time:
- counters come from the Recorder (observable counters: cumulative totals the adapter keeps as plain ints);
- gauges come from the engine's and the controller's snapshots, taken on the event loop by `refresh()`
  (the engine is single-threaded; the OTLP reader collects on its own thread, so it only reads the last
  refreshed values);
- histograms come from the Recorder's fixed-bucket histograms, added to each collection as OpenTelemetry
  histogram points (`_with_histograms`): the Python SDK has no observable histogram or MetricProducer, and
  its synchronous Histogram.record costs ~8 µs per call, too much for the admission path.

GET /metrics renders the Prometheus text format from our own CollectorRegistry (one per server, so several
servers in one process, as in tests, do not collide) on the existing status HTTP server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from aiohttp import web
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest

from .histogram import Histogram
from .labels import DEFAULT_MAX_ENTITLEMENTS, OTHER
from .recorder import Recorder

PREFIX = "tokenpools_"
SCOPE = "tokenpools"  # the instrumentation scope (meter name)


@dataclass
class TelemetryOptions:
    max_entitlements: int = DEFAULT_MAX_ENTITLEMENTS  # distinct entitlement label values; beyond: "other"
    entitlements: tuple[str, ...] = ()  # allow list of entitlement label values (empty: the first N seen)
    otlp_endpoint: str | None = None  # OTLP/gRPC collector, e.g. http://otel-collector:4317 (None: no OTLP)
    otlp_interval_s: float = 15.0

    def recorder(self) -> Recorder:
        return Recorder(self.max_entitlements, self.entitlements or None)


# name (without the prefix) -> (description, unit); all read from engine/controller snapshots by refresh()
GAUGES: dict[str, tuple[str, str]] = {
    "pool_capacity": ("Pool capacity per dimension (tokens_per_second, kv_cache_tokens, concurrency).", ""),
    "pool_used": ("Pool use per dimension: in use now (KV, concurrency), charged per second (throughput).", ""),
    "pool_replicas": ("Replicas the engine counts for the pool (current).", ""),
    "pool_in_flight": ("Admitted requests not yet finished, per pool.", ""),
    "pool_queued": ("Requests held in the pool's queue.", ""),
    "desired_replicas": ("Replicas the controller wants for the pool (what KEDA is told).", ""),
    "backend_live_replicas": ("Backends answering /metrics for the pool (when backends are followed).", ""),
    "entitlement_debt": ("Entitlement debt (priority term; see docs/ENGINE.md).", ""),
    "entitlement_weight": ("Entitlement admission weight.", ""),
    "entitlement_burst": ("Entitlement burst term.", ""),
    "entitlement_in_flight": ("Admitted requests not yet finished, per entitlement.", ""),
    "entitlement_queued": ("Queued requests, per entitlement.", ""),
}
_SUMMED = ("entitlement_in_flight", "entitlement_queued")  # what `other` aggregates (debt/weight/burst don't add up)


class Metrics:
    def __init__(
        self,
        recorder: Recorder,
        engine: Any,
        clock: Callable[[], float] = time.time,
        controller: Any = None,
        refusals: Callable[[], dict[str, int]] | None = None,
        options: TelemetryOptions | None = None,
        config_state: Any = None,
    ) -> None:
        self.recorder = recorder
        self.config_state = config_state  # extproc.reload.ConfigState: config reloads applied / refused
        self.engine = engine
        self.clock = clock
        self.controller = controller
        self.refusals = refusals
        self.options = options or TelemetryOptions()
        self.start_ns = time.time_ns()
        self._gauges: dict[str, list[Observation]] = {name: [] for name in GAUGES}
        self._refresher: asyncio.Task | None = None
        self._scrape_lock = asyncio.Lock()

        self.registry = CollectorRegistry(auto_describe=False)
        self.resource = Resource.create({"service.name": "tokenpools"})
        # Our own registry: several servers in one process (tests) must not share prometheus_client's global one.
        prometheus = _PrometheusReader(
            self._with_histograms, registry=self.registry, disable_target_info=True, scope_info_enabled=False
        )
        readers: list = [prometheus]
        if self.options.otlp_endpoint:
            try:
                from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            except ImportError as exc:  # see the Makefile: xds-protos overwrites opentelemetry-proto's modules
                raise RuntimeError(f"OTLP export unavailable: {exc} (reinstall opentelemetry-proto: Makefile)") from exc

            exporter = _WithHistograms(OTLPMetricExporter(endpoint=self.options.otlp_endpoint), self._with_histograms)
            interval_ms = self.options.otlp_interval_s * 1000
            readers.append(PeriodicExportingMetricReader(exporter, export_interval_millis=interval_ms))
        self.provider = MeterProvider(metric_readers=readers, resource=self.resource)
        meter = self.provider.get_meter(SCOPE)

        counters = {
            "decisions": (self._decisions, "Admission decisions by result (admit/queue/reject/evict), reason, class, entitlement."),
            "input_tokens": (partial(self._tokens, recorder.input_tokens), "Input tokens of finished requests (usage, else estimate)."),
            "output_tokens": (partial(self._tokens, recorder.output_tokens), "Output tokens of finished requests (reconciled)."),
            "refusals": (self._refusals, "Immediate error replies from the adapter, by HTTP status and OpenAI error code."),
            "config_reloads": (self._reloads, "Config changes applied (result=ok) or refused, the old config kept (result=error)."),
        }  # fmt: skip
        for name, (callback, description) in counters.items():
            meter.create_observable_counter(PREFIX + name, [callback], description=description)
        for name, (description, unit) in GAUGES.items():
            meter.create_observable_gauge(PREFIX + name, [partial(self._gauge, name)], unit=unit, description=description)

    # -- collection callbacks (may run on the OTLP reader's thread: copy before iterating) --
    def _decisions(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(n, {"result": r, "reason": why, "class": c, "entitlement": e})
            for (r, why, c, e), n in self.recorder.decisions.copy().items()
        ]

    def _tokens(self, counts: dict, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"class": c, "entitlement": e}) for (c, e), n in counts.copy().items()]

    def _refusals(self, options: CallbackOptions) -> Iterable[Observation]:
        if self.refusals is None:
            return []
        out = []
        for key, n in self.refusals().copy().items():
            status, _, code = key.partition(":")
            out.append(Observation(n, {"status": status, "code": code}))
        return out

    def _reloads(self, options: CallbackOptions) -> Iterable[Observation]:
        st = self.config_state
        if st is None:
            return []
        return [Observation(st.reloads_ok, {"result": "ok"}), Observation(st.reloads_failed, {"result": "error"})]

    def _gauge(self, name: str, options: CallbackOptions) -> Iterable[Observation]:
        return self._gauges[name]

    def _histograms(self) -> list[Metric]:
        rec = self.recorder
        series: dict[str, tuple[str, str, list[tuple[dict, Histogram]]]] = {
            "decision_latency_seconds": ("s", "Seconds from the end of the request body to the admission decision "
                                         "(parse, estimate, engine.admit).", [({}, rec.decision_latency)]),
            "queue_wait_seconds": ("s", "Seconds queued requests waited before admission or rejection.",
                                   [({"class": c, "result": r}, h) for (c, r), h in rec.queue_wait.copy().items()]),
            "estimate_ratio": ("", "Estimated / actual input tokens of finished requests (1 = exact).",
                               [({"model": m}, h) for m, h in rec.estimate_ratio.copy().items()]),
        }
        now = time.time_ns()
        out = []
        for name, (unit, description, hists) in series.items():
            points = []
            for attrs, h in hists:
                h = h.copy()
                points.append(HistogramDataPoint(
                    attributes=attrs, start_time_unix_nano=self.start_ns, time_unix_nano=now, count=h.count,
                    sum=h.sum, bucket_counts=h.counts, explicit_bounds=h.bounds,
                    min=h.min if h.count else 0.0, max=h.max if h.count else 0.0,
                ))  # fmt: skip
            data = HistogramData(data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE)
            out.append(Metric(name=PREFIX + name, description=description, unit=unit, data=data))
        return out

    def _with_histograms(self, data: MetricsData | None) -> MetricsData:
        """`data` plus the histograms, in the same instrumentation scope as the instruments (the OTLP encoder
        keys scopes by name: a second "tokenpools" scope would replace the first)."""
        hists = self._histograms()
        if data is None or not data.resource_metrics:
            scope = ScopeMetrics(scope=InstrumentationScope(SCOPE), metrics=hists, schema_url="")
            return MetricsData(resource_metrics=[ResourceMetrics(resource=self.resource, scope_metrics=[scope], schema_url="")])
        first, *rest = data.resource_metrics
        scopes = list(first.scope_metrics)
        for i, sm in enumerate(scopes):
            if sm.scope.name == SCOPE:
                scopes[i] = ScopeMetrics(scope=sm.scope, metrics=[*sm.metrics, *hists], schema_url=sm.schema_url)
                break
        else:
            scopes.append(ScopeMetrics(scope=InstrumentationScope(SCOPE), metrics=hists, schema_url=""))
        first = ResourceMetrics(resource=first.resource, scope_metrics=scopes, schema_url=first.schema_url)
        return MetricsData(resource_metrics=[first, *rest])

    # -- gauges: from snapshots, on the event loop --
    def refresh(self) -> None:
        g: dict[str, list[Observation]] = {name: [] for name in GAUGES}
        snap = self.engine.snapshot(self.clock())
        for pool, p in snap["pools"].items():
            for dim, v in p["capacity"].items():
                if v is not None:
                    g["pool_capacity"].append(Observation(v, {"pool": pool, "dimension": dim}))
            for dim, v in p["used"].items():
                if v is not None:
                    g["pool_used"].append(Observation(v, {"pool": pool, "dimension": dim}))
            g["pool_replicas"].append(Observation(p["replicas"], {"pool": pool}))
            g["pool_in_flight"].append(Observation(p["in_flight"], {"pool": pool}))
            g["pool_queued"].append(Observation(p["queued"], {"pool": pool}))
        label = self.recorder.labels
        others: dict[tuple[str, str, str], list[float]] = {}  # (name, pool, class) -> summed value
        for name, e in snap["entitlements"].items():
            attrs = {"entitlement": label(name), "class": e["class"], "pool": e["pool"]}
            values = {
                "entitlement_debt": e["debt"], "entitlement_weight": e["weight"], "entitlement_burst": e["burst"],
                "entitlement_in_flight": e["in_flight"], "entitlement_queued": e["queued"],
            }  # fmt: skip
            if attrs["entitlement"] == OTHER:
                for gauge in _SUMMED:
                    others.setdefault((gauge, e["pool"], e["class"]), [0.0])[0] += values[gauge]
                continue
            for gauge, v in values.items():
                g[gauge].append(Observation(v, attrs))
        for (gauge, pool, cls), (v,) in others.items():
            g[gauge].append(Observation(v, {"entitlement": OTHER, "class": cls, "pool": pool}))
        if self.controller is not None:
            for pool, doc in self.controller.snapshot()["pools"].items():
                if doc.get("desiredReplicas") is not None:
                    g["desired_replicas"].append(Observation(doc["desiredReplicas"], {"pool": pool}))
                if doc.get("backends"):
                    g["backend_live_replicas"].append(Observation(doc["backends"]["liveReplicas"], {"pool": pool}))
        self._gauges = g  # one assignment: a reader on another thread sees the old or the new set

    def render(self) -> bytes:
        self.refresh()
        return generate_latest(self.registry)

    async def handle(self, request: web.Request) -> web.Response:
        """GET /metrics (Prometheus text format).

        The snapshot is taken here, on the loop; the collection and rendering (tens of ms with hundreds of
        entitlements) run in a thread, so the GIL lets request handling in every few ms instead of stalling
        for the whole scrape. One scrape at a time: the Prometheus reader keeps per-collection state."""
        async with self._scrape_lock:
            self.refresh()
            body = await asyncio.to_thread(generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    # -- life cycle --
    def start(self) -> None:
        if self.options.otlp_endpoint and self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        period = max(0.5, self.options.otlp_interval_s / 2)
        while True:
            try:
                self.refresh()
            except Exception:  # a failed refresh keeps the previous gauges; the next one retries
                pass
            await asyncio.sleep(period)

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None
        # Flushes OTLP (bounded by its timeout) and unregisters the Prometheus collector.
        await asyncio.to_thread(self.provider.shutdown, 5000)


class _PrometheusReader(PrometheusMetricReader):
    def __init__(self, augment: Callable[[MetricsData | None], MetricsData], **kwargs) -> None:
        self._augment = augment
        super().__init__(**kwargs)

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs) -> None:
        super()._receive_metrics(self._augment(metrics_data), timeout_millis, **kwargs)


class _WithHistograms(MetricExporter):
    """An OTLP exporter that also sends the Recorder's histograms."""

    def __init__(self, inner: MetricExporter, augment: Callable[[MetricsData | None], MetricsData]) -> None:
        super().__init__(preferred_temporality=inner._preferred_temporality, preferred_aggregation=inner._preferred_aggregation)
        self._inner = inner
        self._augment = augment

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs) -> MetricExportResult:
        return self._inner.export(self._augment(metrics_data), timeout_millis=timeout_millis, **kwargs)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)
