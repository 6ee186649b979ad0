"""TLS for the two gRPC servers (Envoy → ext_proc, KEDA → external scaler): `tokenpools serve --tls-cert FILE
--tls-key FILE [--tls-client-ca FILE]`. With a client CA, clients must present a certificate signed by it
(mutual TLS); without one, any client may connect over TLS (server authentication and encryption only).

The files are read once at start; a rotated certificate takes effect on restart. Envoy's side (the ext_proc
cluster's transport_socket) is in envoy/tls-ext-proc.yaml, KEDA's (TriggerAuthentication caCert /
tlsClientCert / tlsClientKey) in k8s/tls/, the why in docs/SECURITY.md.
"""

from __future__ import annotations

from pathlib import Path

import grpc


def server_credentials(cert_file: str, key_file: str, client_ca_file: str | None = None) -> grpc.ServerCredentials:
    """Credentials for grpc.aio's add_secure_port: our chain + key; mutual TLS when a client CA is given."""
    cert, key = Path(cert_file).read_bytes(), Path(key_file).read_bytes()
    ca = Path(client_ca_file).read_bytes() if client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
