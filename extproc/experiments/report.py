"""results.json → report.md (plain Markdown tables; figures linked by file name)."""

from __future__ import annotations

from typing import Any


def _f(x: Any, nd: int = 3, unit: str = "") -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{nd}f}{unit}"
    return f"{x}{unit}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def checks_table(results: dict[str, Any]) -> list[str]:
    rows = [[c["check"], c["policy"], c["bound"], "pass" if c["passed"] else "**FAIL**", c["detail"]] for c in results["checks"]]
    if not rows:
        return ["(no acceptance checks for this experiment)", ""]
    return _table(["check", "policy", "bound", "result", "measured"], rows)


def phase_tables(results: dict[str, Any]) -> list[str]:
    pols = list(results["policies"])
    out: list[str] = []
    phases = results["policies"][pols[0]]["phases"]
    for i, ph in enumerate(phases):
        out.append(f"### Phase `{ph['name']}` ({ph['start_s']:g}–{ph['end_s']:g} s)")
        out.append("")
        rows = []
        for tenant in results["tenants"]:
            for pol in pols:
                t = results["policies"][pol]["phases"][i]["tenants"].get(tenant)
                if t is None:
                    continue
                rows.append([
                    tenant, pol, _f(t["p50_ttft_s"]), _f(t["p99_ttft_s"]), _f(t["p99_itl_s"]), _f(t["slo_attainment"], 2),
                    str(t["requests"]), str(t["admitted"]), str(t["queued"]), str(t["rejected"]), str(t["evicted"]),
                    str(t["unserved"]), f"{_f(t['tokens_per_s'], 0)} / {_f(t['baseline_tokens_per_s'], 0)}",
                    f"{_f(t['mean_in_flight'], 2)} / {_f(t['baseline_concurrency'], 0)}",
                ])  # fmt: skip
        out += _table(
            ["tenant", "policy", "p50 TTFT s", "p99 TTFT s", "p99 ITL s", "SLO att.", "requests", "admitted", "queued",
             "429s", "evicted", "unserved", "tok/s served / baseline", "in flight / baseline"],
            rows,
        )  # fmt: skip
    return out


def utilization_table(results: dict[str, Any]) -> list[str]:
    pols = list(results["policies"])
    rows = []
    for i, ph in enumerate(results["policies"][pols[0]]["phases"]):
        for pol in pols:
            p = results["policies"][pol]["phases"][i]
            u = p["utilization_by_dimension"]
            rows.append([ph["name"], pol, _f(u["concurrency"]), _f(u["throughput"]), _f(u["kv_cache"]),
                         _f(p["mean_running"], 2), _f(p["mean_waiting"], 2)])  # fmt: skip
    return _table(["phase", "policy", "slots busy", "throughput", "KV", "mean running", "mean waiting in vLLM"], rows)


def fairness_table(results: dict[str, Any]) -> list[str]:
    pols = list(results["policies"])
    phases = [p["name"] for p in results["policies"][pols[0]]["phases"]]
    rows = []
    for pol in pols:
        r = results["policies"][pol]
        rows.append([pol] + [_f(r["jain"].get(ph)) for ph in phases] + [_f(r["jain"].get("overall"))]
                    + [_f(r["vtc_max_service_diff"].get(ph), 0) for ph in phases])  # fmt: skip
    return _table(["policy"] + [f"Jain {ph}" for ph in phases] + ["Jain (time-weighted mean)"] + [f"VTC diff {ph}" for ph in phases], rows)


