"""`tokenpools serve`: the ext_proc gRPC server, the status endpoint, and the timer that drives the engine.

One asyncio loop owns everything: the engine is pure and single-threaded, every gRPC stream handler and the
ticker run on the same loop, so no locks are needed. Time passed to the engine is Unix seconds (the clock the
config's `expiresAt` is written in) that never step backwards: see wall_clock_from_monotonic().

    ext_proc gRPC   HOST:9002   envoy.service.ext_proc.v3.ExternalProcessor/Process, grpc.health.v1.Health/Check
    status HTTP     HOST:9464   GET /status (engine snapshot JSON), GET /status/adapter, GET /status/scaler,
                                GET /status/state (shared state: mode, shares, leases), GET /status/invariants
                                (engine.check_invariants: 200 ok / 500 with the failed check), GET /healthz,
                                GET /metrics (Prometheus text format; names in docs/telemetry.md), GET / (status page)
    KEDA scaler     HOST:9003   externalscaler.ExternalScaler (gRPC), fed by the controller loop (extproc/scaler/)

For tests: `TokenpoolsServer(config, ...)` with `await start()` / `await stop()` (ports 0 pick free ones and are
reported back in `.ext_proc_port` / `.status_port` / `.scaler_port`), or `await serve(...)` which runs until
cancelled. The library default is no scaler and no controller (`scaler_port=None`, no backends); the command
line starts both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import signal
import time
from collections.abc import Callable
from pathlib import Path

import click
import grpc
import orjson
import structlog
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from .config import Config, ConfigError, load_file
from .reload import ConfigState, ConfigWatcher, digest_of
from .engine import Engine
from .envoy.health import Health
from .envoy.identity import KeyMap, TrustedSource
from .envoy.service import DEFAULT_MAX_BODY, ExtProcServicer, Gateway
from .scaler.capacity import ScalingPolicy
from .scaler.controller import Controller, ControllerOptions
from .state import MemoryStore, StateStore, open_store, run_store  # shared state (issue 8)
from .telemetry import configure_logging
from .telemetry.metrics import Metrics, TelemetryOptions  # metrics and logging (issue 9)

def wall_clock_from_monotonic() -> Callable[[], float]:
    """Unix seconds that never step: the wall clock read once at start, advanced by the monotonic clock. A wall
    clock stepped back (NTP, an operator) would otherwise stall the engine's buckets until it caught up (the
    engine holds its time); the price is that `expiresAt` is off by the size of any step since the start."""
    offset = time.time() - time.monotonic()
    return lambda: time.monotonic() + offset


def freeze_heap() -> None:
    """Move everything alive now (config, engine state: long-lived) out of the cyclic GC's reach. A full
    collection walks every tracked object: with thousands of entitlements that is a 30–40 ms pause on the
    admission loop (measured: bench/redis.py p999), for objects that are never garbage."""
    gc.collect()
    gc.freeze()


log = structlog.get_logger("tokenpools")

TICK_MAX_S = 0.1  # the engine is ticked at its next_wakeup(), and at least this often

_GRPC_OPTIONS = [
    # A second server on the same port must fail loudly, not share it (gRPC's Linux default is SO_REUSEPORT).
    ("grpc.so_reuseport", 0),
    # Envoy sends body chunks as they arrive; leave room for large ones (the default is 4 MiB).
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]
_SCALER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    # StreamIsActive streams stay open for hours with nothing to say: keep NAT/conntrack entries alive.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
]


class TokenpoolsServer:
    def __init__(
        self,
        config: Config,
        host: str = "127.0.0.1",
        ext_proc_port: int = 9002,
        status_port: int = 9464,
        max_body_bytes: int = DEFAULT_MAX_BODY,
        trusted: TrustedSource | None = None,
        clock: Callable[[], float] | None = None,
        engine: Engine | None = None,
        scaler_port: int | None = None,
        controller: ControllerOptions | None = None,
        kube=None,
        state: StateStore | None = None,
        config_path: str | None = None,
        watch_config: bool = True,
        telemetry: TelemetryOptions | None = None,
        tls: grpc.ServerCredentials | None = None,  # both gRPC servers (extproc/tls.py); None: plaintext
        status_host: str = "127.0.0.1",  # status HTTP: loopback unless asked (it names tenants and usage)
    ) -> None:
        self.config = config
        self.host = host
        self.tls, self.status_host = tls, status_host
        self.ext_proc_port = ext_proc_port
        self.status_port = status_port
        self.scaler_port = scaler_port  # None: no KEDA scaler
        self.clock = clock = clock or wall_clock_from_monotonic()
        self.engine = engine if engine is not None else Engine(config, clock())
        telemetry = telemetry or TelemetryOptions()
        recorder = telemetry.recorder()
        self.gateway = Gateway(
            self.engine, config, clock=clock, max_body_bytes=max_body_bytes, trusted=trusted, telemetry=recorder
        )
        self.health = Health(ready=lambda: self.state.ready())
        # The controller runs when there is a scaler to feed or backends to follow.
        self.controller: Controller | None = None
        if scaler_port is not None or (controller is not None and controller.backends):
            self.controller = Controller(self.engine, self.gateway.dispatch, clock, controller)
        self.kube = kube  # extproc.scaler.kube.KubeSync when the config comes from custom resources
        if kube is not None:
            kube.reload, kube.engine, kube.controller = self._reload_recorded, self.engine, self.controller
        # Where the config came from, which version runs, and why the last change was refused (/status "config").
        self.config_state = ConfigState(source=config_path or (f"kubernetes:{kube.resources.namespace}" if kube else "api"))
        self.config_state.loaded_at = clock()
        self._watcher: ConfigWatcher | None = None
        if config_path is not None:
            self.config_state.digest = digest_of(Path(config_path).read_bytes())
            if watch_config:
                self._watcher = ConfigWatcher(config_path, self.reload, self.config_state)
        self._watch_task: asyncio.Task | None = None
        self.metrics = Metrics(
            recorder, self.engine, clock, self.controller, lambda: self.gateway.stats.refusals, telemetry,
            config_state=self.config_state,
        )
        self._grpc: grpc.aio.Server | None = None
        self._scaler: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task | None = None
        # Shared state (extproc/state): memory = this replica holds whole pools; redis = a share of each.
        self.state = state if state is not None else MemoryStore()
        self._state_task: asyncio.Task | None = None

    async def start(self) -> None:
        # Shared state first: a replica that shares pools must hold its share before it serves anything.
        self.gateway.dispatch(await self.state.start(self.engine, self.clock()))
        self._state_task = asyncio.create_task(run_store(self.state, self.gateway.dispatch, self.clock))
        server = grpc.aio.server(options=_GRPC_OPTIONS)
        pb_grpc.add_ExternalProcessorServicer_to_server(ExtProcServicer(self.gateway), server)
        server.add_generic_rpc_handlers((self.health.handler(),))
        port = self._bind(server, self.ext_proc_port)
        if not port:
            raise OSError(f"cannot bind ext_proc gRPC on {self.host}:{self.ext_proc_port}")
        self.ext_proc_port = port
        await server.start()
        self._grpc = server

        if self.scaler_port is not None:
            from .scaler.service import add_to_server

            scaler = grpc.aio.server(options=_SCALER_OPTIONS)
            add_to_server(self.controller, scaler)
            port = self._bind(scaler, self.scaler_port)
            if not port:
                raise OSError(f"cannot bind the KEDA scaler gRPC on {self.host}:{self.scaler_port}")
            self.scaler_port = port
            await scaler.start()
            self._scaler = scaler

        app = web.Application()
        app.router.add_get("/status", self._status)
        app.router.add_get("/status/adapter", self._adapter_status)
        app.router.add_get("/status/scaler", self._scaler_status)
        app.router.add_get("/status/state", self._state_status)
        app.router.add_get("/status/invariants", self._invariants)  # the engine's books balance (bench soak)
        app.router.add_get("/healthz", self._healthz)  # readiness: serving and holding a share
        app.router.add_get("/livez", self._livez)  # liveness: the loop answers (also while draining)
        app.router.add_get("/", self._page)  # the status page (extproc/ui/status.html)
        app.router.add_get("/metrics", self.metrics.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.status_host, self.status_port, reuse_port=False)
        await site.start()
        self.status_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        freeze_heap()
        self._ticker = asyncio.create_task(self._tick_loop())
        self.metrics.start()
        if self.controller is not None:
            await self.controller.start()
        if self.kube is not None:
            await self.kube.start()
        if self._watcher is not None:
            self._watch_task = asyncio.create_task(self._watcher.run())

    def reload_file(self) -> bool | None:
        """Re-read the config file now (SIGHUP): True applied, False refused (old config kept), None unchanged."""
        if self._watcher is None:
            return None
        return self._watcher.check()

    def _reload_recorded(self, config: Config) -> None:
        try:
            self.reload(config)
        except ValueError as exc:
            self.config_state.failed(str(exc))
            raise
        self.config_state.succeeded()

    def _bind(self, server: grpc.aio.Server, port: int) -> int:
        addr = f"{self.host}:{port}"
        return server.add_secure_port(addr, self.tls) if self.tls is not None else server.add_insecure_port(addr)

    def reload(self, config: Config) -> None:
        """Swap in a new configuration (custom resources changed): the engine keeps requests, debt and counters
        (Engine.apply); the adapter gets the new keys."""
        keys = KeyMap.from_config(config)  # raises on a key held by two entitlements: nothing is applied then
        events = self.engine.apply(config, self.clock())
        self.config = config
        self.gateway.config = config
        self.gateway.keys = keys
        self.gateway.dispatch(events)
        if self.controller is not None:
            self.controller.step()
        freeze_heap()  # the new config's objects are long-lived too

    async def drain(self, seconds: float, hurry: asyncio.Event | None = None) -> None:
        """Stop being ready (gRPC health NOT_SERVING, /healthz 503), then let the ext_proc streams open here,
        admitted, queued or still arriving, run to their end, for at most `seconds` (or until `hurry` is set).
        New streams are still served meanwhile: Envoy, or the Service in front of several replicas, may send a
        few more before it sees this replica go; refusing them would turn a clean rollout into 503s."""
        self.health.serving = False
        gw = self.gateway
        if seconds <= 0 or not gw.open_streams:
            return
        log.info("draining", open_streams=gw.open_streams, in_flight=len(gw.live), max_seconds=seconds)
        t0 = time.monotonic()
        while gw.open_streams and time.monotonic() - t0 < seconds and not (hurry and hurry.is_set()):
            await asyncio.sleep(0.05)
        if gw.open_streams:
            log.warning("drain cut short", open_streams=gw.open_streams, after_s=round(time.monotonic() - t0, 2))
        else:
            log.info("drained", after_s=round(time.monotonic() - t0, 2))

    async def stop(self, grace: float = 2.0) -> None:
        self.health.serving = False
        if self._ticker is not None:
            self._ticker.cancel()
        if self._watcher is not None:
            self._watcher.stop()
        if self._watch_task is not None:
            await asyncio.gather(self._watch_task, return_exceptions=True)
        if self.kube is not None:
            await self.kube.stop()
        if self.controller is not None:
            await self.controller.stop()
        if self._scaler is not None:
            await self._scaler.stop(0.2)  # StreamIsActive streams never end by themselves; KEDA reconnects
        if self._grpc is not None:
            # In-flight streams get `grace` seconds, then are cancelled: their handlers release reservations.
            await self._grpc.stop(grace)
        # Shared state last, once in-flight requests are gone: then this replica's share goes back at once.
        if self._state_task is not None:
            self._state_task.cancel()
            await asyncio.gather(self._state_task, return_exceptions=True)
        await self.state.close()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.metrics.stop()

    async def _tick_loop(self) -> None:
        engine, gw = self.engine, self.gateway
        while True:
            try:
                gw.tick()
            except Exception:  # a bug in one tick must not stop queue deadlines for good
                log.exception("engine tick failed")
            wake = engine.next_wakeup()
            delay = TICK_MAX_S if wake is None else min(TICK_MAX_S, wake - self.clock())
            await asyncio.sleep(max(0.001, delay))

    async def _status(self, request: web.Request) -> web.Response:
        now = self.clock()
        doc = self.engine.snapshot(now)
        doc["time"] = now  # the server's clock: rates from two snapshots are exact, whatever the poll jitter
        doc["config"] = self.config_state.status()
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    async def _adapter_status(self, request: web.Request) -> web.Response:
        gw = self.gateway
        doc = {f.name: getattr(gw.stats, f.name) for f in dataclasses.fields(gw.stats)}
        doc["refusals"] = dict(gw.stats.refusals)
        doc["shadow"] = dict(gw.stats.shadow)
        doc["live_requests"] = len(gw.live)
        doc["in_flight"] = dict(gw.in_flight)
        doc["bytes_per_token"] = {m: round(gw.estimator.ratio(m), 3) for m in {p.spec.model for p in self.config.pools.values()}}
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    async def _scaler_status(self, request: web.Request) -> web.Response:
        if self.controller is None:
            return web.Response(status=404, text="no controller (start with --scaler-port or --backend)\n")
        doc = self.controller.snapshot()
        doc["scalerPort"] = self.scaler_port
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    async def _state_status(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.state.status()), content_type="application/json")

    async def _page(self, request: web.Request) -> web.Response:
        from .ui import page_html

        return web.Response(body=page_html(), content_type="text/html", headers={"Cache-Control": "no-cache"})

    async def _invariants(self, request: web.Request) -> web.Response:
        try:
            self.engine.check_invariants()
        except AssertionError as exc:
            return web.json_response({"ok": False, "error": str(exc) or "AssertionError"}, status=500)
        return web.json_response({"ok": True})

    async def _healthz(self, request: web.Request) -> web.Response:
        if self.health.ok:
            return web.Response(text="ok\n")
        return web.Response(text="draining\n" if not self.health.serving else "joining\n", status=503)

    async def _livez(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")


async def serve(
    config: Config, ready: Callable[[TokenpoolsServer], None] | None = None, drain_seconds: float = 0.0, **kwargs
) -> None:
    """Run a server until cancelled, or until SIGINT/SIGTERM when run as the main program: then drain for up
    to `drain_seconds` (a second signal stops at once) and stop."""
    server = TokenpoolsServer(config, **kwargs)
    await server.start()
    if ready is not None:
        ready(server)
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (hurry if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    for sig, handler in ((signal.SIGINT, on_signal), (signal.SIGTERM, on_signal), (signal.SIGHUP, server.reload_file)):
        try:
            loop.add_signal_handler(sig, handler)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    try:
        await stop.wait()
        await server.drain(drain_seconds, hurry)
    finally:
        await server.stop()


def _run(coro) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


@click.command("serve")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False), help="TokenPool/TokenEntitlement YAML (default: the packaged Exp 1 demo).")
@click.option("--kube-namespace", default=None, metavar="NS", help="Read TokenPool/TokenEntitlement custom resources of NS (list/watch) instead of --config, and write their status.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the gRPC servers (ext_proc, KEDA scaler) bind.")
@click.option("--status-host", default="127.0.0.1", show_default=True, help="Address the status HTTP server binds (loopback by default: it shows tenants and usage; 0.0.0.0 only behind a NetworkPolicy).")
@click.option("--ext-proc-port", default=9002, show_default=True, type=int, help="ext_proc gRPC port (0: any free port).")
@click.option("--status-port", default=9464, show_default=True, type=int, help="Status HTTP port (0: any free port).")
@click.option("--scaler-port", default=9003, show_default=True, type=int, help="KEDA external scaler gRPC port (0: any free port).")
@click.option("--backend", "backends", multiple=True, metavar="POOL=URL", help="A pool's vLLM backend, scraped at URL/metrics; its live count is the pool's replica count. dns+http://NAME:PORT: one backend per address of NAME (a headless Service). Repeatable; POOL may be left out when there is one pool.")
@click.option("--control-period", default=1.0, show_default=True, type=click.FloatRange(min=0.05), help="Seconds between controller steps (scrape, follow replicas, desired replicas).")
@click.option("--scale-down-delay", default=60.0, show_default=True, type=click.FloatRange(min=0), help="Seconds a lower need must hold before desired replicas go down.")
@click.option("--scale-down-band", default=0.1, show_default=True, type=click.FloatRange(min=0, max=1, max_open=True), help="Fraction of each replica a smaller count must leave free before it is chosen.")
@click.option("--burst-cap", default=1.0, show_default=True, type=click.FloatRange(min=0), help="Replicas that spot/preemptible and above-baseline demand may add at most.")
@click.option("--usage-window", default=60.0, show_default=True, type=click.FloatRange(min=0.1), help="Time constant (s) of the elastic use average.")
@click.option("--max-body-bytes", default=DEFAULT_MAX_BODY, show_default=True, type=int, help="Larger request bodies get 413.")
@click.option("--identity-header", default=None, help="Trusted header naming the entitlement (set by an authn filter in front).")
@click.option("--identity-metadata", default=None, metavar="NAMESPACE[:KEY]", help="Trusted Envoy dynamic metadata naming the entitlement (KEY defaults to 'entitlement').")
@click.option("--watch/--no-watch", "watch_config", default=True, show_default=True, help="Apply changes to --config as they are saved (and on SIGHUP); an invalid change is refused and the running config kept.")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", default="json", show_default=True, type=click.Choice(["json", "console"]), help="json: one JSON object per line (timestamp, level, logger, event, rid, ...); console: for people.")
@click.option("--otlp-endpoint", default=None, envvar="OTEL_EXPORTER_OTLP_ENDPOINT", metavar="URL", help="Also push metrics with OTLP/gRPC to URL (e.g. http://otel-collector:4317). Env: OTEL_EXPORTER_OTLP_ENDPOINT.")
@click.option("--metrics-max-entitlements", default=100, show_default=True, type=click.IntRange(min=0), help="Distinct entitlement label values in metrics (the first N seen); the others are labelled 'other'.")
@click.option("--metrics-entitlement", "metrics_entitlements", multiple=True, metavar="NAME", help="Label only these entitlements by name in metrics (the others: 'other'). Repeatable; overrides --metrics-max-entitlements.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None, help="PEM certificate chain: serve both gRPC servers over TLS (with --tls-key).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None, help="PEM private key of --tls-cert.")
@click.option("--tls-client-ca", type=click.Path(exists=True, dir_okay=False), default=None, help="PEM CA bundle: require client certificates signed by it (mutual TLS).")
@click.option("--drain-seconds", default=20.0, show_default=True, type=click.FloatRange(min=0), help="On SIGTERM/SIGINT: stop being ready, then let open requests (in flight, queued) finish for up to this long before stopping; a second signal stops at once. Keep it below the pod's terminationGracePeriodSeconds.")
@click.option("--state", "state_url", default="memory", show_default=True, envvar="TOKENPOOLS_STATE", metavar="memory|redis://HOST:PORT/DB", help="Where pool state lives: memory (this replica holds whole pools) or Redis, shared with other replicas (options in the URL: docs/state.md). Env: TOKENPOOLS_STATE.")
def serve_command(
    config_path, kube_namespace, host, ext_proc_port, status_port, scaler_port, backends, control_period,
    scale_down_delay, scale_down_band, burst_cap, usage_window, max_body_bytes, identity_header, identity_metadata,
    log_level, state_url, watch_config, log_format, otlp_endpoint, metrics_max_entitlements, metrics_entitlements,
    status_host=None, tls_cert=None, tls_key=None, tls_client_ca=None, drain_seconds=0.0,
) -> None:  # fmt: skip
    """Run the ext_proc server (gRPC), the KEDA external scaler (gRPC) and the status endpoint (HTTP)."""
    from .scaler.backends import parse_backend_option
    from .stack import default_config_path

    if bool(tls_cert) != bool(tls_key) or (tls_client_ca and not tls_cert):
        raise click.UsageError("--tls-cert and --tls-key go together; --tls-client-ca needs both")
    # Before anything logs; loggers keep this configuration once used (see configure_logging).
    configure_logging(log_level, log_format)
    telemetry = TelemetryOptions(metrics_max_entitlements, tuple(metrics_entitlements), otlp_endpoint or None)

    kube = None
    if kube_namespace:
        if config_path:
            raise click.UsageError("give --config or --kube-namespace, not both")
        kube = _kube_sync(kube_namespace)
        path = f"kubernetes namespace {kube_namespace}"
        config = kube.initial()
    else:
        path = config_path or str(default_config_path())
        try:
            config = load_file(path)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from exc
    urls: dict[str, list[str]] = {}
    for value in backends:
        try:
            pool, url = parse_backend_option(value, list(config.pools))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--backend") from exc
        urls.setdefault(pool, []).append(url)
    try:
        policy = ScalingPolicy(burst_cap, usage_window, scale_down_delay, scale_down_band)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    options = ControllerOptions(policy=policy, backends=urls, period_s=control_period)
    try:
        state = open_store(state_url)  # shared state (issue 8)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--state") from exc
    from .tls import server_credentials

    tls = server_credentials(tls_cert, tls_key, tls_client_ca) if tls_cert else None
    trusted = None
    if identity_header or identity_metadata:
        ns, _, key = (identity_metadata or "").partition(":")
        trusted = TrustedSource(header=identity_header, metadata_namespace=ns or None, metadata_key=key or "entitlement")

    def ready(server: TokenpoolsServer) -> None:
        click.echo(
            f"tokenpools: ext_proc gRPC on {server.host}:{server.ext_proc_port}, "
            f"KEDA scaler gRPC on {server.host}:{server.scaler_port}, "
            f"status on http://{server.status_host}:{server.status_port}/status ({path}: "
            f"{len(config.pools)} pools, {len(config.entitlements)} entitlements"
            f"{', backends: ' + ', '.join(f'{p}={len(u)}' for p, u in urls.items()) if urls else ''}"
            f"; state: {state.kind}{'; gRPC over mutual TLS' if tls_client_ca else '; gRPC over TLS' if tls else ''})",
            err=True,
        )

    _run(
        serve(
            config,
            ready=ready,
            host=host,
            ext_proc_port=ext_proc_port,
            status_port=status_port,
            scaler_port=scaler_port,
            controller=options,
            kube=kube,
            max_body_bytes=max_body_bytes,
            trusted=trusted,
            state=state,
            config_path=None if kube else path,
            watch_config=watch_config,
            telemetry=telemetry,
            tls=tls,
            status_host=status_host,
            drain_seconds=drain_seconds,
        )
    )


def _kube_sync(namespace: str):
    """Custom resources of `namespace` through the in-cluster service account (else ~/.kube/config)."""
    from kubernetes import client
    from kubernetes import config as kconfig

    from .scaler.kube import CustomResources, KubeSync

    try:
        kconfig.load_incluster_config()
    except kconfig.ConfigException:
        try:
            kconfig.load_kube_config()
        except Exception as exc:
            raise click.ClickException(f"no Kubernetes credentials (in-cluster or kubeconfig): {exc}") from exc
    return KubeSync(CustomResources(client.CustomObjectsApi(), namespace), reload=None, engine=None)
