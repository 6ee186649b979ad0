"""The `tokenpools` command. Each subcommand lives beside the code it drives; this file only wires them up."""

from __future__ import annotations

import sys

import click

from .config import ConfigError, load_file


class _LazyGroup(click.Group):
    """Subcommands imported on first use, so `tokenpools validate` does not pay for gRPC or aiohttp."""

    _lazy = {
        "serve": ("extproc.app", "serve_command"),
        "up": ("extproc.stack", "up_command"),
        "sim-backend": ("extproc.sim.cli", "sim_backend"),
        "bench": ("bench.cli", "bench"),
        "experiment": ("extproc.experiments.cli", "experiment"),
        "top": ("extproc.ui.top", "top_command"),
        "plan": ("extproc.ui.plan", "plan_command"),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self._lazy:
            import importlib

            module, attr = self._lazy[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """tokenpools: admission control and autoscaling for multi-tenant LLM inference."""


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def validate(files: tuple[str, ...]) -> None:
    """Validate config FILES (TokenPool / TokenEntitlement YAML). Exit 1 with file, document and field on error."""
    failed = False
    for path in files:
        try:
            cfg = load_file(path)
        except ConfigError as exc:
            click.echo(f"error: {exc}", err=True)
            failed = True
            continue
        click.echo(f"{path}: ok ({len(cfg.pools)} pools, {len(cfg.entitlements)} entitlements)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
