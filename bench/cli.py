"""`tokenpools bench ...`: every benchmark prints JSON (and can write it to a file)."""

from __future__ import annotations

import click
import orjson


def _emit(result: dict, as_json: bool, out: str | None) -> None:
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if as_json or not out:
        click.echo(text)


@click.group()
def bench() -> None:
    """Benchmarks (JSON output). Compare side by side within one run; the machines are noisy."""


@bench.command()
@click.option("--json", "as_json", is_flag=True, help="Print the JSON result (default when --out is absent).")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the JSON result to this file.")
@click.option("--pairs", default=200_000, show_default=True, help="admit + finish pairs per size.")
@click.option("--sizes", default="10,1000,10000", show_default=True, help="Entitlement counts, comma-separated.")
@click.option("--all-cores", is_flag=True, help="Do not pin the process to one core.")
def engine(as_json: bool, out: str | None, pairs: int, sizes: str, all_cores: bool) -> None:
    """Engine decisions per second (admit + reconcile pairs, one core) and bytes per entitlement."""
    from .engine import run

    result = run(tuple(int(s) for s in sizes.split(",")), pairs=pairs, one_core=not all_cores)
    _emit(result, as_json, out)


def _register() -> None:
    """Benchmarks that live in their own modules (imported lazily by the CLI group itself)."""
    from .overhead import overhead
    from .soak import soak

    bench.add_command(overhead)
    bench.add_command(soak)


_register()
