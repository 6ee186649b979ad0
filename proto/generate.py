"""Compile proto/externalscaler.proto into extproc/scaler/externalscaler_pb2.py and _pb2_grpc.py.

    python proto/generate.py            # regenerate in place
    python proto/generate.py --out DIR  # write into DIR/extproc/scaler/ instead (the staleness test does this)

The proto is mapped to the virtual path extproc/scaler/externalscaler.proto (`-Iextproc/scaler=proto`), so the
generated gRPC module imports `from extproc.scaler import externalscaler_pb2` and needs no editing. The
protobuf package (and so the wire names, `/externalscaler.ExternalScaler/...`) stays KEDA's `externalscaler`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_DIR = REPO / "proto"
PACKAGE_PATH = "extproc/scaler"
NAME = "externalscaler"
OUTPUTS = (f"{PACKAGE_PATH}/{NAME}_pb2.py", f"{PACKAGE_PATH}/{NAME}_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) and return the files it wrote under `out`."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    (out / PACKAGE_PATH).mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PACKAGE_PATH}={PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"{PACKAGE_PATH}/{NAME}.proto",
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit status {code}: {' '.join(args)}")
    return [out / p for p in OUTPUTS]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO, help="root to write extproc/scaler/ under (default: the repo)")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
