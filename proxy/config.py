"""The proxy's settings: parsed once, validated, frozen.

Sources, lowest to highest precedence: defaults, the TOML file (`--config`), the
environment (the seed's variables plus ELEMENTS), command-line flags. Every mistake
raises ConfigError naming the key, the value and what is allowed, so the proxy can
exit non-zero with one clear line instead of failing later on a connection.
"""

from __future__ import annotations

import datetime
import ipaddress
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from elements.logs import LOG_FORMATS, LOG_LEVELS

DEFAULT_LISTEN = ("0.0.0.0:15002", "0.0.0.0:15006")
EVENT_LOOPS = ("uvloop", "asyncio")
FAILURE_POLICIES = ("open", "closed")

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DAY_MS = 86_400_000
# gRPC's message size limit, which the proxy sets on its channels: every Session message
# it sends must fit, or the element's stream fails with RESOURCE_EXHAUSTED.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# What an event carries beside its bytes and metadata: ids, kinds, addresses, framing.
EVENT_OVERHEAD_BYTES = 64 * KiB


class ConfigError(ValueError):
    """A setting is wrong; the message names it and says what is allowed."""


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """What the proxy knows of its own client certificate, to say why an element may refuse it:
    over TLS 1.3 the element's refusal reaches the proxy as a closed socket, nothing more."""

    subject: str
    issuer: str
    not_before: datetime.datetime
    not_after: datetime.datetime


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The element channel's TLS material, read when the configuration is loaded (so a SIGHUP
    with rotated files makes a new chain, and a missing file is refused at once). Never shown:
    describe() lists the paths, not this."""

    ca: bytes
    cert: bytes | None = None
    key: bytes | None = field(default=None, repr=False)
    client: ClientCertificate | None = None


@dataclass(frozen=True, slots=True)
class ElementConfig:
    """One element of the chain and how the proxy treats its failures."""

    address: str
    name: str = ""
    failure: str = "closed"
    # inline: as the element describes itself; detect: never waited for, a CLOSE or RESET verdict
    # is applied when it arrives; shadow: never waited for, verdicts only counted (ELEMENT_MODES)
    mode: str = "inline"
    timeout_ms: int = 1000
    breaker_failures: int = 5
    breaker_cooldown_ms: int = 5000
    breaker_window_ms: int = 10000
    breaker_failure_percent: int = 10
    breaker_min_events: int = 20
    resolve_interval_ms: int = 5000
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_server_name: str = ""
    tls: TlsFiles | None = None  # read from the tls_* files; None: plaintext
    max_held_bytes: int = MiB

    @property
    def fail_open(self) -> bool:
        return self.failure == "open"

    @property
    def unix(self) -> bool:
        """Its address is a unix domain socket (`unix:/path`): one replica, no resolution."""
        return self.address.startswith(UNIX_PREFIX)

    @property
    def server_name(self) -> str:
        """The name the element's certificate must carry: tls_server_name, else the address's host
        (localhost for a unix socket)."""
        if self.tls_server_name or self.unix:
            return self.tls_server_name or "localhost"
        return parse_host_port("address", self.address).host


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    listen: tuple[HostPort, ...] = (HostPort("0.0.0.0", 15002), HostPort("0.0.0.0", 15006))
    target: HostPort | None = None
    elements: tuple[ElementConfig, ...] = ()
    chunk_size: int = 65536
    window: int = 8
    high_water: int = 1 << 20
    upstream_mark: int = 0
    connect_timeout_ms: int = 5000
    drain_timeout_ms: int = 5000
    max_connections: int = 0
    idle_timeout_ms: int = 3_600_000
    max_duration_ms: int = 0
    max_replacement_bytes: int = 16 << 20
    max_metadata_entries: int = 64
    max_metadata_key_bytes: int = 256
    max_metadata_value_bytes: int = 4096
    max_metadata_bytes: int = 16384
    event_loop: str = "uvloop"
    workers: int = 1
    admin: HostPort | None = HostPort("127.0.0.1", 15000)
    log_level: str = "debug"
    log_format: str = "console"


UNIX_PREFIX = "unix:"
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes, the last one a NUL


def check_element_address(key: str, text: str) -> None:
    """An element is at `HOST:PORT` or at `unix:/absolute/path` (a unix domain socket: an element
    beside the proxy, on the same host or in the same pod, skips TCP loopback)."""
    if not text.strip().startswith(UNIX_PREFIX):
        parse_host_port(key, text)
        return
    path = text.strip()[len(UNIX_PREFIX):]
    if not path.startswith("/") or len(path.encode()) > UNIX_PATH_MAX:
        raise ConfigError(f"{key}: {_shown(text)} is not unix:/ABSOLUTE/PATH (at most {UNIX_PATH_MAX} bytes, "
                          "e.g. unix:/run/element/firewall.sock)")


def parse_host_port(key: str, text: str, *, require_ip: bool = False) -> HostPort:
    """Parses `host:port` or `[v6]:port`; the message names `key` when it is wrong."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
    if not sep or not host or ":" in host and not text.startswith("["):
        raise ConfigError(f"{key}: {text!r} is not HOST:PORT (IPv6 as [ADDR]:PORT, e.g. [::]:15002)")
    port = _port(key, port_text)
    address = HostPort(host, port)
    if require_ip and not address.is_ip:
        raise ConfigError(f"{key}: {host!r} in {text!r} is not an IP address")
    return address


