"""The floor of any Python ext_proc: a grpc.aio ExternalProcessor that decides nothing and passes every message
straight back (headers unchanged, each body chunk echoed as it came), with the same server options, event loop
(uvloop) and read/write calls as tokenpools' servicer. Prints `ready <port>` when up.

Benchmarked beside the real server (bench/overhead.py, path `echo_ext_proc`), it splits the added latency and
CPU into what grpc.aio costs by itself and what tokenpools' own work adds on top.

`python -m bench.load.echo [--port P]`
"""

from __future__ import annotations

import argparse
import sys

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc.app import _GRPC_OPTIONS
from extproc.envoy.health import Health
from extproc.envoy.service import _body_response, _headers_response, _trailers_response


class Echo(pb_grpc.ExternalProcessorServicer):
    async def Process(self, request_iterator, context):  # noqa: N802 (gRPC method name)
        while True:
            msg = await context.read()
            if msg is grpc.aio.EOF:
                return
            which = msg.WhichOneof("request")
            if which in ("request_headers", "response_headers"):
                resp = _headers_response(which)
            elif which in ("request_body", "response_body"):  # built like tokenpools' own answers
                body = getattr(msg, which)
                resp = _body_response(which, body.body, body.end_of_stream)
            else:  # trailers
                resp = _trailers_response(which)
            await context.write(resp)
            if which == "response_body" and msg.response_body.end_of_stream or which == "response_trailers":
                return  # answered the last message: end the stream like tokenpools does (no read left pending)


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server(options=_GRPC_OPTIONS)
    pb_grpc.add_ExternalProcessorServicer_to_server(Echo(), server)
    server.add_generic_rpc_handlers((Health().handler(),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"ready {bound}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    import uvloop

    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    sys.exit(main())
