"""Generate the Python gRPC code from proto/ (the single source of the API).

python scripts/gen_proto.py          # write proto/shard/v1/*_pb2*.py next to the .proto
python scripts/gen_proto.py --check  # exit 1 if the checked-in files are stale
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"


def generate(out_dir: Path) -> list[Path]:
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    for proto in protos:
        args = [
            "protoc",
            f"-I{ROOT}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(proto),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")
    return sorted(p.relative_to(out_dir / "proto") for p in out_dir.rglob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="fail if generated files are out of date")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        files = generate(tmp_dir)
        stale = [
            f
            for f in files
            if not (PROTO_ROOT / f).exists() or not filecmp.cmp(tmp_dir / "proto" / f, PROTO_ROOT / f, shallow=False)
        ]
        if args.check:
            if stale:
                print("generated proto code is stale; run: python scripts/gen_proto.py", *stale, sep="\n  ")
                return 1
            print(f"proto: {len(files)} generated files are current")
            return 0
        for f in files:
            (PROTO_ROOT / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tmp_dir / "proto" / f, PROTO_ROOT / f)
            print("wrote", PROTO_ROOT / f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
