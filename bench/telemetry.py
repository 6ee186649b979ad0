"""Cost of telemetry on the request path, and of a scrape.

Run: `python -m bench.telemetry` (prints one JSON document; `--quick` for a smoke run). Measures, on this core:
  recorder_us_per_request   the recording calls the adapter makes for one request (two perf_counter reads, the
                            entitlement label lookup, the decision, the debug-log flag, the reconciled usage)
  exchange_us_per_request   one whole request through Exchange (headers, body, admit, response headers, SSE
                            body, finish) with the real Recorder and with a no-op one; the difference is the
                            telemetry cost in place (noisy: both sides are ~100 µs, and two identical
                            no-op gateways already differ by ~10 µs on a loaded 2-core machine)
  otel_sync_us_per_request  for comparison: the same recordings made with OpenTelemetry SDK synchronous
                            instruments and cached attribute dicts (why the Recorder exists)
  scrape_ms                 GET /metrics rendering (snapshot, OpenTelemetry collection, Prometheus text) with
                            N entitlements that all had traffic
Times are the best of many short repeats (the least disturbed by other processes on a shared machine); the
two Exchange variants run in alternating rounds.
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import time
from time import perf_counter

import orjson

from extproc.config import from_objects
from extproc.engine import Engine
from extproc.envoy.service import Exchange, Gateway
from extproc.telemetry import Recorder
from extproc.telemetry import logs as tlogs
from extproc.telemetry.metrics import Metrics, TelemetryOptions


def config(entitlements: int):
    docs = [{"apiVersion": "tokenpools.io/v1alpha1", "kind": "TokenPool", "metadata": {"name": "bench"},
             "spec": {"model": "m", "perReplica": {"tokensPerSecond": 1e12, "concurrency": 1_000_000, "kvCacheTokens": 10**12}}}]
    for i in range(entitlements):
        docs.append({"apiVersion": "tokenpools.io/v1alpha1", "kind": "TokenEntitlement",
                     "metadata": {"name": f"e{i}", "labels": {"tokenpools.io/demo": "true"}},
                     "spec": {"tenantId": f"t{i}", "poolRef": {"name": "bench"}, "qos": {"serviceClass": "spot"},
                              "burst": {"concurrency": 1000}, "auth": {"apiKeys": [f"k{i}"]}}})  # fmt: skip
    return from_objects(docs)


def best(fn, n: int, repeats: int) -> float:
    """Best µs per call of fn() over `repeats` runs of n calls."""
    out = []
    for _ in range(repeats):
        t = perf_counter()
        for _ in range(n):
            fn()
        out.append((perf_counter() - t) / n * 1e6)
    return min(out)


def recorder_calls(n: int, repeats: int) -> float:
    rec = Recorder()
    names = [f"e{i}" for i in range(10)]
    i = 0

    def one():  # what Exchange.decide + settle add for an admitted, finished request
        nonlocal i
        i += 1
        t0 = perf_counter()
        who = rec.who(names[i % 10], "spot")
        rec.decided(who, "admit", "none", perf_counter() - t0)
        if tlogs.DECISIONS:
            pass
        rec.settled(who, "m", 12, 11, 20)

    return best(one, n, repeats)


def otel_sync(n: int, repeats: int) -> float:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    meter = MeterProvider(metric_readers=[InMemoryMetricReader()]).get_meter("bench")
    decisions = meter.create_counter("d")
    latency = meter.create_histogram("l", unit="s")
    tin, tout = meter.create_counter("i"), meter.create_counter("o")
    ratio = meter.create_histogram("r")
    attrs = {"result": "admit", "reason": "none", "class": "spot", "entitlement": "e1"}
    who, model = {"class": "spot", "entitlement": "e1"}, {"model": "m"}

    def one():
        t0 = perf_counter()
        decisions.add(1, attrs)
        latency.record(perf_counter() - t0)
        tin.add(11, who)
        tout.add(20, who)
        ratio.record(12 / 11, model)

    return best(one, n, repeats)


class NullRecorder(Recorder):
    def who(self, entitlement, service_class):
        return ("", "")

    def decided(self, *a):
        pass

    def dequeued(self, *a):
        pass

    def evicted(self, *a):
        pass

    def settled(self, *a):
        pass


def exchange(n: int, repeats: int) -> tuple[float, float]:
    """Best µs per request with the real Recorder and with a no-op one, in alternating rounds."""
    from tests.envoy.extproc_msgs import chat, request_body, request_headers, response_body, response_headers

    headers = [request_headers(f"k{i}", path="/v1/chat/completions") for i in range(10)]
    body = request_body(chat(model="m", max_tokens=20, stream=True))
    rh = response_headers(200, "text/event-stream")
    c = {"choices": [{"delta": {"content": "x"}}], "usage": None}
    u = {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2}}
    sse = b"".join(b"data: " + orjson.dumps(o) + b"\n\n" for o in (c, c, u)) + b"data: [DONE]\n\n"
    rb = response_body(sse, True)

    def request_fn(recorder: Recorder):
        cfg = config(10)
        gw = Gateway(Engine(cfg, 1000.0), cfg, clock=time.time, telemetry=recorder)
        i = 0

        def one():
            nonlocal i
            i += 1
            ex = Exchange(gw, None)
            ex.handle(headers[i % 10])
            ex.handle(body)
            ex.handle(rh)
            ex.handle(rb)
            assert ex.settled

        return one

    async def run():  # Exchange wants a running loop for queue timers (none here: everything is admitted)
        real, null = request_fn(Recorder()), request_fn(NullRecorder())
        a, b = [], []
        for r in range(repeats):  # alternate which goes first: the first of a pair tends to run slower
            if r % 2:
                a.append(best(real, n, 1))
                b.append(best(null, n, 1))
            else:
                b.append(best(null, n, 1))
                a.append(best(real, n, 1))
        return min(a), min(b)

    return asyncio.run(run())


def scrape(entitlements: int, repeats: int) -> float:
    cfg = config(entitlements)
    engine = Engine(cfg, 1000.0)
    rec = Recorder()
    for i in range(entitlements):
        who = rec.who(f"e{i}", "spot")
        rec.decided(who, "admit", "none", 0.0001)
        rec.settled(who, "m", 10, 11, 5)
    metrics = Metrics(rec, engine, clock=lambda: 1000.0, options=TelemetryOptions(max_entitlements=entitlements))
    try:
        out = []
        for _ in range(repeats):
            t = perf_counter()
            metrics.render()
            out.append((perf_counter() - t) * 1e3)
        return min(out)
    finally:
        metrics.provider.shutdown()


def main() -> None:
    quick = "--quick" in sys.argv
    n, repeats = (2_000, 3) if quick else (20_000, 25)
    with_rec, without = exchange(200 if quick else 1000, 6 if quick else 30)
    doc = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_1m": os.getloadavg()[0]},
        "recorder_us_per_request": round(recorder_calls(n, repeats), 3),
        "otel_sync_us_per_request": round(otel_sync(n // 5, repeats), 3),
        "exchange_us_per_request": {"recorder": round(with_rec, 2), "no_op": round(without, 2), "difference": round(with_rec - without, 2)},
        "scrape_ms": {str(k): round(scrape(k, 3 if quick else 5), 2) for k in (10, 100, 1000)},
    }
    print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
