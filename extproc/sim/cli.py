"""`tokenpools sim-backend`: one simulated vLLM replica behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import asyncio
import signal

import click

from extproc.sim.profiles import PROFILES, get_profile, load_profile
from extproc.sim.server import SimConfig, serve


@click.command("sim-backend")
@click.option("--model", default="sim-model", show_default=True,
              help="Served model name; requests naming another model get 404 (like vLLM).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8100, show_default=True, type=int, help="Port to listen on (0: any free port).")
@click.option("--profile", "profile_name", default="h100-llama3-8b", show_default=True,
              type=click.Choice(sorted(PROFILES)), help="Built-in backend profile (engine limits + step-time model).")
@click.option("--profile-file", type=click.Path(exists=True, dir_okay=False),
              help="YAML profile (Profile fields; `extends: <built-in>` to start from one). Overrides --profile.")
@click.option("--max-num-seqs", type=click.IntRange(min=1), help="Override the profile's max concurrent sequences.")
@click.option("--max-num-batched-tokens", type=click.IntRange(min=1), help="Override the per-step token budget.")
@click.option("--kv-cache-tokens", type=click.IntRange(min=1), help="Override the KV cache capacity in tokens.")
@click.option("--max-model-len", type=click.IntRange(min=1), help="Override the max prompt + output tokens.")
@click.option("--time-scale", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Run K times faster than real time; reported times stay in simulated seconds.")
@click.option("--stream-interval", default=1, show_default=True, type=click.IntRange(min=1),
              help="Tokens per SSE chunk after the first (vLLM --stream-interval).")
@click.option("--default-max-tokens", default=256, show_default=True, type=click.IntRange(min=1),
              help="Output length when a request sets neither max_tokens nor max_completion_tokens.")
def sim_backend(model: str, host: str, port: int, profile_name: str, profile_file: str | None,
                max_num_seqs: int | None, max_num_batched_tokens: int | None, kv_cache_tokens: int | None,
                max_model_len: int | None, time_scale: float, stream_interval: int, default_max_tokens: int) -> None:
    """Run a simulated vLLM backend (OpenAI API, SSE streaming, vLLM /metrics) on one port."""
    try:
        profile = load_profile(profile_file) if profile_file else get_profile(profile_name)
        profile = profile.replace(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                  kv_cache_tokens=kv_cache_tokens, max_model_len=max_model_len)
        config = SimConfig(profile=profile, model=model, time_scale=time_scale, stream_interval=stream_interval,
                           default_max_tokens=default_max_tokens)
    except (ValueError, TypeError) as e:
        raise click.UsageError(str(e)) from None
    try:
        import uvloop  # a dependency: about twice the SSE chunks per second of the default loop
    except ImportError:  # pragma: no cover
        asyncio.run(_main(config, host, port))
    else:
        uvloop.run(_main(config, host, port))


async def _main(config: SimConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve(config, host, port, stop)
