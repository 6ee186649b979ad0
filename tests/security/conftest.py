from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

SNI = "tokenpools.tokenpools.svc.cluster.local"  # the name KEDA's scalerAddress and Envoy's SNI use in k8s/


@dataclass
class Certs:
    ca: Path  # signs the server certificate and the clients' certificates
    server_cert: Path
    server_key: Path
    client_cert: Path  # Envoy's / KEDA's client certificate
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path

    def read(self, name: str) -> bytes:
        return getattr(self, name).read_bytes()


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    d = tmp_path_factory.mktemp("certs")
    ca, rogue_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert(SNI, "localhost", "127.0.0.1")
    client = ca.issue_cert("envoy.tokenpools.client")
    rogue = rogue_ca.issue_cert("envoy.tokenpools.client")
    paths = {}
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    for name, leaf in (("server", server), ("client", client), ("rogue", rogue)):
        leaf.private_key_pem.write_to_path(str(d / f"{name}.key"))
        with open(d / f"{name}.pem", "wb") as f:
            for blob in leaf.cert_chain_pems:
                f.write(blob.bytes())
        paths[name] = (d / f"{name}.pem", d / f"{name}.key")
    return Certs(d / "ca.pem", *paths["server"], *paths["client"], *paths["rogue"])
