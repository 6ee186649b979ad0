"""Run an experiment under one or more policies and write results.json, report.md and the plots."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from . import catalog, metrics, plots, report
from .runner import run_virtual
from .trace import Trace
from .workload import Experiment

ProgressFactory = Callable[[str, float], Callable[[float], None]]  # (label, total) -> update(done)


def describe(exp: Experiment) -> dict[str, Any]:
    base = metrics.baselines(exp)
    return {
        "experiment": exp.name,
        "title": exp.title,
        "description": exp.description,
        "phases": [{"name": p.name, "start_s": p.start, "end_s": p.end} for p in exp.phases],
        "tenants": {
            t.name: {
                "class": t.service_class,
                "slo_ms": t.slo_ms,
                "resources": t.resources,
                "burst": t.burst,
                "present": t.present,
                "baseline": {k: round(v, 3) for k, v in base[t.name].items()},
                "input_tokens": t.input.describe(),
                "output_tokens": t.output.describe(),
                "loads": [
                    {k: v for k, v in vars(ld).items() if v not in (0, 0.0, 1.0) or k in ("start", "end")} for ld in t.loads
                ],
            }
            for t in exp.tenants
        },
        "pool": {
            "profile": exp.profile.name,
            "max_num_seqs": exp.profile.max_num_seqs,
            "per_replica": exp.per_replica,
            "replicas": exp.replicas_at(0.0) if len(exp.replicas) == 1 else exp.replicas,
            "control": exp.control,
            "queue": exp.queue,
        },
        "paper": exp.paper,
        "notes": exp.notes,
    }


def run(
    name: str,
    policies: list[str],
    mode: str,
    out: Path,
    seed: int = 1,
    time_scale: float = 5.0,
    tokens_per_second: float | None = None,
    progress: ProgressFactory | None = None,
    make_plots: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    exp = catalog.get(name)
    if tokens_per_second is not None:
        exp.per_replica = dict(exp.per_replica, tokensPerSecond=tokens_per_second)
        exp.notes = exp.notes + [f"perReplica.tokensPerSecond overridden to {tokens_per_second:g} on the command line."]
    if mode == "live" and not exp.live_ok:
        raise ValueError(f"{name} changes the pool's capacity; live mode runs only experiments without capacity changes")
    out.mkdir(parents=True, exist_ok=True)
    traces: dict[str, Trace] = {}
    base = metrics.baselines(exp)
    for pol in policies:
        update = progress(f"{name} {pol} ({mode})", exp.horizon) if progress else None
        if mode == "sim":
            traces[pol] = run_virtual(exp, pol, seed, update)
        else:
            from .live import run_live

            traces[pol] = run_live(exp, pol, seed, time_scale, update, log=log)  # logs in a temp dir (info.workdir)
    results = describe(exp)
    results.update(
        {
            "mode": mode,
            "seed": seed,
            "time_scale": time_scale if mode == "live" else None,
            "command": "tokenpools experiment " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["experiment"] else
            f"tokenpools experiment {name} --policy {'all' if len(policies) > 1 else policies[0]} --mode {mode} --out {out} --seed {seed}",
            "policies": {pol: metrics.summarize(tr, base) for pol, tr in traces.items()},
        }
    )  # fmt: skip
    results["checks"] = metrics.checks(exp, results["policies"])
    if mode == "live":
        # The same workload in virtual time, for the sim-vs-live comparison.
        sim = {pol: metrics.summarize(run_virtual(exp, pol, seed), base) for pol in policies}
        results["agreement"] = agreement(sim, results["policies"])
    figures: list[str] = []
    if make_plots:
        reqs = {pol: [(r.tenant, r.arrival, r.ttft) for r in tr.requests if r.ttft is not None] for pol, tr in traces.items()}
        figures = [p.name for p in plots.all_plots(results, reqs, out)]
    results["figures"] = figures
    (out / "results.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    (out / "report.md").write_text(report.render(results, figures))
    return results


COMPARED = ("p50_ttft_s", "p99_ttft_s", "admitted", "rejected", "mean_in_flight", "tokens_per_s", "slo_attainment")


def agreement(sim: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """Per policy, phase and tenant: the virtual-time number next to the live one, and a summary of the gaps."""
    out: dict[str, Any] = {}
    gaps: dict[str, list[float]] = {"p50_ttft_s": [], "p99_ttft_s": [], "mean_in_flight_rel": [], "tokens_per_s_rel": [],
                                    "utilization": [], "admitted_rel": []}  # fmt: skip
    for pol, lv in live.items():
        sv = sim[pol]
        phases = []
        for sp, lp in zip(sv["phases"], lv["phases"]):
            tenants = {}
            for name, lt in lp["tenants"].items():
                st = sp["tenants"].get(name)
                if st is None:
                    continue
                tenants[name] = {k: {"sim": st.get(k), "live": lt.get(k)} for k in COMPARED}
                if st["requests"] and lt["requests"]:
                    for k in ("p50_ttft_s", "p99_ttft_s"):
                        if st[k] is not None and lt[k] is not None:
                            gaps[k].append(lt[k] - st[k])
                    for k in ("mean_in_flight", "tokens_per_s", "admitted"):
                        if st[k]:
                            gaps[k + "_rel"].append((lt[k] - st[k]) / st[k])
            gaps["utilization"].append(lp["utilization"] - sp["utilization"])
            phases.append({"name": lp["name"], "utilization": {"sim": sp["utilization"], "live": lp["utilization"]},
                           "tenants": tenants})  # fmt: skip
        out[pol] = {"phases": phases}

    def span(xs: list[float]) -> dict[str, float] | None:
        if not xs:
            return None
        return {"min": round(min(xs), 4), "median": round(sorted(xs)[len(xs) // 2], 4), "max": round(max(xs), 4)}

    out["summary"] = {k: span(v) for k, v in gaps.items()}
    return out
