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


WIDE = 125  # below this many columns the tables leave out model, KV, weight, debt and burst


def tables(view: dict[str, Any], url: str = "", width: int | None = None):
    """The rich renderable for one view (rows()). `width` < WIDE: the narrow set of columns."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    wide = width is None or width >= WIDE
    dims = DIMENSIONS if wide else tuple(d for d in DIMENSIONS if d[0] != "kv_cache_tokens")

    def table(title: str, cols) -> Table:
        t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for header, just, _ in cols:
            t.add_column(header, justify=just, no_wrap=header != "rej/s by reason", overflow="fold")
        return t

    def replicas(p) -> str:
        return num(p["replicas"]) + (f" → {p['desired_replicas']}" if p["desired_replicas"] is not None else "")

    pool_cols = [
        ("pool", "left", lambda p: Text(p["pool"], style="bold")),
        *([("model", "left", lambda p: p["model"] or "")] if wide else []),
        ("replicas", "right", replicas),
        *((f"{label} used/cap" if wide else label, "right", lambda p, d=d: pair(p["used"].get(d), p["capacity"].get(d)))
          for d, label in dims),
        ("queued", "right", lambda p: num(p["queued"])),
        ("in flight", "right", lambda p: num(p["in_flight"])),
        ("adm/s", "right", lambda p: _rate(p["admitted_per_s"])),
        ("rej/s", "right", lambda p: _rate(p["rejected_per_s"])),
    ]  # fmt: skip
    pools = table("pools" if wide else "pools (used/capacity)", pool_cols)
    for p in view["pools"]:
        pools.add_row(*(get(p) for _, _, get in pool_cols))

    ent_cols = [
        ("entitlement", "left", lambda e: e["entitlement"]),
        ("class", "left", lambda e: Text(e["class"] or "", style=CLASS_STYLE.get(e["class"], "")) + (Text(" shadow", style="dim") if e["shadow"] else Text(""))),
        ("state", "left", lambda e: Text(e["state"] or "", style=STATE_STYLE.get(e["state"], ""))),
        *((label, "right", lambda e, d=d: _use(e["used"].get(d), e["baseline"].get(d), e["ceiling"].get(d))) for d, label in dims),
        *([
            ("weight", "right", lambda e: _sig(e["weight"])),
            ("debt", "right", lambda e: f"{e['debt']:+.2f}" if e["debt"] is not None else "-"),
            ("burst", "right", lambda e: f"{e['burst']:.2f}" if e["burst"] is not None else "-"),
        ] if wide else []),
        ("queued", "right", lambda e: num(e["queued"])),
        ("adm/s", "right", lambda e: _rate(e["admitted_per_s"])),
        ("rej/s", "right", lambda e: Text(_rate(e["rejected_per_s"]), style="red" if e["rejected_per_s"] else "")),
        ("rej/s by reason", "left", lambda e: ", ".join(f"{why} {r:.1f}" for why, r in e["rejected_per_s_by_reason"].items())),
    ]  # fmt: skip
    parts = [pools]
    known = [p["pool"] for p in view["pools"]]
    for pool in known + sorted({e["pool"] for e in view["entitlements"]} - set(known)):
        mine = [e for e in view["entitlements"] if e["pool"] == pool]
        if not mine:
            continue
        ents = table(f"{pool}: entitlements (use/baseline; ≤ceiling where there is no baseline)", ent_cols)
        for e in mine:
            ents.add_row(*(get(e) for _, _, get in ent_cols))
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
            console.print(tables(view, url, console.width))
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
        with Live(tables(rows(prev), url, console.width), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval)
                try:
                    cur = fetch(url, time.monotonic())
                except Unreachable as exc:  # keep the last table, say why it is stale, keep trying
                    from rich.console import Group
                    from rich.text import Text

                    live.update(Group(tables(rows(prev), url, console.width), Text(f"stale: {exc}", style="bold red")))
                    continue
                live.update(tables(rows(cur, prev), url, console.width))
                prev = cur
    except KeyboardInterrupt:
        return
