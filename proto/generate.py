"""Regenerates the Python code for element.proto into elements/api/.

Run `python proto/generate.py` after editing the proto. The generated files are
committed so a plain `pip install` needs no code generation; tests/test_proto.py
fails when they are stale. Besides the code it writes element.protoset, the
descriptors with their comments (source info, which the generated code leaves
out), for server reflection (elements/sdk/reflection.py) and `grpcurl -protoset`. grpc_tools writes a top-level `import element_pb2`,
which cannot work inside a package, so the import is rewritten to a package one.
"""

from __future__ import annotations

import sys
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
API_DIR = PROTO_DIR.parent / "elements" / "api"
FLAT_IMPORT = "import element_pb2 as element__pb2"
PACKAGE_IMPORT = "from elements.api import element_pb2 as element__pb2"
PROTOSET = "element.protoset"


def generate(out_dir: Path) -> None:
    """Writes element_pb2.py, element_pb2.pyi, element_pb2_grpc.py and element.protoset into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    status = protoc.main([
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        "--include_source_info",
        f"--descriptor_set_out={out_dir / PROTOSET}",
        str(PROTO_DIR / "element.proto"),
    ])
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}")
    _drop_json_names(out_dir / PROTOSET)
    grpc_module = out_dir / "element_pb2_grpc.py"
    text = grpc_module.read_text()
    if FLAT_IMPORT not in text:
        raise SystemExit(f"{grpc_module}: expected the line {FLAT_IMPORT!r}; grpc_tools changed its output")
    grpc_module.write_text(text.replace(FLAT_IMPORT, PACKAGE_IMPORT))


def _drop_json_names(path: Path) -> None:
    """protoc writes a json_name (camelCase) for every field of a descriptor set, which the
    generated code's descriptors lack; grpcurl prints and reads JSON by it. Without it grpcurl
    keeps the proto's own field names (`open_verdict`, `end_of_stream`), as documented."""
    descriptors = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
    for file in descriptors.file:
        pending = list(file.message_type)
        while pending:
            message = pending.pop()
            pending += message.nested_type
            for item in (*message.field, *message.extension):
                item.ClearField("json_name")
    path.write_bytes(descriptors.SerializeToString(deterministic=True))


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else API_DIR)
