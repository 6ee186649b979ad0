"""vLLM v1 metrics in Prometheus text format (0.0.4), written by hand.

Names, label names and histogram buckets follow vLLM v1 so scrapers written for vLLM work unchanged.
All times are simulated seconds. Observations come from the server as step results are delivered.
"""

from __future__ import annotations

from bisect import bisect_left

from extproc.sim.scheduler import Request, Scheduler

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class Histogram:
    __slots__ = ("buckets", "counts", "sum", "count")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last: above the largest bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1  # le semantics: value == bound counts
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, acc = [], 0
        for bound, c in zip(self.buckets, self.counts):
            acc += c
            out.append((_num(bound), acc))
        out.append(("+Inf", self.count))
        return out


class EngineMetrics:
    """Histograms fed from step results; counters and gauges are read from the scheduler."""

    def __init__(self) -> None:
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(REQUEST_BUCKETS)
        self.queue = Histogram(REQUEST_BUCKETS)

    def on_token(self, req: Request) -> None:
        if req.generated == 1:
            self.ttft.observe(req.ttft)  # type: ignore[arg-type]
        else:
            self.itl.observe(req.last_itl)  # type: ignore[arg-type]

    def on_finish(self, req: Request) -> None:
        self.e2e.observe(req.e2e)  # type: ignore[arg-type]
        self.queue.observe(req.queue_time)  # type: ignore[arg-type]

    def render(self, sched: Scheduler, model_name: str, extra: dict[str, float] | None = None) -> str:
        labels = f'engine="0",model_name="{_escape(model_name)}"'
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, value: float) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            lines.append(f"{name}{{{labels}}} {_num(value)}")

        metric("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
               sched.num_running)
        metric("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
               sched.num_waiting)
        metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", sched.kv_usage)
        metric("vllm:num_preemptions_total", "counter", "Cumulative number of preemption from the engine.",
               sched.num_preemptions_total)
        metric("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
               sched.prompt_tokens_total)
        metric("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
               sched.generation_tokens_total)
        lines.append("# HELP vllm:request_success_total Count of successfully processed requests.")
        lines.append("# TYPE vllm:request_success_total counter")
        for reason, value in (("stop", 0), ("length", sched.request_success_total), ("abort", sched.aborted_total)):
            lines.append(f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} {_num(value)}')
        for name, help_, h in (
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", self.ttft),
            ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", self.itl),
            ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", self.e2e),
            ("vllm:request_queue_time_seconds",
             "Histogram of time spent in WAITING phase for request.", self.queue),
        ):
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} histogram")
            for le, c in h.cumulative():
                lines.append(f'{name}_bucket{{{labels},le="{le}"}} {_num(c)}')
            lines.append(f"{name}_count{{{labels}}} {_num(h.count)}")
            lines.append(f"{name}_sum{{{labels}}} {_num(h.sum)}")
        for name, value in (extra or {}).items():
            lines.append(f"# TYPE {name} gauge")
            lines.append(f"{name}{{{labels}}} {_num(value)}")
        return "\n".join(lines) + "\n"


def _num(v: float) -> str:
    return repr(float(v))


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