def _port(key: str, text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise ConfigError(f"{key}: port {_shown(text)} must be a number from 1 to 65535")
    return int(text)


@dataclass(frozen=True, slots=True)
class Limit:
    """What a whole-number setting may be. Every one has a maximum: a value no machine can
    honour (a 2**70-byte buffer, a ten-year timeout) is a typo, better refused at start."""

    low: int
    high: int
    zero: str = ""  # what 0 means, where 0 is allowed

    def check(self, key: str, value: Any) -> int:
        if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value) < 30:
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not self.low <= value <= self.high:
            low = f"{self.low} ({self.zero})" if self.zero else str(self.low)
            raise ConfigError(f"{key}: {_shown(value)} must be a whole number from {low} to {self.high}")
        return value


# The whole-number settings of ProxyConfig (all but upstream_mark, a bit pattern) and of
# ElementConfig; README's Configuration table states the same ranges.
LIMITS = {
    "chunk_size": Limit(1, 16 * MiB),
    "window": Limit(1, 1024),
    "high_water": Limit(1, GiB),
    "connect_timeout_ms": Limit(1, DAY_MS),
    "drain_timeout_ms": Limit(0, DAY_MS, "reset at once"),
    "max_connections": Limit(0, 10_000_000, "no limit"),
    "idle_timeout_ms": Limit(0, DAY_MS, "never"),
    "max_duration_ms": Limit(0, DAY_MS, "no limit"),
    "max_replacement_bytes": Limit(1, 32 * MiB),
    "max_metadata_entries": Limit(0, 4096, "no metadata"),
    "max_metadata_key_bytes": Limit(1, 64 * KiB),
    "max_metadata_value_bytes": Limit(1, MiB),
    "max_metadata_bytes": Limit(1, 4 * MiB),
    "workers": Limit(1, 256),
}
ELEMENT_LIMITS = {
    "timeout_ms": Limit(1, DAY_MS),
    "breaker_failures": Limit(0, 1_000_000, "off"),
    "breaker_cooldown_ms": Limit(1, DAY_MS),
    "breaker_window_ms": Limit(1, 3_600_000),
    "breaker_failure_percent": Limit(0, 100, "off"),
    "breaker_min_events": Limit(1, 1_000_000),
    "resolve_interval_ms": Limit(0, DAY_MS, "at start and when a session is lost only"),
    # Per connection and direction: what an element may keep at the proxy with HOLD verdicts.
    "max_held_bytes": Limit(0, GiB, "HOLD refused"),
}
ELEMENT_MODES = ("inline", "detect", "shadow")
TLS_KEYS = ("tls_ca", "tls_cert", "tls_key", "tls_server_name")


def _elements(key: str, entries: Sequence[str], given: object,
              defaults: Mapping[str, Any]) -> tuple[ElementConfig, ...]:
    """Elements from `--element` or ELEMENTS; an empty entry is a mistake (`a:1,,b:2`), not a shorter chain."""
    for position, entry in enumerate(entries, 1):
        if not entry.strip():
            raise ConfigError(f"{key}: empty entry at position {position} in {_shown(given)}; "
                              "every entry is an element's HOST:PORT")
    return tuple(_element(key, entry, defaults) for entry in entries)


