"""Elements on unix domain sockets (issue 16): the SDK's `--unix PATH`, the proxy's `unix:/path`
element address. Real processes, real sockets; bytes judged by sha256 at the far end."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.cli import load
from proxy.config import ConfigError
from tests.procs import REPO, Proc
from tests.test_reliability import Harness, dial, h, read_until  # noqa: F401  (h: the fixture)


def unix_element(h: Harness, path: Path, *args: str) -> Proc:
    proc = Proc([sys.executable, "-m", "elements.passthrough", "--unix", str(path), *args])
    h.stack.callback(proc.stop)
    h.procs.append((f"element passthrough unix:{path}", proc))
    proc.wait_for_output(f"serving on unix:{path}")
    return proc


def test_an_element_on_a_unix_socket_carries_every_byte(h: Harness) -> None:
    path = h.tmp_path / "passthrough.sock"
    unix_element(h, path)
    upstream = h.upstream()
    p = h.proxy([f"unix:{path}"], "--target", f"127.0.0.1:{upstream.port}")
    payload = bytes(range(256)) * 1024
    with dial(p.port) as sock:
        sock.sendall(payload)
        got = read_until(sock, len(payload), timeout=20)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert p.element("events_total", kind="data") > 0, "the chunks went through the element"
    assert p.element("session_up") == 1


def test_a_socket_left_by_a_killed_element_is_replaced_a_live_one_is_not(h: Harness) -> None:
    path = h.tmp_path / "e.sock"
    first = unix_element(h, path)
    second = Proc([sys.executable, "-m", "elements.passthrough", "--unix", str(path)])
    h.stack.callback(second.stop)
    assert second.popen.wait(10) == 1
    assert "another process accepts connections there" in second.output()
    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait(10)
    assert path.exists(), "SIGKILL leaves the socket file behind"
    unix_element(h, path)


@pytest.mark.parametrize("address", ["unix:relative.sock", "unix:", "unix:/" + "x" * 120])
def test_a_unix_address_must_be_an_absolute_path_that_fits(address: str) -> None:
    with pytest.raises(ConfigError, match="is not unix:/ABSOLUTE/PATH"):
        load(["--element", address], {})


def test_a_unix_address_is_accepted_from_a_table(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text('[[element]]\naddress = "unix:/run/element/firewall.sock"\n')
    (element,) = load(["--config", str(path)], {}).elements
    assert element.unix and element.server_name == "localhost"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed "
                    "(tests/test_compose.py installs it as root)")
def test_the_compose_variant_on_unix_sockets_is_a_valid_compose_file() -> None:
    result = subprocess.run(["docker-compose", "-f", "docker-compose.yml", "-f", "docker/unix-sockets.yml",
                             "config"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    merged = yaml.safe_load(result.stdout)
    proxy = merged["services"]["proxy"]
    assert [a for a in proxy["command"] if a.startswith("--element=")] == [
        f"--element=unix:/run/elements/{name}.sock" for name in ("logger", "firewall", "rewrite")]
    for name in ("proxy", "logger", "firewall", "rewrite"):
        assert any("/run/elements" in str(v) for v in merged["services"][name]["volumes"]), name
