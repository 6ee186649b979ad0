"""`tokenpools top`: a live terminal view of a running server's pools and entitlements.

Polls the status server (`/status`, and `/status/scaler` for desired replicas) every --interval seconds and
redraws two tables: per pool its replicas, capacity against use per dimension, queue and in flight; per
entitlement its class, state, use per dimension against its baseline, weight, debt, burst, queue, and
admitted / rejected per second (by reason) over the last interval. `--once` polls twice (one interval apart, so
there are rates), prints the tables and exits; `--json` prints the same rows as JSON.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from .view import DIMENSIONS, Poll, Unreachable, fetch, num, pair, rows

STATE_STYLE = {"Bound": "green", "Degraded": "yellow", "Pending": "red", "Expired": "dim"}
CLASS_STYLE = {"dedicated": "bold magenta", "guaranteed": "bold cyan", "elastic": "blue", "spot": "yellow", "preemptible": "dim"}


def _use(used: Any, baseline: Any, ceiling: Any) -> str:
    """Use against baseline; an entitlement without a baseline (spot, preemptible) shows its ceiling as ≤N."""
    if not baseline and ceiling:
        return f"{num(used)} ≤{num(ceiling)}"
    return pair(used, baseline)


def _sig(x: float | None) -> str:
    """Weights span orders of magnitude (class weight × debt/burst terms)."""
    if x is None:
        return "-"
    return num(x) if abs(x) >= 100 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}"


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def tables(view: dict[str, Any], url: str = ""):
    """The rich renderable for one view (rows())."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from rich import box

    pools = Table(title="pools", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    pools.add_column("pool", style="bold", no_wrap=True)
    pools.add_column("model", no_wrap=True)
    pools.add_column("replicas", justify="right")
    for _, label in DIMENSIONS:
        pools.add_column(f"{label} used/cap", justify="right", no_wrap=True)
    for col in ("queued", "in flight", "adm/s", "rej/s"):
        pools.add_column(col, justify="right")
    for p in view["pools"]:
        reps = num(p["replicas"])
        if p["desired_replicas"] is not None:
            reps += f" → {p['desired_replicas']}"
        pools.add_row(
            p["pool"], p["model"] or "", reps,
            *(pair(p["used"].get(d), p["capacity"].get(d)) for d, _ in DIMENSIONS),
            num(p["queued"]), num(p["in_flight"]), _rate(p["admitted_per_s"]), _rate(p["rejected_per_s"]),
        )  # fmt: skip
    parts = [pools]
    for pool in [p["pool"] for p in view["pools"]] + sorted({e["pool"] for e in view["entitlements"]} - {p["pool"] for p in view["pools"]}):
        mine = [e for e in view["entitlements"] if e["pool"] == pool]
        if not mine:
            continue
        ents = Table(title=f"{pool}: entitlements (use/baseline; ≤ceiling where there is no baseline)", title_justify="left",
                     box=box.SIMPLE_HEAD, pad_edge=False)  # fmt: skip
        for col, just in (
            ("entitlement", "left"), ("class", "left"), ("state", "left"), ("tok/s", "right"), ("KV", "right"),
            ("conc", "right"), ("weight", "right"), ("debt", "right"), ("burst", "right"), ("queued", "right"),
            ("adm/s", "right"), ("rej/s", "right"),
        ):  # fmt: skip
            ents.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
        ents.add_column("rej/s by reason", overflow="fold")
        for e in mine:
            reasons = ", ".join(f"{why} {r:.1f}" for why, r in e["rejected_per_s_by_reason"].items())
            ents.add_row(
                e["entitlement"],
                Text(e["class"] or "", style=CLASS_STYLE.get(e["class"], "")),
                Text(e["state"] or "", style=STATE_STYLE.get(e["state"], "")),
                *(_use(e["used"].get(d), e["baseline"].get(d), e["ceiling"].get(d)) for d, _ in DIMENSIONS),
                _sig(e["weight"]),
                f"{e['debt']:+.2f}" if e["debt"] is not None else "-",
                f"{e['burst']:.2f}" if e["burst"] is not None else "-",
                num(e["queued"]),
                _rate(e["admitted_per_s"]),
                Text(_rate(e["rejected_per_s"]), style="red" if e["rejected_per_s"] else ""),
                reasons,
            )  # fmt: skip
        parts.append(ents)
    dt = view["interval_s"]
    caption = f"{url}  ·  rates over the last {dt:.1f} s" if dt else f"{url}  ·  rates after the next poll"
    return Group(*parts, Text(caption, style="dim"))


@click.command("top")
@click.option("--url", default="http://127.0.0.1:9464", show_default=True, help="The status server of `tokenpools serve` / `tokenpools up`.")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(min=0.1), help="Seconds between polls (rates are per second over this interval).")
@click.option("--once", is_flag=True, help="Poll twice, --interval apart, print the tables and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON instead of tables (with --once: one document; else one line per poll).")
@click.option("--width", default=None, type=int, help="Table width in columns (default: the terminal's).")
def top_command(url: str, interval: float, once: bool, as_json: bool, width: int | None) -> None:
    """Live view of pools and entitlements: use against capacity and baseline, queues, admit/reject rates."""
    import orjson
    from rich.console import Console

    console = Console(width=width) if width else Console()

    def poll() -> Poll:
        try:
            return fetch(url, time.monotonic())
        except Unreachable as exc:
            raise click.ClickException(f"{exc} (is `tokenpools serve` or `tokenpools up` running? see --url)") from exc

    prev = poll()
    if once:
        time.sleep(interval)
        view = rows(poll(), prev)
        if as_json:
            sys.stdout.write(orjson.dumps(view, option=orjson.OPT_INDENT_2).decode() + "\n")
        else:
            console.print(tables(view, url))
        return
    if as_json:
        try:
            while True:
                time.sleep(interval)
                cur = poll()
                sys.stdout.write(orjson.dumps(rows(cur, prev)).decode() + "\n")
                sys.stdout.flush()
                prev = cur
        except KeyboardInterrupt:
            return
    from rich.live import Live

    try:
        with Live(tables(rows(prev), url), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval)
                try:
                    cur = fetch(url, time.monotonic())
                except Unreachable as exc:  # keep the last table, say why it is stale, keep trying
                    from rich.console import Group
                    from rich.text import Text

                    live.update(Group(tables(rows(prev), url), Text(f"stale: {exc}", style="bold red")))
                    continue
                live.update(tables(rows(cur, prev), url))
                prev = cur
    except KeyboardInterrupt:
        return