def _element(key: str, address: str, defaults: Mapping[str, Any]) -> ElementConfig:
    check_element_address(key, address)
    return _checked_element(key, {"address": address.strip(), **defaults})


def _checked_element(key: str, table: Mapping[str, Any]) -> ElementConfig:
    allowed = {f.name for f in fields(ElementConfig)} - {"tls"}  # tls: read from the tls_* files
    for name in table:
        if name not in allowed:
            raise ConfigError(f"{key}.{name}: unknown key; allowed: {', '.join(sorted(allowed))}")
    if "address" not in table:
        raise ConfigError(f"{key}.address: missing; every element needs address = \"HOST:PORT\"")
    address = _typed(f"{key}.address", table["address"], str)
    check_element_address(f"{key}.address", address)
    defaults = ElementConfig(address)
    tls = {name: _typed(f"{key}.{name}", table.get(name, ""), str) for name in TLS_KEYS}
    numbers: dict[str, Any] = {name: limit.check(f"{key}.{name}", table.get(name, getattr(defaults, name)))
                               for name, limit in ELEMENT_LIMITS.items()}
    return ElementConfig(
        address=address, name=_typed(f"{key}.name", table.get("name", ""), str),
        failure=_choice(f"{key}.failure", table.get("failure", defaults.failure), FAILURE_POLICIES),
        mode=_choice(f"{key}.mode", table.get("mode", defaults.mode), ELEMENT_MODES),
        **numbers, **tls, tls=_tls_files(key, tls))


def _tls_files(key: str, paths: Mapping[str, str]) -> TlsFiles | None:
    """Reads and checks the element's TLS files: TLS is on when tls_ca is given; a client
    certificate (mTLS) needs tls_cert and tls_key together."""
    if not any(paths.values()):
        return None
    if not paths["tls_ca"]:
        given = ", ".join(name for name, value in paths.items() if value)
        raise ConfigError(f"{key}.tls_ca: missing; {given} need TLS, which tls_ca turns on: the PEM file of the "
                          "CA that signed the element's certificate")
    if bool(paths["tls_cert"]) != bool(paths["tls_key"]):
        raise ConfigError(f"{key}.tls_cert, {key}.tls_key: give both (the proxy's client certificate and its "
                          "private key, PEM) or neither")
    ca = _pem(f"{key}.tls_ca", paths["tls_ca"])
    try:
        x509.load_pem_x509_certificates(ca)
    except ValueError as error:
        raise ConfigError(f"{key}.tls_ca: {paths['tls_ca']} holds no PEM certificate ({error})") from None
    if not paths["tls_cert"]:
        return TlsFiles(ca)
    cert, key_pem = _pem(f"{key}.tls_cert", paths["tls_cert"]), _pem(f"{key}.tls_key", paths["tls_key"])
    return TlsFiles(ca, cert, key_pem, _client_certificate(key, paths, cert, key_pem))


def _client_certificate(key: str, paths: Mapping[str, str], cert_pem: bytes, key_pem: bytes) -> ClientCertificate:
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as error:
        raise ConfigError(f"{key}.tls_cert: {paths['tls_cert']} holds no PEM certificate ({error})") from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{key}.tls_key: {paths['tls_key']} holds no unencrypted PEM private key "
                          f"({error})") from None
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*raw) != cert.public_key().public_bytes(*raw):
        raise ConfigError(f"{key}.tls_key: {paths['tls_key']} is not the key of the certificate in "
                          f"{paths['tls_cert']} (tls_cert)")
    return ClientCertificate(cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(),
                             cert.not_valid_before_utc, cert.not_valid_after_utc)


def _pem(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"{key}: cannot read {path}: {error.strerror or error}") from error


def _shown(value: Any) -> str:
    """repr() for a message, cut short: a pasted blob must not become a 10 kB log line."""
    if isinstance(value, int) and value.bit_length() > 1000:
        return f"a {value.bit_length()}-bit number"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _typed(key: str, value: Any, kind: type) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{key}: {_shown(value)} must be a {kind.__name__}")
    return value


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in allowed:
        raise ConfigError(f"{key}: {_shown(value)} is not one of {', '.join(allowed)}")
    return value.lower()


