"""Backend scraping: vLLM's gauges from Prometheus text, who counts as up, the --backend option."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from extproc.scaler.backends import DOWN_AFTER, Backend, BackendSet, Sample, expand, parse_backend_option, parse_metrics
from extproc.sim.metrics import EngineMetrics
from extproc.sim.profiles import get_profile
from extproc.sim.scheduler import Scheduler

# Trimmed from a real vLLM v1 /metrics page (two engines, labels as vLLM writes them).
VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3-8B"} 7.0
vllm:num_requests_running{engine="1",model_name="Qwen/Qwen3-8B"} 5.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen3-8B"} 2.0
vllm:num_requests_waiting{engine="1",model_name="Qwen/Qwen3-8B"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen3-8B"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="Qwen/Qwen3-8B"} 0.25
vllm:num_requests_running_other{engine="0"} 99
vllm:prompt_tokens_total{engine="0",model_name="Qwen/Qwen3-8B"} 1.2345e+06
python_gc_objects_collected_total{generation="0"} 123.0
"""


def test_parses_vllm_gauges():
    s = parse_metrics(VLLM)
    assert (s.running, s.waiting, s.kv_usage) == (12.0, 2.0, 0.375)


def test_parses_what_the_simulator_serves():
    sched = Scheduler(get_profile("paper-spark"))
    text = EngineMetrics().render(sched, "qwen3-8b")
    assert parse_metrics(text) == Sample(0.0, 0.0, 0.0)
    assert "vllm:num_requests_running{" in text  # the names we read are the ones it writes


def test_v0_name_garbage_and_missing():
    assert parse_metrics("vllm:gpu_cache_usage_perc 0.8\n").kv_usage == 0.8
    assert parse_metrics("vllm:num_requests_running{a=\"}\"} NaN\nvllm:num_requests_waiting x\n") == Sample()
    assert parse_metrics("") == Sample()


def test_up_after_one_answer_down_after_repeated_failures():
    b = Backend("http://x")
    assert not b.up and not b.known
    b.record(None, "refused")
    assert not b.known  # one failure does not make a fresh backend count as zero
    b.record(None, "refused")
    assert b.known and not b.up and DOWN_AFTER == 2
    b.record(Sample(1, 0, 0.1))
    assert b.up
    b.record(None, "timeout")
    assert b.up  # one lost scrape keeps it
    b.record(None, "timeout")
    assert not b.up and b.as_dict()["error"] == "timeout"


def test_backend_option():
    assert parse_backend_option("p=http://10.0.0.1:8000/", ["p", "q"]) == ("p", "http://10.0.0.1:8000")
    assert parse_backend_option("http://h:8000", ["only"]) == ("only", "http://h:8000")
    assert parse_backend_option("p=dns+http://svc.ns:8000", ["p"]) == ("p", "dns+http://svc.ns:8000")
    for bad in ("http://h:8000", "r=http://h", "p=ftp://h", "p=h:8000"):
        with pytest.raises(ValueError):
            parse_backend_option(bad, ["p", "q"])


def test_dns_names_expand_to_one_backend_per_address():
    async def run():
        assert await expand("http://localhost:1") == ["http://localhost:1"]  # plain URLs are themselves
        assert await expand("dns+http://127.0.0.1:8000") == ["http://127.0.0.1:8000"]
        assert "http://127.0.0.1:8000" in await expand("dns+http://localhost:8000")

    asyncio.run(run())


def test_scrapes_live_servers_and_counts_them():
    from extproc.sim.server import SimConfig, SimServer

    async def run():
        sims = [SimServer(SimConfig(profile=get_profile("paper-spark"), model="m")) for _ in range(2)]
        ports = [await s.start() for s in sims]
        dead = "http://127.0.0.1:9"  # discard port: nothing listens
        bset = BackendSet([f"http://127.0.0.1:{p}" for p in ports] + [dead])
        assert not bset.settled and bset.live == 0  # never scraped: nothing known yet
        try:
            async with aiohttp.ClientSession() as session:
                await bset.refresh(session, 2.0)
                assert bset.live == 2 and not bset.settled
                await bset.refresh(session, 2.0)
                assert bset.live == 2 and bset.settled
                await sims[0].stop()
                for _ in range(DOWN_AFTER):
                    await bset.refresh(session, 2.0)
                assert bset.live == 1 and bset.totals().running == 0
        finally:
            for s in sims[1:]:
                await s.stop()

    asyncio.run(run())
