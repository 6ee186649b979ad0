"""From a Trace to numbers: per tenant and phase latency, admission and service; per pool utilization per
dimension; fairness (Jain's index, VTC's service difference); over-time series; acceptance checks.

Definitions (docs/experiments.md repeats them):
- TTFT: first token of the attempt that ran to the end, minus the request's *first* arrival at the gateway
  (queueing, 429 waits and retries count). Percentiles are over requests that got a first token; requests never
  served are counted in `unserved` and as SLO misses.
- Inter-token latency: every gap between consecutive tokens of a request; p99 over the phase's requests.
- A request belongs to the phase in which it first arrived.
- admitted: requests that ran; queued: attempts held in the gateway queue; rejected: 429/403 answers (one
  request may collect several); evicted: in-flight terminations; rejected_within_concurrency: 429s (not 403s)
  for requests that arrived while the tenant had fewer than its baseline concurrency outstanding.
- Utilization (per phase, time-averaged): concurrency = running sequences / (live replicas × max_num_seqs);
  throughput = tokens processed (prefill + output) / (live replicas × perReplica.tokensPerSecond); KV = the
  simulator's KV blocks in use.
- Jain's index over x_i = tokens served per second / baseline tokens per second, for tenants with a baseline
  that sent requests in the phase: (Σx)² / (n Σx²), 1 = everyone got the same fraction of its baseline.
  "overall" is the duration-weighted mean of the phases' indices.
- VTC service difference: in 10 s windows, among tenants backlogged the whole window (a request outstanding at
  every sample), max − min of service (input + 2 × output tokens); the phase's value is the largest window's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from extproc.config import from_objects
from extproc.engine import Engine

from .trace import Trace
from .workload import Experiment

VTC_WINDOW_S = 10.0
# Refusals that are not about capacity: the entitlement is absent or was removed (403). A request sent just as
# an entitlement is removed can race the removal live; it is not "rejected within its concurrency".
NOT_CAPACITY = frozenset({"not_bound", "entitlement_removed"})
DEBT_SETTLED = 0.05


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), nd)


def baselines(exp: Experiment) -> dict[str, dict[str, float]]:
    """Each tenant's baseline per dimension as the engine fills it in (0 for spot / preemptible)."""
    eng = Engine(from_objects(exp.all_docs()), 0.0)
    return {n: {"tokens_per_second": e.b_tps, "concurrency": e.b_conc, "kv_cache_tokens": e.b_kv} for n, e in eng.ents.items()}


def _capacity_integral(exp: Experiment, start: float, end: float, per_replica: float) -> float:
    """∫ live replicas × per_replica dt over [start, end)."""
    points = sorted({start, end, *(t for t, _ in exp.replicas if start < t < end)})
    return sum(exp.replicas_at(a) * per_replica * (b - a) for a, b in zip(points, points[1:]))


def _bins(tr: Trace, start: float, end: float) -> slice:
    return slice(int(round(start / tr.bin_s)), int(round(end / tr.bin_s)))