_FILE_KEYS = {f.name for f in fields(ProxyConfig)} - {"elements"} | {"element"}


def read_file(path: Path) -> dict[str, Any]:
    """Reads the TOML file, rejecting unknown keys (a typo must not be silently ignored).

    Every way the file can be wrong is a ConfigError, so a SIGHUP reload refuses it with one line."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"--config: cannot read {path}: {error.strerror or error}") from error
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigError(f"--config: {path} is not UTF-8 text "
                          f"(byte 0x{data[error.start]:02x} at offset {error.start}, line {line})") from None
    try:
        table = tomllib.loads(text)
    except ValueError as error:  # TOMLDecodeError, or int() refusing a number of over 4300 digits
        raise ConfigError(f"--config: {path} is not valid TOML: {error}") from error
    for key in table:
        if key not in _FILE_KEYS:
            raise ConfigError(f"{key}: unknown key in {path}; allowed: {', '.join(sorted(_FILE_KEYS))}")
    return table


def build(file: Mapping[str, Any], env: Mapping[str, str], flags: Mapping[str, Any]) -> ProxyConfig:
    """Merges defaults < file < environment < flags into a checked ProxyConfig.

    `flags` holds only what was given on the command line (None values are absent).
    """
    merged = _merged(file, env, flags)
    defaults = ProxyConfig()
    config = ProxyConfig(
        listen=_listen(merged.get("listen", list(DEFAULT_LISTEN))),
        elements=_chain(file, env, flags),
        target=_target(merged.get("target")),
        upstream_mark=_mark(merged.get("upstream_mark", 0)),
        event_loop=_choice("event_loop", merged.get("event_loop", defaults.event_loop), EVENT_LOOPS),
        admin=_admin(merged.get("admin", str(defaults.admin))),
        log_level=_choice("log_level (LOG_LEVEL)", merged.get("log_level", defaults.log_level), LOG_LEVELS),
        log_format=_choice("log_format (LOG_FORMAT)", merged.get("log_format", defaults.log_format), LOG_FORMATS),
        **{key: limit.check(key, merged.get(key, getattr(defaults, key))) for key, limit in LIMITS.items()},
    )
    _check_high_water(config)
    _check_addresses(config)
    check_message_size(config)
    return config


# The seed's environment variables and the settings they stand for.
_ENV_KEYS = {"TARGET_ADDR": "target", "LOG_LEVEL": "log_level", "LOG_FORMAT": "log_format"}
# --element-failure, --element-timeout-ms, --element-tls-*, and the option each sets on every
# --element or ELEMENTS element (a file's [[element]] table sets its own).
_ELEMENT_FLAGS = {"element_failure": "failure", "element_mode": "mode", "element_timeout_ms": "timeout_ms",
                  "element_resolve_interval_ms": "resolve_interval_ms",
                  **{f"element_{name}": name for name in TLS_KEYS}}


def _merged(file: Mapping[str, Any], env: Mapping[str, str], flags: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting but the elements, each from the source of highest precedence that gives it."""
    merged: dict[str, Any] = dict(file)
    merged.update({key: env[variable] for variable, key in _ENV_KEYS.items() if env.get(variable)})
    merged.update({k: v for k, v in flags.items() if v is not None and k != "element"})
    return merged


def _listen(values: Any) -> tuple[HostPort, ...]:
    if isinstance(values, str) or not isinstance(values, list) or not values:
        raise ConfigError(f"listen: {_shown(values)} must be a non-empty list of \"HOST:PORT\"")
    return tuple(parse_host_port("listen", _typed("listen", a, str), require_ip=True) for a in values)


def _chain(file: Mapping[str, Any], env: Mapping[str, str], flags: Mapping[str, Any]) -> tuple[ElementConfig, ...]:
    """The chain comes whole from one source, the highest given: a flag's elements replace
    ELEMENTS, which replaces the file's, so no chain is pieced together from two lists."""
    defaults = {key: flags[flag] for flag, key in _ELEMENT_FLAGS.items() if flags.get(flag) is not None}
    if flags.get("element"):
        return _elements("--element", flags["element"], flags["element"], defaults)
    if env.get("ELEMENTS", "").strip():
        return _elements("ELEMENTS", env["ELEMENTS"].split(","), env["ELEMENTS"], defaults)
    return _element_tables(file.get("element", []))


