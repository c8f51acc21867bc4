"""Bad configuration exits 2 with a message naming the key; good configuration merges in order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.cli import load
from proxy.config import ConfigError, HostPort

ELEMENT = "127.0.0.1:50051"


def run_proxy(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *argv], capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", **(env or {})})


@pytest.mark.parametrize(("argv", "env", "message"), [
    (["--listen", "localhost"], {}, "listen: 'localhost' is not HOST:PORT"),
    (["--listen", "127.0.0.1:99999"], {}, "listen: port '99999' must be a number from 1 to 65535"),
    (["--listen", "example.com:80"], {}, "listen: 'example.com' in 'example.com:80' is not an IP address"),
    (["--element", "nowhere"], {}, "--element: 'nowhere' is not HOST:PORT"),
    ([], {"TARGET_ADDR": "10.0.0.1:http"}, "target (TARGET_ADDR): port 'http' must be a number"),
    ([], {"LOG_LEVEL": "loud"}, "log_level (LOG_LEVEL): 'loud' is not one of debug, info, warning, error"),
    ([], {"LOG_FORMAT": "xml"}, "log_format (LOG_FORMAT): 'xml' is not one of console, json"),
    (["--window", "0"], {}, "window: 0 must be a whole number above 0"),
    (["--upstream-mark", "mark"], {}, "upstream_mark: 'mark' must be a number"),
])
def test_bad_flags_and_environment_exit_2_naming_the_key(argv: list[str], env: dict[str, str], message: str) -> None:
    done = run_proxy(*argv, env=env)
    assert done.returncode == 2
    assert message in done.stderr, done.stderr


@pytest.mark.parametrize(("toml", "message"), [
    ('listn = ["0.0.0.0:1"]', "listn: unknown key"),
    ('chunk_size = "big"', "chunk_size: 'big' must be a whole number above 0"),
    ('listen = "0.0.0.0:1"', "listen: '0.0.0.0:1' must be a non-empty list"),
    ('[[element]]\naddres = "a:1"', "element[0].addres: unknown key"),
    ('[[element]]\nname = "x"', "element[0].address: missing"),
    ('[[element]]\naddress = "a:1"\nfailure = "maybe"', "element[0].failure: 'maybe' is not one of open, closed"),
    ('[[element]]\naddress = "a:1"\ntimeout_ms = -5', "element[0].timeout_ms: -5 must be a whole number above 0"),
    ("listen = [", "is not valid TOML"),
])
def test_bad_file_exits_2_naming_the_key(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(toml)
    done = run_proxy("--config", str(path))
    assert done.returncode == 2
    assert message in done.stderr, done.stderr


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    done = run_proxy("--config", str(tmp_path / "absent.toml"))
    assert done.returncode == 2
    assert "--config: cannot read" in done.stderr


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text('target = "10.0.0.1:1"\nlog_level = "info"\nwindow = 4\n'
                    '[[element]]\naddress = "file:1"\nfailure = "open"\ntimeout_ms = 250\n')
    config = load(["--config", str(path), "--window", "16"], {"TARGET_ADDR": "10.0.0.2:2"})
    assert config.target == HostPort("10.0.0.2", 2)
    assert config.log_level == "info"
    assert config.window == 16
    assert config.listen == (HostPort("0.0.0.0", 15002), HostPort("0.0.0.0", 15006))
    assert [(e.address, e.failure, e.timeout_ms) for e in config.elements] == [("file:1", "open", 250)]
    from_env = load(["--config", str(path)], {"ELEMENTS": f"{ELEMENT}, b:2"})
    assert [e.address for e in from_env.elements] == [ELEMENT, "b:2"]
    from_flags = load(["--element", "c:3", "--element-failure", "open"], {"ELEMENTS": ELEMENT})
    assert [(e.address, e.failure) for e in from_flags.elements] == [("c:3", "open")]


def test_ipv6_listen_and_target_parse() -> None:
    config = load(["--listen", "[::]:15002", "--target", "[fd00::1]:80"], {})
    assert config.listen == (HostPort("::", 15002),)
    assert config.target == HostPort("fd00::1", 80)
    assert str(config.target) == "[fd00::1]:80"


def test_high_water_below_chunk_size_is_refused() -> None:
    with pytest.raises(ConfigError, match="high_water: 100 must be at least chunk_size"):
        load(["--high-water", "100"], {})