def phase_metrics(tr: Trace, base: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    exp = tr.experiment
    out = []
    slots = exp.profile.max_num_seqs
    tps = exp.per_replica["tokensPerSecond"]
    for ph in exp.phases:
        dur = ph.end - ph.start
        sl = _bins(tr, ph.start, ph.end)
        samples = [s for s in tr.samples if ph.start <= s["t"] < ph.end]
        util_conc = float(tr.busy[sl].sum()) / _capacity_integral(exp, ph.start, ph.end, slots)
        util_tps = float(tr.tokens[sl].sum()) / _capacity_integral(exp, ph.start, ph.end, tps)
        kv = float(np.mean([s["kv"] for s in samples])) if samples and samples[0].get("kv") is not None else None
        tenants: dict[str, Any] = {}
        for tn in exp.tenants:
            reqs = [r for r in tr.requests if r.tenant == tn.name and ph.start <= r.arrival < ph.end]
            in_flight = [s["tenants"].get(tn.name, {}).get("in_flight", 0) for s in samples]
            if not reqs and not any(in_flight):
                continue
            ttft = [r.ttft for r in reqs if r.ttft is not None]
            itls = [x for r in reqs for x in r.itls]
            e2e = [r.e2e for r in reqs if r.e2e is not None]
            slo = tn.slo_ms / 1000.0
            b = base.get(tn.name, {})
            b_tps, b_conc = b.get("tokens_per_second", 0.0), b.get("concurrency", 0.0)
            served_tps = float(tr.tenant_tokens[tn.name][sl].sum()) / dur
            mean_if = float(np.mean(in_flight)) if in_flight else 0.0
            within = [r for r in reqs if b_conc and r.outstanding_at_arrival < b_conc]
            tenants[tn.name] = {
                "class": tn.service_class,
                "slo_ms": tn.slo_ms,
                "requests": len(reqs),
                "p50_ttft_s": _r(_pct(ttft, 50)),
                "p99_ttft_s": _r(_pct(ttft, 99)),
                "max_ttft_s": _r(max(ttft) if ttft else None),
                "mean_ttft_s": _r(float(np.mean(ttft)) if ttft else None),
                "p99_itl_s": _r(_pct(itls, 99)),
                "p50_e2e_s": _r(_pct(e2e, 50)),
                "p99_e2e_s": _r(_pct(e2e, 99)),
                "slo_attainment": _r(sum(1 for x in ttft if x <= slo) / len(reqs)) if reqs else None,
                "admitted": sum(1 for r in reqs if r.admitted is not None),
                "queued": sum(r.queued for r in reqs),
                "rejected": sum(r.rejects for r in reqs),
                "rejected_by_reason": _merge(r.reasons for r in reqs),
                "rejected_within_concurrency": sum(
                    n for r in within for why, n in r.reasons.items() if why not in NOT_CAPACITY
                ) if b_conc else None,
                "evicted": sum(r.evicted for r in reqs),
                "unserved": sum(1 for r in reqs if r.ttft is None),
                "tokens_per_s": _r(served_tps, 2),
                "baseline_tokens_per_s": _r(b_tps, 2),
                "mean_in_flight": _r(mean_if, 3),
                "baseline_concurrency": _r(b_conc, 3),
                "share_of_baseline": _r(mean_if / b_conc, 3) if b_conc else None,
            }
        out.append(
            {
                "name": ph.name,
                "start_s": ph.start,
                "end_s": ph.end,
                "utilization": _r(util_conc),
                "utilization_by_dimension": {"concurrency": _r(util_conc), "throughput": _r(util_tps), "kv_cache": _r(kv)},
                "mean_running": _r(float(np.mean([s["running"] for s in samples])) if samples else None, 3),
                "mean_waiting": _r(float(np.mean([s["waiting"] for s in samples])) if samples else None, 3),
                "tenants": tenants,
                "jain": _r(jain(tr, ph.start, ph.end, base)),
                "vtc_max_service_diff": _r(vtc_diff(tr, ph.start, ph.end), 1),
            }
        )
    return out


def _merge(dicts) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def jain(tr: Trace, start: float, end: float, base: dict[str, dict[str, float]]) -> float | None:
    sl = _bins(tr, start, end)
    xs = []
    for tn in tr.experiment.tenants:
        b = base.get(tn.name, {}).get("tokens_per_second", 0.0)
        sent = any(start <= r.arrival < end for r in tr.requests if r.tenant == tn.name)
        if b > 0 and sent:
            xs.append(float(tr.tenant_tokens[tn.name][sl].sum()) / (end - start) / b)
    if len(xs) < 2 or sum(x * x for x in xs) == 0:
        return None
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


def vtc_diff(tr: Trace, start: float, end: float) -> float | None:
    worst = None
    t = start
    while t + VTC_WINDOW_S <= end + 1e-9:
        win = [s for s in tr.samples if t <= s["t"] < t + VTC_WINDOW_S]
        sl = _bins(tr, t, t + VTC_WINDOW_S)
        service = []
        for tn in tr.experiment.tenants:
            if win and all(s["tenants"].get(tn.name, {}).get("outstanding", 0) > 0 for s in win):
                service.append(float(tr.tenant_weighted[tn.name][sl].sum()))
        if len(service) >= 2:
            d = max(service) - min(service)
            worst = d if worst is None else max(worst, d)
        t += VTC_WINDOW_S
    return worst


def series(tr: Trace, every_s: float = 1.0) -> dict[str, Any]:
    """Over-time series at `every_s` resolution (for plots and results.json)."""
    exp = tr.experiment
    step = max(1, int(round(every_s / 0.5)))
    ss = tr.samples[::step]
    out: dict[str, Any] = {
        "t": [s["t"] for s in ss],
        "running": [s["running"] for s in ss],
        "waiting": [s["waiting"] for s in ss],
        "capacity": [exp.replicas_at(s["t"]) * exp.profile.max_num_seqs for s in ss],
        "tenants": {},
    }
    keys = ("in_flight", "queued", "outstanding", "debt", "weight", "burst", "alloc_conc", "counter")
    for tn in exp.tenants:
        d: dict[str, list] = {}
        for k in keys:
            vals = [s["tenants"].get(tn.name, {}).get(k) for s in ss]
            if any(v is not None for v in vals):
                d[k] = [None if v is None else round(float(v), 4) for v in vals]
        out["tenants"][tn.name] = d
    return out


def debt_recovery(tr: Trace) -> dict[str, Any] | None:
    """Exp 2: the tenant with the most debt during the capacity loss; how high it got, and how long after the
    capacity came back its debt stayed within ±DEBT_SETTLED."""
    exp = tr.experiment
    if len(exp.replicas) < 3 or not tr.samples or "debt" not in tr.samples[0]["tenants"].get(exp.tenants[0].name, {}):
        return None
    t_loss, t_back = exp.replicas[1][0], exp.replicas[2][0]
    after = next((ph.end for ph in exp.phases if ph.start == t_back), exp.horizon)
    during = [s for s in tr.samples if t_loss <= s["t"] < t_back]
    peak = {tn.name: max((s["tenants"][tn.name]["debt"] for s in during), default=0.0) for tn in exp.tenants}
    who = max(peak, key=peak.get)
    post = [s for s in tr.samples if t_back <= s["t"] < after]
    settled_at = None
    for i, s in enumerate(post):
        if all(abs(x["tenants"][who]["debt"]) < DEBT_SETTLED for x in post[i:]):
            settled_at = s["t"]
            break
    debt_at_loss_end = next((s["tenants"][who]["debt"] for s in reversed(during)), None)
    return {
        "tenant": who,
        "peak_debt": _r(peak[who]),
        "debt_when_capacity_returned": _r(debt_at_loss_end),
        "capacity_returned_s": t_back,
        "settled_s": settled_at,
        "recovery_s": _r(settled_at - t_back, 2) if settled_at is not None else None,
        "threshold": DEBT_SETTLED,
    }


# ---- acceptance checks ------------------------------------------------------------------------------------------


def _phase(pol: dict, name: str) -> dict:
    return next(p for p in pol["phases"] if p["name"] == name)


def _guaranteed_in_both(exp: Experiment, first: str, later: str, pol: dict, classes=("guaranteed", "dedicated")) -> list[str]:
    a, b = _phase(pol, first)["tenants"], _phase(pol, later)["tenants"]
    return [t.name for t in exp.tenants if t.service_class in classes and t.name in a and t.name in b
            and a[t.name]["p99_ttft_s"] is not None and b[t.name]["p99_ttft_s"] is not None]


def _ratio_check(exp, pol, first, later, bound, at_least=False, classes=("guaranteed", "dedicated")):
    rows = []
    for name in _guaranteed_in_both(exp, first, later, pol, classes):
        p0 = _phase(pol, first)["tenants"][name]["p99_ttft_s"]
        p1 = _phase(pol, later)["tenants"][name]["p99_ttft_s"]
        ratio = p1 / p0 if p0 else math.inf
        ok = ratio >= bound if at_least else ratio <= bound
        rows.append((name, p0, p1, ratio, ok))
    return rows


def checks(exp: Experiment, policies: dict[str, dict]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    first = exp.phases[0].name
    over = exp.phases[1].name if len(exp.phases) > 1 else first

    def add(name, policy, passed, detail, bound):
        out.append({"check": name, "policy": policy, "passed": bool(passed), "bound": bound, "detail": detail})

    tp = policies.get("tokenpools")
    for check in exp.checks:
        if check == "guaranteed_p99_bound" and tp:
            for name, p0, p1, ratio, ok in _ratio_check(exp, tp, first, over, 1.25):
                add(check, "tokenpools", ok, f"{name}: p99 TTFT {p1:.3f} s in {over} vs {p0:.3f} s in {first} = {ratio:.2f}×",
                    "≤ 1.25×")
        elif check == "no_guaranteed_rejects" and tp:
            for ph in tp["phases"]:
                for name, t in ph["tenants"].items():
                    if t["class"] in ("guaranteed", "dedicated"):
                        n = t["rejected_within_concurrency"] or 0
                        add(check, "tokenpools", n == 0, f"{name} in {ph['name']}: {n} rejected within its concurrency", "0")
        elif check == "none_p99_growth" and "none" in policies:
            for name, p0, p1, ratio, ok in _ratio_check(exp, policies["none"], first, over, 5.0, at_least=True):
                add(check, "none", ok, f"{name}: p99 TTFT {p1:.3f} s in {over} vs {p0:.3f} s in {first} = {ratio:.1f}×", "≥ 5×")
        elif check == "utilization" and tp:
            for ph in tp["phases"]:
                u = ph["utilization"]
                add(check, "tokenpools", u >= 0.95, f"{ph['name']}: {u:.3f} of slots busy", "≥ 0.95")
        elif check == "debt_rises_and_recovers" and tp:
            d = tp.get("debt_recovery")
            if d:
                rose = (d["peak_debt"] or 0) > 0.1
                add(check, "tokenpools", rose and d["recovery_s"] is not None,
                    f"{d['tenant']}: debt peaked at {d['peak_debt']}, back within ±{d['threshold']} "
                    f"{d['recovery_s']} s after capacity returned (paper: ~{exp.paper.get('debt_recovery_s')} s)",
                    "rises, then |d| < 0.05")
        elif check == "returning_guaranteed_bound" and tp:
            last = exp.phases[-1].name
            for name, p0, p1, ratio, ok in _ratio_check(exp, tp, first, last, 1.25, classes=("guaranteed",)):
                add(check, "tokenpools", ok, f"{name}: p99 TTFT {p1:.3f} s on return ({last}) vs {p0:.3f} s in {first} = {ratio:.2f}×",
                    "≤ 1.25×")
        elif check == "preemptible_evicted" and tp:
            n = sum(t["evicted"] for ph in tp["phases"] for name, t in ph["tenants"].items() if t["class"] == "preemptible")
            add(check, "tokenpools", n > 0, f"{n} preemptible requests evicted", "> 0")
        elif check == "dedicated_bursts" and tp:
            ph = tp["phases"][1]
            for name, t in ph["tenants"].items():
                if t["class"] == "dedicated":
                    add(check, "tokenpools", (t["mean_in_flight"] or 0) > (t["baseline_concurrency"] or 0),
                        f"{name} in {ph['name']}: {t['mean_in_flight']} in flight on average, baseline {t['baseline_concurrency']}",
                        "> baseline")
    return out


def _weighted_mean(phases: list[dict], key: str) -> float | None:
    """Duration-weighted mean of a per-phase value over the phases that have one."""
    pts = [(p["end_s"] - p["start_s"], p[key]) for p in phases if p[key] is not None]
    return sum(w * v for w, v in pts) / sum(w for w, _ in pts) if pts else None


def summarize(tr: Trace, base: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Everything results.json holds for one policy."""
    base = base if base is not None else baselines(tr.experiment)
    phases = phase_metrics(tr, base)
    exp = tr.experiment
    out: dict[str, Any] = {
        "phases": phases,
        "jain": {p["name"]: p["jain"] for p in phases} | {"overall": _r(_weighted_mean(phases, "jain"))},
        "vtc_max_service_diff": {p["name"]: p["vtc_max_service_diff"] for p in phases},
        "series": series(tr, max(1.0, round(exp.horizon / 150))),
        "info": tr.info,
        "events": tr.events,
    }
    d = debt_recovery(tr)
    if d is not None:
        out["debt_recovery"] = d
    return out