def _element_tables(tables: Any) -> tuple[ElementConfig, ...]:
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("element: must be an array of tables ([[element]] with address = \"HOST:PORT\")")
    return tuple(_checked_element(f"element[{i}]", t) for i, t in enumerate(tables))


def _check_high_water(config: ProxyConfig) -> None:
    if config.high_water < config.chunk_size:
        raise ConfigError(f"high_water: {config.high_water} must be at least chunk_size ({config.chunk_size})")


def _target(value: Any) -> HostPort | None:
    if value is None or value == "":
        return None
    return parse_host_port("target (TARGET_ADDR)", _typed("target", value, str))


def _check_addresses(config: ProxyConfig) -> None:
    """Two listeners on one address cannot both bind; nor can a specific address beside its
    family's wildcard on the same port (without SO_REUSEPORT; with it, as under --workers,
    the specific one would quietly take that address's connections from the wildcard)."""
    for position, address in enumerate(config.listen):
        for earlier in config.listen[:position]:
            if clash := _clash(earlier, address):
                raise ConfigError(f"listen: {address} {clash}; list each address once")
    for address in config.listen:
        if config.admin and (clash := _clash(address, config.admin)):
            raise ConfigError(f"admin: {config.admin} collides with the listen address {address}; "
                              "give the admin endpoint a port of its own")


def _clash(earlier: HostPort, later: HostPort) -> str:
    """Why `later` cannot bind beside `earlier` (both IP addresses), or "" when it can."""
    first, second = ipaddress.ip_address(earlier.host), ipaddress.ip_address(later.host)
    if earlier.port != later.port or first.version != second.version:
        return ""
    if first == second:
        return f"is the same address as {earlier}" if str(earlier) != str(later) else "is given twice"
    if first.is_unspecified or second.is_unspecified:
        wildcard = earlier if first.is_unspecified else later
        return (f"overlaps {earlier}: {wildcard} accepts on every IPv{first.version} address "
                f"of port {later.port}")
    return ""


def largest_event_bytes(config: ProxyConfig) -> int:
    """The largest Session message the proxy can send: the biggest chunk (a replacement
    forwarded to the next element can be bigger than a read), each earlier element's
    metadata, and the event's own fields."""
    return (max(config.chunk_size, config.max_replacement_bytes)
            + len(config.elements) * config.max_metadata_bytes + EVENT_OVERHEAD_BYTES)


def check_message_size(config: ProxyConfig) -> None:
    """Refuses a configuration whose largest event would not fit in one gRPC message."""
    largest = largest_event_bytes(config)
    if largest > MAX_MESSAGE_BYTES:
        raise ConfigError(
            f"chunk_size, max_replacement_bytes, max_metadata_bytes, elements: the largest event would be "
            f"max(chunk_size {config.chunk_size}, max_replacement_bytes {config.max_replacement_bytes}) "
            f"+ {len(config.elements)} elements x max_metadata_bytes {config.max_metadata_bytes} "
            f"+ {EVENT_OVERHEAD_BYTES} = {largest} bytes, over the {MAX_MESSAGE_BYTES}-byte gRPC message limit; "
            "lower max_replacement_bytes or max_metadata_bytes, or use fewer elements")


def _admin(value: Any) -> HostPort | None:
    if _typed("admin", value, str).strip().lower() == "off":
        return None
    return parse_host_port("admin", value, require_ip=True)


def _mark(value: Any) -> int:
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise ConfigError(f"upstream_mark: {_shown(value)} must be a number (e.g. 1337 or 0x539)") from None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 32:
        raise ConfigError(f"upstream_mark: {_shown(value)} must be a number from 0 (off) to 4294967295")
    return value


def describe(config: ProxyConfig) -> dict[str, Any]:
    """The effective configuration as plain data (for the startup log and the admin endpoint)."""
    return {
        "listen": [str(a) for a in config.listen],
        "target": str(config.target) if config.target else None,
        "admin": str(config.admin) if config.admin else "off",
        "elements": [{f.name: getattr(e, f.name) for f in fields(ElementConfig) if f.name != "tls"}
                     for e in config.elements],
        **{f.name: getattr(config, f.name) for f in fields(ProxyConfig)
           if f.name not in ("listen", "target", "elements", "admin")},
    }
