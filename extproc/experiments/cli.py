"""`tokenpools experiment NAME`: one command per experiment, every policy side by side."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .catalog import EXPERIMENTS, SKIPPED
from .policies import POLICIES


@click.command("experiment")
@click.argument("name", type=click.Choice(sorted([*EXPERIMENTS, *SKIPPED])))
@click.option("--policy", default="all", show_default=True, type=click.Choice([*POLICIES, "all"]),
              help="Admission policy; 'all' runs every one on the same workload and seed.")
@click.option("--mode", default="sim", show_default=True, type=click.Choice(["sim", "live"]),
              help="sim: engine + simulator scheduler in virtual time; live: real Envoy + tokenpools + simulator backends.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for results.json, report.md and the PNG plots.")
@click.option("--seed", default=1, show_default=True, type=int, help="Workload seed (same seed: same requests for every policy).")
@click.option("--time-scale", default=5.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="live: simulated seconds per wall second (the backends' --time-scale; the server's clock runs as fast).")
@click.option("--tokens-per-second", default=None, type=float,
              help="Override the pool's perReplica.tokensPerSecond (e.g. the paper's nominal 480 in exp1).")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.option("--strict", is_flag=True, help="Exit 1 when an acceptance check fails.")
def experiment(name, policy, mode, out, seed, time_scale, tokens_per_second, no_plots, strict) -> None:
    """Run experiment NAME (exp1, exp1-3x, exp2, classes) and write results, report and plots to --out."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .run import run

    if name in SKIPPED:
        raise click.ClickException(f"{name}: not available yet: {SKIPPED[name]}")
    console = Console(stderr=True)
    policies = list(POLICIES) if policy == "all" else [policy]
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f} sim s"),
        TimeElapsedColumn(), console=console, transient=False,
    ) as prog:  # fmt: skip

        def factory(label: str, total: float):
            task = prog.add_task(label, total=total)
            return lambda done: prog.update(task, completed=done)

        try:
            results = run(name, policies, mode, out, seed, time_scale, tokens_per_second, factory, not no_plots,
                          log=lambda s: prog.console.log(s))  # fmt: skip
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
    table = Table(title=f"{name} ({mode}): acceptance checks")
    for col in ("check", "policy", "bound", "result", "measured"):
        table.add_column(col)
    for c in results["checks"]:
        table.add_row(c["check"], c["policy"], c["bound"], "[green]pass" if c["passed"] else "[red]FAIL", c["detail"])
    console.print(table)
    console.print(f"wrote {out / 'results.json'}, {out / 'report.md'} and {len(results['figures'])} plots")
    if strict and not all(c["passed"] for c in results["checks"]):
        sys.exit(1)
