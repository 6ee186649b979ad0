"""The ext_proc server as the benchmark runs it: `TokenpoolsServer` (the same class as `tokenpools serve`)
without the KEDA scaler and controller, on uvloop unless --asyncio. Prints `ready <ext_proc_port>` when up.

`python -m bench.load.server --config FILE --ext-proc-port P`
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--ext-proc-port", type=int, default=0)
    ap.add_argument("--asyncio", action="store_true", help="plain asyncio loop instead of uvloop")
    args = ap.parse_args()

    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    import os

    import orjson

    import extproc.app
    from extproc.app import TokenpoolsServer

    extra = orjson.loads(os.environ.get("TP_BENCH_GRPC_OPTIONS") or "[]")  # experiments: extra gRPC server options
    if extra:
        extproc.app._GRPC_OPTIONS = [*extproc.app._GRPC_OPTIONS, *(tuple(o) for o in extra)]
    from extproc.config import load_file

    config = load_file(args.config)

    async def run() -> None:
        server = TokenpoolsServer(config, host=args.host, ext_proc_port=args.ext_proc_port, status_port=0)
        await server.start()
        gc.collect()
        print(f"ready {server.ext_proc_port} {server.status_port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop(0.1)

    if args.asyncio:
        asyncio.run(run())
    else:
        import uvloop

        uvloop.run(run())


if __name__ == "__main__":
    sys.exit(main())
