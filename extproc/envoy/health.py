"""grpc.health.v1.Health/Check for Envoy's gRPC health check of the ext_proc cluster.

Written by hand (two bytes on the wire) rather than adding grpcio-health-checking: the response is
HealthCheckResponse{status: SERVING} = field 1, varint 1 = b"\\x08\\x01"; NOT_SERVING (2) while draining or not
yet holding a share of the pools (a replica in its first lease with shared state).
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

SERVING = b"\x08\x01"
NOT_SERVING = b"\x08\x02"


class Health:
    """SERVING while not draining and `ready()` says so (the shared state holds a share)."""

    def __init__(self, ready: Callable[[], bool] | None = None) -> None:
        self.serving = True  # False from the moment the server starts draining
        self.ready = ready

    @property
    def ok(self) -> bool:
        return self.serving and (self.ready is None or self.ready())

    async def check(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return SERVING if self.ok else NOT_SERVING

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "grpc.health.v1.Health",
            {"Check": grpc.unary_unary_rpc_method_handler(self.check)},  # bytes in, bytes out
        )
