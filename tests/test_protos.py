"""The committed generated code is what `python -m tools.genproto` produces from protos/*.proto."""

import pathlib

import pytest

from tools import genproto


def test_generated_code_is_fresh(tmp_path):
    pytest.importorskip("grpc_tools")
    generated = genproto.generate(tmp_path)
    assert generated, "protoc generated nothing"
    root = pathlib.Path(genproto.__file__).resolve().parent.parent
    for path in generated:
        committed = root / "protos" / path.name
        assert committed.exists(), f"{committed} is missing: run python -m tools.genproto"
        assert committed.read_bytes() == path.read_bytes(), f"{committed} is stale: run python -m tools.genproto"
