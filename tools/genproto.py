"""Regenerates the Python gRPC code in protos/ from protos/*.proto, and ``protos/descriptors.binpb``: the same
files as a FileDescriptorSet with their comments (source info), which server reflection serves (lookalike.net).

Run from anywhere: ``python -m tools.genproto``. The generated files are committed and never edited by hand;
``tests/test_protos.py`` fails when they are stale.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
DESCRIPTOR_SET = "descriptors.binpb"


def generate(out_dir: pathlib.Path = ROOT) -> list[pathlib.Path]:
    """Runs protoc (from grpcio-tools) over protos/*.proto, writing protos/*_pb2*.py(i) and
    protos/descriptors.binpb under ``out_dir``.

    Returns:
        The generated files.

    Raises:
        RuntimeError: protoc failed.
    """
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    protos = sorted(p.relative_to(ROOT).as_posix() for p in PROTO_DIR.glob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--descriptor_set_out={out_dir / 'protos' / DESCRIPTOR_SET}",
        "--include_source_info",
        *protos,
    ]
    (out_dir / "protos").mkdir(parents=True, exist_ok=True)
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted([*(out_dir / "protos").glob("*_pb2*.py*"), out_dir / "protos" / DESCRIPTOR_SET])


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    sys.exit(0)
