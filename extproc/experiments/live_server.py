"""The tokenpools server as the live experiments run it: `python -m extproc.experiments.live_server ...`.

The same `extproc.app.TokenpoolsServer` (ext_proc gRPC + /status), with three differences an experiment needs:
- any policy (`extproc.experiments.policies`) in the engine's place, so the baselines run through the very same
  Envoy + ext_proc path as tokenpools;
- a clock in *simulated* seconds that runs `--time-scale` times faster than the wall clock (the simulator
  backends run at the same rate), frozen at 0 until the runner says start, so the experiment's t = 0 is the same
  instant for the runner and the policy;
- a small control API on `--control-port`: POST /control/start {"t0": wall seconds}, POST /control/apply
  {"docs": [...]} (Engine.apply: entitlements come and go), GET /control/state (clock + per-tenant state).
The adapter's key map holds every tenant the experiment ever has (`--config`); the policy starts with `--initial`.
"""

from __future__ import annotations

import asyncio
import signal
import time

import click
import orjson
import structlog
from aiohttp import web

from extproc.app import TokenpoolsServer
from extproc.config import from_objects, load_file

from .policies import POLICIES, make_policy, static_limits, tenant_state

TICK_MAX_SIM_S = 0.1


class ScaledClock:
    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.t0: float | None = None

    def __call__(self) -> float:
        if self.t0 is None:
            return 0.0
        return max(0.0, (time.time() - self.t0) * self.scale)


class LiveServer(TokenpoolsServer):
    """TokenpoolsServer whose timer sleeps in simulated seconds (the base class sleeps clock units as wall)."""

    scale = 1.0

    async def _tick_loop(self) -> None:
        engine, gw = self.engine, self.gateway
        while True:
            try:
                gw.tick()
            except Exception:
                structlog.get_logger("tokenpools").exception("engine tick failed")
            wake = engine.next_wakeup()
            delay = TICK_MAX_SIM_S if wake is None else min(TICK_MAX_SIM_S, wake - self.clock())
            await asyncio.sleep(max(0.001, delay / self.scale))


async def _main(config_path, initial_path, policy, scale, host, ext_proc_port, status_port, control_port) -> None:
    full = load_file(config_path)
    initial = load_file(initial_path) if initial_path else full
    clock = ScaledClock(scale)
    static = static_limits(full) if policy == "static" else None
    engine = make_policy(policy, initial, 0.0, static)
    server = LiveServer(full, host=host, ext_proc_port=ext_proc_port, status_port=status_port, clock=clock, engine=engine)
    server.scale = scale
    await server.start()

    async def start(request: web.Request) -> web.Response:
        body = await request.json()
        clock.t0 = float(body["t0"])
        return web.json_response({"t": clock()})

    async def apply(request: web.Request) -> web.Response:
        body = await request.json()
        events = engine.apply(from_objects(body["docs"]), clock())
        server.gateway.dispatch(events)
        return web.json_response({"t": clock(), "rejected": len(events.rejected)})

    async def state(request: web.Request) -> web.Response:
        now = clock()
        return web.Response(body=orjson.dumps({"t": now, "tenants": tenant_state(engine, now)}), content_type="application/json")

    app = web.Application()
    app.router.add_post("/control/start", start)
    app.router.add_post("/control/apply", apply)
    app.router.add_get("/control/state", state)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, control_port)
    await site.start()
    print(f"live-server ready ext_proc={server.ext_proc_port} status={server.status_port} control={control_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await server.stop(0.5)


@click.command()
@click.option("--config", "config_path", required=True, help="Every entitlement the experiment ever has (keys).")
@click.option("--initial", "initial_path", default=None, help="The entitlements in force at t = 0 (default: --config).")
@click.option("--policy", default="tokenpools", type=click.Choice(POLICIES))
@click.option("--time-scale", default=1.0, type=float)
@click.option("--host", default="127.0.0.1")
@click.option("--ext-proc-port", required=True, type=int)
@click.option("--status-port", required=True, type=int)
@click.option("--control-port", required=True, type=int)
def main(config_path, initial_path, policy, time_scale, host, ext_proc_port, status_port, control_port) -> None:
    import logging

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        import uvloop

        uvloop.run(_main(config_path, initial_path, policy, time_scale, host, ext_proc_port, status_port, control_port))
    except ImportError:  # pragma: no cover
        asyncio.run(_main(config_path, initial_path, policy, time_scale, host, ext_proc_port, status_port, control_port))


if __name__ == "__main__":
    main()
