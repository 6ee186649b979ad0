"""Policies, workload generator, metrics helpers and the command, piece by piece."""

import json
import random

import numpy as np
from click.testing import CliRunner

from extproc.config import from_objects
from extproc.engine import Engine, Reason, Verdict
from extproc.experiments import catalog
from extproc.experiments.cli import experiment
from extproc.experiments.client import retry_delay, retry_delay_http
from extproc.experiments.live import prompt_text
from extproc.experiments.policies import FairQueuePolicy, NonePolicy, StaticPolicy, make_policy, static_limits
from extproc.experiments.trace import Trace
from extproc.experiments.workload import Load, bursty, fixed, lognormal, poisson, rng_for, uniform
from extproc.sim.tokens import chat_prompt_tokens


def exp1_config(all_tenants=True):
    exp = catalog.get("exp1")
    return from_objects(exp.all_docs() if all_tenants else exp.docs_at(0.0))


def test_every_policy_answers_the_engine_interface():
    cfg = exp1_config(False)
    for name in ("tokenpools", "none", "static", "fairqueue"):
        pol = make_policy(name, cfg, 0.0, static_limits(exp1_config()) if name == "static" else None)
        d = pol.admit("r1", "guaranteed-a", 64, 64, 0.0)
        assert d.verdict is Verdict.ADMIT and d.max_tokens == 64
        pol.progress("r1", 10, 1.0)
        assert not pol.finish("r1", 64, 64, 4.0)
        assert pol.release("r1", 4.0) is not None  # idempotent
        assert pol.admit("x", "nobody", 1, 1, 5.0).reason is Reason.NOT_BOUND
        assert pol.pool_for_model("qwen3-8b") == "pool" and pol.entitlement_spec("guaranteed-a") is not None
        pol.tick(6.0)
        pol.snapshot(6.0)
        assert isinstance(pol, Engine) or pol.next_wakeup() is None


def test_none_admits_everything():
    pol = NonePolicy(exp1_config(False))
    assert all(pol.admit(f"r{i}", "spot-b", 64, 64, 0.0).verdict is Verdict.ADMIT for i in range(100))


def test_static_limits_never_overcommit_and_tokens_per_minute_window():
    lim = static_limits(exp1_config())
    assert lim["guaranteed-a"].concurrency == 6 and lim["guaranteed-c"].concurrency == 6
    assert lim["spot-b"].concurrency == 4  # 16 - 6 - 6: what the baselines leave
    pol = StaticPolicy(exp1_config(False), 0.0, lim)
    assert [pol.admit(f"b{i}", "spot-b", 64, 64, 0.0).verdict for i in range(5)][-1] is Verdict.REJECT
    # Tokens per minute: counted at completion in fixed one-minute windows; Retry-After = time to the next window.
    pol = StaticPolicy(exp1_config(False), 0.0, {"spot-b": type(lim["spot-b"])(4, 100)})
    pol.admit("r", "spot-b", 64, 64, 1.0)
    pol.finish("r", 64, 64, 5.0)
    d = pol.admit("s", "spot-b", 64, 64, 10.0)
    assert d.reason is Reason.OVER_THROUGHPUT and abs(d.retry_after - 50.0) < 1e-9
    assert pol.admit("t", "spot-b", 64, 64, 60.0).verdict is Verdict.ADMIT  # new window


def test_fairqueue_serves_the_smallest_counter_and_lifts_returning_tenants():
    pol = FairQueuePolicy(exp1_config(), 0.0)
    for i in range(16):  # fill the pool with a
        assert pol.admit(f"a{i}", "guaranteed-a", 100, 10, 0.0).verdict is Verdict.ADMIT
    assert pol.counters["guaranteed-a"] == 1600
    assert pol.admit("a16", "guaranteed-a", 100, 10, 0.0).verdict is Verdict.QUEUE
    assert pol.admit("b0", "spot-b", 100, 10, 0.0).verdict is Verdict.QUEUE
    assert pol.counters["spot-b"] == 1600  # lifted to the smallest backlogged counter (a's), not 0
    pol.progress("a0", 10, 1.0)  # output × 2
    assert pol.counters["guaranteed-a"] == 1620
    ev = pol.finish("a0", 100, 10, 1.0)
    assert ev.admitted == ["b0"]  # b's counter (1600) < a's (1620)
    assert pol.finish("a1", 100, 10, 1.0).admitted == ["a16"]
    assert pol.release("nope", 1.0) is not None


def test_lengths_and_arrivals_are_seeded_and_shaped():
    r1, r2 = rng_for(1, "t", "u0"), rng_for(1, "t", "u0")
    assert [uniform(32, 176).sample(r1) for _ in range(50)] == [uniform(32, 176).sample(r2) for _ in range(50)]
    assert fixed(64).sample(random.Random(0)) == 64
    ln = [lognormal(6.63, 0.99, 1, 100000).sample(random.Random(i)) for i in range(4000)]
    assert 600 < np.median(ln) < 900  # e^6.63 ≈ 757
    pois = poisson(0, 1000, 2.0).arrivals(random.Random(1))
    assert 1800 < len(pois) < 2200 and all(0 <= t < 1000 for t in pois)
    gaps = np.diff(bursty(0, 2000, 2.0, 4.0).arrivals(random.Random(1)))
    assert 3.0 < np.std(gaps) / np.mean(gaps) < 5.0  # coefficient of variation ≈ 4
    assert Load(0, 10, "closed", users=3).arrivals(random.Random(1)) == []


def test_client_model_follows_retry_after_and_gives_up_on_403():
    assert retry_delay(Reason.POOL_CONTENDED, 0.2, 0.05) == 1.05  # whole seconds, at least 1, plus jitter
    assert retry_delay(Reason.POOL_CONTENDED, 2.3, 0.0) == 3
    assert retry_delay(Reason.NOT_BOUND, None, 0.0) is None
    assert retry_delay(Reason.EVICTED, None, 0.0) == 1.0
    assert retry_delay(Reason.OVER_KV, None, 0.0) is None
    assert retry_delay_http(429, "3", 0.01) == 3.01 and retry_delay_http(403, None, 0) is None


def test_prompt_text_is_counted_exactly_by_the_simulator():
    for n in (10, 32, 64, 176, 1000):
        assert chat_prompt_tokens([{"role": "user", "content": prompt_text(n)}]) == n


def test_trace_bins_spread_intervals_exactly():
    tr = Trace(catalog.get("exp1"), "none", "sim", 1)
    tr.add_interval(tr.busy, 0.05, 0.35, 10.0)
    assert abs(tr.busy.sum() - 3.0) < 1e-9 and abs(tr.busy[0] - 0.5) < 1e-9 and abs(tr.busy[3] - 0.5) < 1e-9
    tr.add_interval(tr.busy, 89.95, 120.0, 1.0)  # clipped at the horizon
    assert abs(tr.busy.sum() - 3.05) < 1e-9


def test_command_writes_results_report_and_plots(tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(experiment, ["exp1", "--policy", "tokenpools", "--out", str(out), "--seed", "2"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["policies"]) == ["tokenpools"] and doc["seed"] == 2
    assert "## Acceptance checks" in (out / "report.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "exp1-timeline.png" in pngs and all((out / p).stat().st_size < 200_000 for p in pngs)
    res = CliRunner().invoke(experiment, ["autoscale", "--out", str(out)])
    assert res.exit_code != 0 and "not available yet" in res.output
    res = CliRunner().invoke(experiment, ["exp2", "--mode", "live", "--out", str(out)])
    assert res.exit_code != 0 and "capacity" in res.output
