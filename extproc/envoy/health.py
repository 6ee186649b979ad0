"""grpc.health.v1.Health/Check for Envoy's gRPC health check of the ext_proc cluster.

Written by hand (two bytes on the wire) rather than adding grpcio-health-checking: the response is
HealthCheckResponse{status: SERVING} = field 1, varint 1 = b"\\x08\\x01"; NOT_SERVING (2) while draining.
"""

from __future__ import annotations

import grpc

SERVING = b"\x08\x01"
NOT_SERVING = b"\x08\x02"


class Health:
    def __init__(self) -> None:
        self.serving = True

    async def check(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return SERVING if self.serving else NOT_SERVING

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "grpc.health.v1.Health",
            {"Check": grpc.unary_unary_rpc_method_handler(self.check)},  # bytes in, bytes out
        )
