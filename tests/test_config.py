"""Bad configuration exits 2 with a message naming the key; good configuration merges in order."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from proxy.cli import load
from proxy.config import (ELEMENT_LIMITS, LIMITS, MAX_MESSAGE_BYTES, ConfigError, ElementConfig, HostPort, Limit,
                          ProxyConfig, build, describe, largest_event_bytes)
from tests.procs import REPO

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
    (["--window", "0"], {}, "window: 0 must be a whole number from 1 to 1024"),
    (["--upstream-mark", "mark"], {}, "upstream_mark: 'mark' must be a number"),
    (["--listen", "127.0.0.1:\u00b2"], {}, "listen: port '\u00b2' must be a number from 1 to 65535"),
    (["--high-water", str(2**70)], {},
     "high_water: 1180591620717411303424 must be a whole number from 1 to 1073741824"),
    (["--max-connections", "10000001"], {}, "max_connections: 10000001 must be a whole number from 0 (no limit) "
                                            "to 10000000"),
    (["--max-metadata-entries", "4097"], {}, "max_metadata_entries: 4097 must be a whole number from 0 (no metadata) "
                                             "to 4096"),
    (["--element", "a:1", "--element-timeout-ms", "86400001"], {},
     "--element.timeout_ms: 86400001 must be a whole number from 1 to 86400000"),
    (["--listen", "127.0.0.1:15002", "--listen", "127.0.0.1:15002"], {},
     "listen: 127.0.0.1:15002 is given twice; list each address once"),
    (["--listen", "[::]:15002", "--listen", "[::0]:15002"], {},
     "listen: [::0]:15002 is the same address as [::]:15002"),
    (["--listen", "0.0.0.0:15002", "--listen", "127.0.0.1:15002"], {},
     "listen: 127.0.0.1:15002 overlaps 0.0.0.0:15002: 0.0.0.0:15002 accepts on every IPv4 address of port 15002"),
    (["--listen", "127.0.0.1:15002", "--listen", "0.0.0.0:15002"], {},
     "listen: 0.0.0.0:15002 overlaps 127.0.0.1:15002"),
    (["--listen", "0.0.0.0:15000"], {}, "admin: 127.0.0.1:15000 collides with the listen address 0.0.0.0:15000"),
    ([], {"ELEMENTS": ",,,"}, "ELEMENTS: empty entry at position 1 in ',,,'"),
    ([], {"ELEMENTS": "a:1,,b:2"}, "ELEMENTS: empty entry at position 2 in 'a:1,,b:2'"),
    ([], {"ELEMENTS": "a:1,b:2,"}, "ELEMENTS: empty entry at position 3 in 'a:1,b:2,'"),
    (["--element", ""], {}, "--element: empty entry at position 1 in ['']"),
    (["--element", "a:1", "--element", " "], {}, "--element: empty entry at position 2 in ['a:1', ' ']"),
])
def test_bad_flags_and_environment_exit_2_naming_the_key(argv: list[str], env: dict[str, str], message: str) -> None:
    done = run_proxy(*argv, env=env)
    assert done.returncode == 2
    assert message in done.stderr, done.stderr


@pytest.mark.parametrize(("toml", "message"), [
    ('listn = ["0.0.0.0:1"]', "listn: unknown key"),
    ('chunk_size = "big"', "chunk_size: 'big' must be a whole number from 1 to 16777216"),
    (f'chunk_size = "{"9" * 5000}"', "characters) must be a whole number from 1 to 16777216"),
    (f'chunk_size = {"9" * 5000}', "is not valid TOML"),
    ('listen = ["127.0.0.1:1", "127.0.0.1:1"]', "listen: 127.0.0.1:1 is given twice"),
    ('listen = "0.0.0.0:1"', "listen: '0.0.0.0:1' must be a non-empty list"),
    ('[[element]]\naddres = "a:1"', "element[0].addres: unknown key"),
    ('[[element]]\nname = "x"', "element[0].address: missing"),
    ('[[element]]\naddress = "a:1"\nfailure = "maybe"', "element[0].failure: 'maybe' is not one of open, closed"),
    ('[[element]]\naddress = "a:1"\ntimeout_ms = -5', "element[0].timeout_ms: -5 must be a whole number from 1 to "),
    ('[[element]]\naddress = "a:1"\nbreaker_window_ms = 3600001',
     "element[0].breaker_window_ms: 3600001 must be a whole number from 1 to 3600000"),
    ('[[element]]\naddress = "a:1"\nbreaker_failure_percent = 101',
     "element[0].breaker_failure_percent: 101 must be a whole number from 0 (off) to 100"),
    ('[[element]]\naddress = "a:1"\nbreaker_min_events = 0',
     "element[0].breaker_min_events: 0 must be a whole number from 1 to 1000000"),
    ('max_replacement_bytes = 33554432\nmax_metadata_bytes = 4194304\n' + '[[element]]\naddress = "a:1"\n' * 8,
     "the largest event would be max(chunk_size 65536, max_replacement_bytes 33554432) + 8 elements x "
     "max_metadata_bytes 4194304 + 65536 = 67174400 bytes, over the 67108864-byte gRPC message limit"),
    ("listen = [", "is not valid TOML"),
])
def test_bad_file_exits_2_naming_the_key(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(toml)
    done = run_proxy("--config", str(path))
    assert done.returncode == 2
    assert message in done.stderr, done.stderr


@pytest.mark.parametrize(("data", "where"), [
    (b"\xff\xfelisten = []", "byte 0xff at offset 0, line 1"),
    (b'log_level = "info"\n# caf\xe9\n', "byte 0xe9 at offset 24, line 2"),
])
def test_file_that_is_not_utf8_exits_2_naming_the_byte(tmp_path: Path, data: bytes, where: str) -> None:
    path = tmp_path / "proxy.toml"
    path.write_bytes(data)
    done = run_proxy("--config", str(path))
    assert done.returncode == 2
    assert f"--config: {path} is not UTF-8 text ({where})" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


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


def test_new_limits_have_their_defaults() -> None:
    config = build({"element": [{"address": ELEMENT}]}, {}, {})
    assert (config.max_metadata_entries, config.max_metadata_key_bytes, config.max_metadata_value_bytes,
            config.max_metadata_bytes) == (64, 256, 4096, 16384)
    element = config.elements[0]
    assert (element.breaker_window_ms, element.breaker_failure_percent, element.breaker_min_events) == (10000, 10, 20)
    assert MAX_MESSAGE_BYTES == 64 * 1024 * 1024


def test_every_whole_number_setting_has_a_limit() -> None:
    """A new int field without a row in LIMITS would accept 2**70; this keeps the tables complete."""
    assert {f.name for f in fields(ProxyConfig) if f.type == "int"} - {"upstream_mark"} == set(LIMITS)
    assert {f.name for f in fields(ElementConfig) if f.type == "int"} == set(ELEMENT_LIMITS)


# high_water must be at least chunk_size, at either's bounds.
ROOM = {"chunk_size": 1, "high_water": 1 << 30}


@pytest.mark.parametrize(("key", "limit"), LIMITS.items())
def test_each_setting_takes_its_bounds_and_nothing_beyond(key: str, limit: Limit) -> None:
    for value in (limit.low, limit.high):
        assert getattr(build({}, {}, {**ROOM, key: value}), key) == value
    for value in (limit.low - 1, limit.high + 1):
        with pytest.raises(ConfigError, match=rf"^{key}: {value} must be a whole number from {limit.low}\b.* "
                                              rf"to {limit.high}$"):
            build({}, {}, {**ROOM, key: value})


@pytest.mark.parametrize(("key", "limit"), ELEMENT_LIMITS.items())
def test_each_element_setting_takes_its_bounds_and_nothing_beyond(key: str, limit: Limit) -> None:
    for value in (limit.low, limit.high):
        assert getattr(build({"element": [{"address": ELEMENT, key: value}]}, {}, {}).elements[0], key) == value
    for value in (limit.low - 1, limit.high + 1):
        with pytest.raises(ConfigError, match=rf"^element\[0\]\.{key}: {value} must be a whole number"):
            build({"element": [{"address": ELEMENT, key: value}]}, {}, {})


def test_largest_event_must_fit_in_one_grpc_message() -> None:
    at_most = {"max_replacement_bytes": 32 << 20, "max_metadata_bytes": 4 << 20}
    seven = build({}, {}, {**at_most, "element": [ELEMENT] * 7})
    assert largest_event_bytes(seven) == (32 << 20) + 7 * (4 << 20) + (64 << 10) <= MAX_MESSAGE_BYTES
    with pytest.raises(ConfigError, match=r"^chunk_size, max_replacement_bytes, max_metadata_bytes, elements: .* "
                                          r"\+ 8 elements x max_metadata_bytes 4194304 \+ 65536 = 67174400 bytes, "
                                          r"over the 67108864-byte gRPC message limit"):
        build({}, {}, {**at_most, "element": [ELEMENT] * 8})
    # With the defaults it takes thousands of elements.
    assert build({}, {}, {"element": [ELEMENT] * 3000}).elements
    with pytest.raises(ConfigError, match="3100 elements x max_metadata_bytes 16384"):
        build({}, {}, {"element": [ELEMENT] * 3100})


def test_describe_lists_every_setting_and_every_element_field() -> None:
    config = build({"element": [{"address": ELEMENT, "breaker_window_ms": 500}]}, {}, {})
    described = describe(config)
    assert set(described) == {f.name for f in fields(ProxyConfig)}
    assert described["max_metadata_bytes"] == 16384
    # every field but `tls`, the contents of the TLS files (a private key among them): never shown
    assert described["elements"] == [{f.name: getattr(config.elements[0], f.name) for f in fields(ElementConfig)
                                      if f.name != "tls"}]
    assert described["elements"][0]["breaker_window_ms"] == 500


def test_readme_states_every_range() -> None:
    """The Configuration table says `low..high` in the row of every whole-number key."""
    # cells: flag, TOML key, env, default, allowed, meaning
    rows = [[cell.strip() for cell in line.replace("\\|", "/").strip("|").split("|")]
            for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| ")]
    for key, limit in {**LIMITS, **ELEMENT_LIMITS}.items():
        row = next((r for r in rows if len(r) == 6 and r[1].startswith(f"`{key}`")), [])
        assert row and f"`{limit.low}..{limit.high}`" in row[4], (key, row)


def test_a_byte_order_mark_is_not_an_error(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_bytes(b'\xef\xbb\xbfwindow = 4\n')
    assert load(["--config", str(path)], {}).window == 4


def test_tls_keys_are_checked_and_their_files_read(tmp_path: Path) -> None:
    from tests.certs import Authority

    ca = Authority(tmp_path)
    proxy = ca.issue("proxy", ["proxy"], client=True)
    table = {"address": "firewall:50051", "tls_ca": str(ca.path)}
    server_only = build({"element": [table]}, {}, {}).elements[0]
    assert server_only.tls is not None and server_only.tls.ca == ca.path.read_bytes() and server_only.tls.key is None
    assert server_only.server_name == "firewall"
    mutual = build({"element": [{**table, "tls_cert": str(proxy.cert), "tls_key": str(proxy.key),
                                 "tls_server_name": "firewall.example"}]}, {}, {}).elements[0]
    assert mutual.tls is not None and mutual.tls.client is not None and mutual.tls.client.subject == "CN=proxy"
    assert mutual.server_name == "firewall.example"
    assert "PRIVATE" not in repr(mutual) and "BEGIN" not in str(describe(build({"element": [
        {**table, "tls_cert": str(proxy.cert), "tls_key": str(proxy.key)}]}, {}, {})))
    for bad, message in [
        ({"tls_cert": str(proxy.cert), "tls_key": str(proxy.key), "tls_ca": ""}, r"element\[0\]\.tls_ca: missing"),
        ({"tls_cert": str(proxy.cert)}, r"element\[0\]\.tls_cert, element\[0\]\.tls_key: give both"),
        ({"tls_ca": str(tmp_path / "none.pem")}, r"element\[0\]\.tls_ca: cannot read .*none\.pem"),
        ({"tls_ca": str(proxy.key)}, r"element\[0\]\.tls_ca: .* holds no PEM certificate"),
        ({"tls_cert": str(proxy.cert), "tls_key": str(proxy.cert)}, r"element\[0\]\.tls_key: .* no unencrypted PEM"),
        ({"tls": "yes"}, r"element\[0\]\.tls: unknown key"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build({"element": [{**table, **bad}]}, {}, {})


def test_element_tls_and_resolve_flags_set_every_flag_element(tmp_path: Path) -> None:
    from tests.certs import Authority

    ca = Authority(tmp_path)
    config = load(["--element", "a:1", "--element", "b:2", "--element-tls-ca", str(ca.path),
                   "--element-resolve-interval-ms", "0"], {})
    assert [e.tls_ca for e in config.elements] == [str(ca.path)] * 2
    assert [e.resolve_interval_ms for e in config.elements] == [0, 0]
    assert ElementConfig("a:1").resolve_interval_ms == 5000


def test_element_mode_defaults_to_inline_and_is_set_per_table_or_by_flag(tmp_path: Path) -> None:
    assert load(["--element", ELEMENT], {}).elements[0].mode == "inline"
    assert [e.mode for e in load(["--element", ELEMENT, "--element", "b:2", "--element-mode", "shadow"],
                                 {}).elements] == ["shadow", "shadow"]
    path = tmp_path / "proxy.toml"
    path.write_text(f'[[element]]\naddress = "{ELEMENT}"\nmode = "detect"\n[[element]]\naddress = "b:2"\n')
    assert [e.mode for e in load(["--config", str(path)], {}).elements] == ["detect", "inline"]
    path.write_text(f'[[element]]\naddress = "{ELEMENT}"\nmode = "observe"\n')
    with pytest.raises(ConfigError, match=r"element\[0\]\.mode.*observe.*inline.*detect.*shadow"):
        load(["--config", str(path)], {})
