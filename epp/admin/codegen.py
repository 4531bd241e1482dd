"""Generate the admin API's Python code from protos/epp_admin.proto.

    python -m epp.admin.codegen          # (re)write epp/_generated/epp_admin_pb2*.py
    python -m epp.admin.codegen --check  # exit 1 if the committed code is out of date

protoc's `-I<virtual>=<real>` maps the proto into `epp/_generated/`, so the generated gRPC module imports
`epp._generated.epp_admin_pb2` (no sys.path tricks).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "protos" / "epp_admin.proto"
OUT = ROOT / "epp" / "_generated"
FILES = ("epp_admin_pb2.py", "epp_admin_pb2.pyi", "epp_admin_pb2_grpc.py")


def generate(out_root: Path) -> None:
    from grpc_tools import protoc

    args = [
        "protoc",
        f"-Iepp/_generated={PROTO.parent}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        "epp/_generated/epp_admin.proto",
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epp.admin.codegen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the generated code is current")
    args = parser.parse_args(argv)
    if not args.check:
        generate(ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [
            f
            for f in FILES
            if not (OUT / f).exists()
            or not filecmp.cmp(Path(tmp) / "epp/_generated" / f, OUT / f, shallow=False)
        ]
    if stale:
        print(
            f"generated admin API code is out of date: {', '.join(stale)}; run: python -m epp.admin.codegen"
        )
        return 1
    print("generated admin API code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
