"""Telemetry: metrics (OpenTelemetry, Prometheus /metrics, optional OTLP) and structured logging.

    recorder.py   what the request path records (cheap counters and histograms; no export)
    metrics.py    MeterProvider + readers; GET /metrics; gauges from engine/controller snapshots
    labels.py     bounded entitlement label values
    histogram.py  the fixed-bucket histogram the recorder uses
    logs.py       structlog JSON/console configuration, redaction
Names, labels and options: docs/telemetry.md.
"""

from .labels import OTHER, EntitlementLabels
from .logs import configure_logging
from .recorder import Recorder

__all__ = ["OTHER", "EntitlementLabels", "Recorder", "configure_logging"]
