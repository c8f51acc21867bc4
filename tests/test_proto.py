"""The committed generated code is what proto/element.proto generates today."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.procs import REPO


def test_generated_code_is_current(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools is not installed (pip install -e '.[test]')")
    sys.path.insert(0, str(REPO / "proto"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    generate.generate(tmp_path)
    for name in ("element_pb2.py", "element_pb2.pyi", "element_pb2_grpc.py", generate.PROTOSET):
        fresh = (tmp_path / name).read_bytes()
        committed = (REPO / "elements" / "api" / name).read_bytes()
        assert fresh == committed, f"elements/api/{name} is stale: run python proto/generate.py"