def render(results: dict[str, Any], figures: list[str]) -> str:
    lines = [f"# {results['title']}", "", results["description"], ""]
    lines += [f"Mode `{results['mode']}`, seed {results['seed']}"
              + (f", time scale {results['time_scale']}×" if results.get("time_scale") else "")
              + f". Command: `{results['command']}`", ""]  # fmt: skip
    pool = results["pool"]
    lines += [f"Pool: {pool['replicas']} × `{pool['profile']}` (max_num_seqs {pool['max_num_seqs']}); configured per replica "
              f"{pool['per_replica']}.", ""]  # fmt: skip
    lines += ["## Acceptance checks", ""] + checks_table(results)
    lines += ["## Latency, admission and service per tenant", ""]
    lines += ["TTFT counts from the first arrival at the gateway (queueing and 429 retries included); percentiles over "
              "served requests, `unserved` ones count as SLO misses. `429s` counts refusals (a request may get several).", ""]
    lines += phase_tables(results)
    lines += ["## Pool utilization (time-averaged, per dimension)", ""] + utilization_table(results)
    lines += ["## Fairness", "", "Jain's index over tokens served / baseline tokens per second (tenants with a baseline "
              "that sent requests; — when fewer than two); VTC difference: largest gap in service (input + 2 × output "
              "tokens) between tenants backlogged through a 10 s window.", ""]
    lines += fairness_table(results)
    for pol, r in results["policies"].items():
        d = r.get("debt_recovery")
        if d:
            lines += ["## Debt", "", f"Under `{pol}`: `{d['tenant']}` was under-served during the capacity loss; its debt "
                      f"peaked at {_f(d['peak_debt'])} (at {_f(d['debt_when_capacity_returned'])} when capacity came back at "
                      f"{d['capacity_returned_s']:g} s) and stayed within ±{d['threshold']} from {_f(d['settled_s'], 1)} s: "
                      f"**{_f(d['recovery_s'], 1)} s** after recovery (paper: ~{results['paper'].get('debt_recovery_s', '?')} s).", ""]  # fmt: skip
    if results.get("agreement"):
        lines += agreement_tables(results["agreement"])
    if results.get("paper"):
        lines += ["## The paper", ""] + [f"- {k}: {v}" for k, v in results["paper"].items()] + [""]
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    if figures:
        lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(lines)


def agreement_tables(agr: dict[str, Any]) -> list[str]:
    s = agr["summary"]

    def sp(key: str, pct: bool = False) -> str:
        v = s.get(key)
        if not v:
            return "—"
        f = (lambda x: f"{100 * x:+.0f} %") if pct else (lambda x: f"{x:+.3f} s")
        return f"median {f(v['median'])} (range {f(v['min'])} … {f(v['max'])})"

    u = s.get("utilization")
    busy = f"median {u['median']:+.3f} (range {u['min']:+.3f} … {u['max']:+.3f})" if u else "—"
    lines = ["## Live vs virtual time", "",
             "The same workload and seed run in virtual time (`--mode sim`); live − sim over every tenant and phase:", "",
             f"- p50 TTFT: {sp('p50_ttft_s')}; p99 TTFT: {sp('p99_ttft_s')}",
             f"- requests admitted: {sp('admitted_rel', True)}; mean in flight: {sp('mean_in_flight_rel', True)}; "
             f"tokens served/s: {sp('tokens_per_s_rel', True)}",
             f"- slots busy: {busy}",
             ""]  # fmt: skip
    for pol, body in agr.items():
        if pol == "summary":
            continue
        rows = []
        for ph in body["phases"]:
            for name, t in ph["tenants"].items():
                rows.append([ph["name"], name] + [f"{_f(t[k]['sim'], 3 if 'ttft' in k else 1)} / {_f(t[k]['live'], 3 if 'ttft' in k else 1)}"
                                                  for k in ("p50_ttft_s", "p99_ttft_s", "admitted", "rejected", "mean_in_flight", "tokens_per_s")])
            rows.append([ph["name"], "(slots busy)", f"{_f(ph['utilization']['sim'])} / {_f(ph['utilization']['live'])}", "", "", "", "", ""])
        lines += [f"### `{pol}`: sim / live", ""]
        lines += _table(["phase", "tenant", "p50 TTFT s", "p99 TTFT s", "admitted", "429s", "in flight", "tok/s"], rows)
    return lines
