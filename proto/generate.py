"""Regenerate the gRPC stubs in common/pb from proto/fedblock/v1/*.proto.

`python proto/generate.py` writes them in place; `python proto/generate.py --check` exits 1 when the
committed stubs differ from what protoc would write now (the stale-stub test runs this).

protoc writes absolute imports (`from fedblock.v1 import coordinator_pb2`) that match the proto package,
not our Python package; they are rewritten to relative imports so the stubs live inside fedblock.common.pb.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "common" / "pb"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted(PROTO_ROOT.glob("fedblock/v1/*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *map(str, protos),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        written = []
        for path in sorted(Path(tmp, "fedblock", "v1").iterdir()):
            if not path.name.endswith(SUFFIXES):
                continue
            text = re.sub(r"^from fedblock\.v1 import ", "from . import ", path.read_text(), flags=re.M)
            target = out_dir / path.name
            target.write_text(text)
            written.append(target)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    if not args.check:
        for path in generate(OUT):
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = [p.name for p in fresh if not (OUT / p.name).exists() or (OUT / p.name).read_text() != p.read_text()]
        extra = [p.name for p in OUT.iterdir() if p.name.endswith(SUFFIXES) and p.name not in {f.name for f in fresh}]
    if stale or extra:
        print(f"stale gRPC stubs in common/pb: {', '.join(stale + extra)}; run `make proto`", file=sys.stderr)
        return 1
    print("gRPC stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
