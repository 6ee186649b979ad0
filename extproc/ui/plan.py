"""`tokenpools plan CONFIG WORKLOAD`: what-if. Runs a config and a workload through the virtual-time simulator
(the experiments' runner: the real engine in front of the simulator's vLLM scheduler, one per replica) and
reports per entitlement its SLO attainment (TTFT within the entitlement's sloTargetMs), p50/p99 TTFT,
admitted / rejected counts, and per pool its utilization per dimension.

Workload file (YAML; example: extproc/ui/examples/plan-workload.yaml):

    duration: 60                # seconds of arrivals, virtual time (then outstanding requests may finish)
    seed: 1                     # optional; same seed, same requests
    pools:                      # optional, per pool of CONFIG: how to simulate its replicas
      paper-spark:
        replicas: 1             # default: the pool's spec.replicas.current (else min, else 1)
        profile: paper-spark    # a simulator profile (extproc/sim/profiles.py) or a profile YAML path;
                                # default paper-spark; max_num_seqs follows perReplica.concurrency
    tenants:                    # keyed by entitlement name (metadata.name in CONFIG)
      guaranteed-a:
        rate: 1.2               # open loop: Poisson arrivals per second ...
        cv: 1                   #   ... or bursty with this coefficient of variation (gamma gaps; 1 = Poisson)
        prompt: 64              # tokens: N, [LO, HI] (uniform), or {lognormal: [MU, SIGMA]}
        output: 64
      spot-b:
        users: 12               # closed loop: N users, each sends, waits for the answer, thinks, sends again
        think: 0.5              #   mean think time, seconds (exponential; 0: none)
        start: 10               # optional window of this load (default 0 .. duration)
        end: 50
      guaranteed-c:
        loads:                  # several blocks of demand: each a mapping with the keys above
          - {rate: 0.5}
          - {users: 6, start: 20, end: 40}

Definitions are the experiments' (docs/experiments.md): TTFT counts from a request's first arrival (queueing,
429 waits and retries included; clients retry after Retry-After); a request never served is an SLO miss;
`rejected` counts 429/403 answers (one request may collect several).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

from extproc.config import ConfigError, from_objects, load_file
from extproc.experiments.workload import Experiment, Lengths, Load, Phase, Tenant, fixed, lognormal, uniform

POLICIES = ("tokenpools", "none", "static", "fairqueue")
_LOAD_KEYS = {"rate", "cv", "users", "think", "start", "end", "stagger"}
_TENANT_KEYS = _LOAD_KEYS | {"prompt", "output", "loads"}


class WorkloadError(ValueError):
    pass


@dataclass
class PlanExperiment(Experiment):
    """One pool of a user's config as an Experiment: the config documents are used as written (the experiments
    build theirs from Tenant objects)."""

    docs: list[dict[str, Any]] = field(default_factory=list)

    def pool_doc(self) -> dict[str, Any]:
        return self.docs[0]

    def docs_at(self, t: float) -> list[dict[str, Any]]:
        return list(self.docs)

    def all_docs(self) -> list[dict[str, Any]]:
        return list(self.docs)

    def config_changes(self) -> list[float]:
        return []


def _lengths(value: Any, where: str) -> Lengths:
    if isinstance(value, bool):
        raise WorkloadError(f"{where}: expected N, [LO, HI] or {{lognormal: [MU, SIGMA]}}")
    if isinstance(value, (int, float)) and value >= 1:
        return fixed(int(value))
    if isinstance(value, list) and len(value) == 2 and all(isinstance(x, (int, float)) for x in value) and 1 <= value[0] <= value[1]:
        return uniform(int(value[0]), int(value[1]))
    if isinstance(value, dict) and set(value) == {"lognormal"}:
        mu_sigma = value["lognormal"]
        if isinstance(mu_sigma, list) and len(mu_sigma) == 2 and all(isinstance(x, (int, float)) for x in mu_sigma):
            return lognormal(float(mu_sigma[0]), float(mu_sigma[1]))
    raise WorkloadError(f"{where}: expected N >= 1, [LO, HI] (uniform) or {{lognormal: [MU, SIGMA]}}, got {value!r}")


def _number(d: dict, key: str, where: str, default: float, lo: float = 0.0) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
        raise WorkloadError(f"{where}.{key}: expected a number >= {lo:g}, got {v!r}")
    return float(v)


def _load(d: Any, where: str, duration: float) -> Load:
    if not isinstance(d, dict):
        raise WorkloadError(f"{where}: expected a mapping")
    unknown = set(d) - _LOAD_KEYS - {"prompt", "output"}
    if unknown:
        raise WorkloadError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(_LOAD_KEYS))})")
    start = _number(d, "start", where, 0.0)
    end = min(_number(d, "end", where, duration), duration)
    if end <= start:
        raise WorkloadError(f"{where}: end ({end:g}) must be after start ({start:g}) and start before duration")
    if ("rate" in d) == ("users" in d):
        raise WorkloadError(f"{where}: give either rate (open loop, requests/s) or users (closed loop)")
    if "users" in d:
        users = d["users"]
        if isinstance(users, bool) or not isinstance(users, int) or users < 1:
            raise WorkloadError(f"{where}.users: expected an integer >= 1, got {users!r}")
        return Load(start, end, "closed", users=users, think_s=_number(d, "think", where, 0.0),
                    stagger_s=_number(d, "stagger", where, 1.0))  # fmt: skip
    rate = _number(d, "rate", where, 0.0)
    cv = _number(d, "cv", where, 1.0)
    if rate <= 0 or cv <= 0:
        raise WorkloadError(f"{where}: rate and cv must be > 0")
    return Load(start, end, "poisson" if cv == 1.0 else "bursty", rate=rate, cv=cv)


@dataclass
class Workload:
    duration: float
    seed: int
    pools: dict[str, dict[str, Any]]
    tenants: dict[str, dict[str, Any]]  # entitlement -> {"loads": [Load], "input": Lengths, "output": Lengths}


def load_workload(path: str | Path) -> Workload:
    src = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise WorkloadError(f"{src}: cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise WorkloadError(f"{src}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise WorkloadError(f"{src}: expected a mapping with duration and tenants")
    unknown = set(data) - {"duration", "seed", "pools", "tenants"}
    if unknown:
        raise WorkloadError(f"{src}: unknown field(s) {', '.join(sorted(unknown))}")
    duration = _number(data, "duration", f"{src}: $", 60.0, lo=1.0)
    seed = data.get("seed", 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise WorkloadError(f"{src}: $.seed: expected an integer")
    pools = data.get("pools") or {}
    if not isinstance(pools, dict) or not all(isinstance(v, dict) for v in pools.values()):
        raise WorkloadError(f"{src}: $.pools: expected a mapping of pool name to {{replicas, profile}}")
    for name, p in pools.items():
        bad = set(p) - {"replicas", "profile"}
        if bad:
            raise WorkloadError(f"{src}: $.pools.{name}: unknown field(s) {', '.join(sorted(bad))}")
    raw_tenants = data.get("tenants")
    if not isinstance(raw_tenants, dict) or not raw_tenants:
        raise WorkloadError(f"{src}: $.tenants: expected a mapping of entitlement name to its load")
    tenants = {}
    for name, t in raw_tenants.items():
        where = f"{src}: $.tenants.{name}"
        if not isinstance(t, dict):
            raise WorkloadError(f"{where}: expected a mapping")
        unknown = set(t) - _TENANT_KEYS
        if unknown:
            raise WorkloadError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        if "loads" in t:
            if not isinstance(t["loads"], list) or not t["loads"] or set(t) & _LOAD_KEYS:
                raise WorkloadError(f"{where}.loads: a non-empty list, instead of rate/users at the tenant level")
            loads = [_load(ld, f"{where}.loads[{i}]", duration) for i, ld in enumerate(t["loads"])]
        else:
            loads = [_load({k: v for k, v in t.items() if k in _LOAD_KEYS}, where, duration)]
        tenants[name] = {
            "loads": loads,
            "input": _lengths(t.get("prompt", 64), f"{where}.prompt"),
            "output": _lengths(t.get("output", 64), f"{where}.output"),
        }
    return Workload(duration, seed, pools, tenants)


def experiments(config_path: str | Path, wl: Workload) -> list[PlanExperiment]:
    """One PlanExperiment per pool that the workload sends to (pools are independent in the engine)."""
    from extproc.engine import Engine
    from extproc.sim.profiles import get_profile, load_profile

    config = load_file(config_path)  # ConfigError with file, document and field
    raw = [d for d in yaml.safe_load_all(Path(config_path).read_text(encoding="utf-8")) if d is not None]
    for name in wl.tenants:
        if name not in config.entitlements:
            raise WorkloadError(f"workload tenant {name!r}: no such entitlement in {config_path} (known: {', '.join(sorted(config.entitlements))})")
    for name in wl.pools:
        if name not in config.pools:
            raise WorkloadError(f"workload pool {name!r}: no such pool in {config_path}")
    out = []
    for pool_name, pool in sorted(config.pools.items()):
        mine = [n for n, e in config.entitlements.items() if e.spec.pool_ref.name == pool_name]
        sending = [n for n in mine if n in wl.tenants]
        if not sending:
            continue
        opts = wl.pools.get(pool_name, {})
        spec = pool.spec
        replicas = opts.get("replicas", spec.replicas.current if spec.replicas.current is not None else max(1, spec.replicas.min or 0))
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            hint = "" if "replicas" in opts else f" (the pool's spec.replicas; set pools.{pool_name}.replicas in the workload)"
            raise WorkloadError(f"workload pool {pool_name}: replicas must be an integer >= 1, got {replicas!r}{hint}")
        prof_name = str(opts.get("profile", "paper-spark"))
        try:
            profile = load_profile(prof_name) if prof_name.endswith((".yaml", ".yml")) else get_profile(prof_name)
        except (ValueError, OSError) as exc:
            raise WorkloadError(f"workload pool {pool_name}: {exc}") from exc
        if spec.per_replica.concurrency:
            profile = profile.replace(max_num_seqs=int(spec.per_replica.concurrency))
        docs = [d for d in raw if isinstance(d, dict) and (
            (d.get("kind") == "TokenPool" and d["metadata"]["name"] == pool_name)
            or (d.get("kind") == "TokenEntitlement" and d["metadata"]["name"] in mine))]  # fmt: skip
        # The simulated replica count is the engine's too (perReplica × replicas).
        docs = [_with_replicas(d, replicas) if d.get("kind") == "TokenPool" else d for d in docs]
        eng_pool = Engine(from_objects(docs, source=str(config_path)), 0.0).pools[pool_name]
        per_tps = eng_pool.cap_tps / max(1, eng_pool.replicas)
        tenants = []
        for n in sending:
            e = config.entitlements[n].spec
            t = wl.tenants[n]
            tenants.append(Tenant(n, e.qos.service_class.value, e.qos.slo_target_ms, tuple(t["loads"]), t["input"], t["output"]))
        out.append(
            PlanExperiment(
                name=f"plan-{pool_name}", title=f"plan: pool {pool_name}", description="", horizon=wl.duration,
                phases=[Phase("all", 0.0, wl.duration)], tenants=tenants, profile=profile,
                per_replica={"tokensPerSecond": per_tps, "concurrency": profile.max_num_seqs},
                replicas=[(0.0, replicas)], pool_name=pool_name, model=spec.model, docs=docs,
            )
        )  # fmt: skip
    if not out:
        raise WorkloadError("the workload sends to no entitlement of the config")
    return out


def _with_replicas(doc: dict[str, Any], n: int) -> dict[str, Any]:
    spec = dict(doc["spec"])
    reps = dict(spec.get("replicas") or {})
    reps["current"] = n
    reps["max"] = max(int(reps.get("max", n)), n)
    reps["min"] = min(int(reps.get("min", 0)), n)
    spec["replicas"] = reps
    return dict(doc, spec=spec)


def plan(config_path: str | Path, wl: Workload, policy: str = "tokenpools", progress=None) -> dict[str, Any]:
    """Run every pool; returns the JSON document `plan --json` prints. `progress(label, total)` -> update(done)."""
    from extproc.experiments import metrics
    from extproc.experiments.runner import run_virtual

    pools: dict[str, Any] = {}
    ents: dict[str, Any] = {}
    for exp in experiments(config_path, wl):
        update = progress(f"{exp.pool_name} ({policy})", exp.horizon) if progress else None
        tr = run_virtual(exp, policy, wl.seed, update)
        base = metrics.baselines(exp)
        ph = metrics.phase_metrics(tr, base)[0]
        pools[exp.pool_name] = {
            "replicas": exp.replicas[0][1],
            "profile": exp.profile.name,
            "utilization": ph["utilization_by_dimension"],
            "mean_running": ph["mean_running"],
            "mean_waiting": ph["mean_waiting"],
            "wall_s": tr.info.get("wall_s"),
        }
        for tn in exp.tenants:
            t = ph["tenants"].get(tn.name)
            if t is None:
                continue
            ents[tn.name] = {"pool": exp.pool_name, **{k: t[k] for k in (
                "class", "slo_ms", "requests", "slo_attainment", "p50_ttft_s", "p99_ttft_s", "admitted", "queued",
                "rejected", "rejected_by_reason", "evicted", "unserved", "tokens_per_s", "mean_in_flight",
                "baseline_concurrency")}}  # fmt: skip
    return {
        "config": str(config_path),
        "policy": policy,
        "duration_s": wl.duration,
        "seed": wl.seed,
        "pools": pools,
        "entitlements": dict(sorted(ents.items(), key=lambda kv: (kv[1]["pool"], _CLASS.get(kv[1]["class"], 9), kv[0]))),
    }


_CLASS = {"dedicated": 0, "guaranteed": 1, "elastic": 2, "spot": 3, "preemptible": 4}


def _s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def render(doc: dict[str, Any]):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    pool_names = sorted({e["pool"] for e in doc["entitlements"].values()})
    one = len(pool_names) == 1
    where = f"pool {pool_names[0]}, " if one else ""
    ents = Table(title=f"per entitlement ({where}{doc['policy']}, {doc['duration_s']:g} s of arrivals, seed {doc['seed']})",
                 title_justify="left", pad_edge=False)  # fmt: skip
    cols = [("entitlement", "left"), ("class", "left"), ("SLO", "right"), ("reqs", "right"), ("SLO met", "right"),
            ("p50 TTFT", "right"), ("p99 TTFT", "right"), ("admitted", "right"), ("rejected", "right"),
            ("unserved", "right"), ("tok/s", "right"), ("in flight", "right")]  # fmt: skip
    if not one:
        cols.insert(0, ("pool", "left"))
    for col, just in cols:
        ents.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    for name, e in doc["entitlements"].items():
        att = e["slo_attainment"]
        style = "green" if att is not None and att >= 0.99 else "yellow" if att is not None and att >= 0.9 else "red"
        bl = e["baseline_concurrency"]
        ents.add_row(
            *([] if one else [e["pool"]]),
            name, e["class"], f"{e['slo_ms']:g} ms", str(e["requests"]), Text(_pct(att), style=style),
            _s(e["p50_ttft_s"]), _s(e["p99_ttft_s"]), str(e["admitted"]),
            Text(str(e["rejected"]), style="red" if e["rejected"] else ""), str(e["unserved"]),
            f"{e['tokens_per_s']:.1f}" if e["tokens_per_s"] is not None else "-",
            f"{e['mean_in_flight']:.1f}" + (f" / {bl:g}" if bl else ""),
        )  # fmt: skip
    pools = Table(title="per pool (time-averaged utilization)", title_justify="left", pad_edge=False)
    for col in ("pool", "replicas", "profile", "concurrency", "throughput", "KV cache", "waiting in vLLM"):
        pools.add_column(col, justify="left" if col in ("pool", "profile") else "right")
    for name, p in doc["pools"].items():
        u = p["utilization"]
        pools.add_row(name, str(p["replicas"]), p["profile"], _pct(u.get("concurrency")), _pct(u.get("throughput")),
                      _pct(u.get("kv_cache")), f"{p['mean_waiting']:.1f}" if p["mean_waiting"] is not None else "-")  # fmt: skip
    note = Text("SLO met: requests whose TTFT (from first arrival, retries included) was within the entitlement's "
                "sloTargetMs; in flight: mean / baseline.", style="dim")  # fmt: skip
    return Group(ents, Text(""), pools, note)


@click.command("plan")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.argument("workload", type=click.Path(exists=True, dir_okay=False))
@click.option("--policy", default="tokenpools", show_default=True, type=click.Choice(POLICIES),
              help="Admission policy: tokenpools (the engine) or a baseline, to compare.")  # fmt: skip
@click.option("--seed", default=None, type=int, help="Override the workload's seed.")
@click.option("--duration", default=None, type=click.FloatRange(min=1), help="Override the workload's duration (seconds).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--width", default=None, type=int, help="Table width in columns (default: the terminal's).")
def plan_command(config, workload, policy, seed, duration, as_json, width) -> None:
    """What-if: run CONFIG with WORKLOAD in the virtual-time simulator; per entitlement SLO attainment, TTFT and
    admitted/rejected, per pool utilization. Workload format: docs/operations.md
    (example: extproc/ui/examples/plan-workload.yaml)."""
    import orjson
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    try:
        wl = load_workload(workload)
        if seed is not None:
            wl = dataclasses.replace(wl, seed=seed)
        if duration is not None:
            wl = dataclasses.replace(wl, duration=duration)
        err = Console(stderr=True)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f} sim s"),
                      TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal) as prog:  # fmt: skip

            def factory(label: str, total: float):
                task = prog.add_task(label, total=total)
                return lambda done: prog.update(task, completed=done)

            doc = plan(config, wl, policy, factory)
    except (WorkloadError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")
    else:
        (Console(width=width) if width else Console()).print(render(doc))
