"""The proxy's settings: parsed once, validated, frozen.

Sources, lowest to highest precedence: defaults, the TOML file (`--config`), the
environment (the seed's variables plus ELEMENTS), command-line flags. Every mistake
raises ConfigError naming the key, the value and what is allowed, so the proxy can
exit non-zero with one clear line instead of failing later on a connection.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from elements.logs import LOG_FORMATS, LOG_LEVELS

DEFAULT_LISTEN = ("0.0.0.0:15002", "0.0.0.0:15006")
EVENT_LOOPS = ("uvloop", "asyncio")
FAILURE_POLICIES = ("open", "closed")


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
class ElementConfig:
    """One element of the chain and how the proxy treats its failures."""

    address: str
    name: str = ""
    failure: str = "closed"
    timeout_ms: int = 1000
    breaker_failures: int = 5
    breaker_cooldown_ms: int = 5000

    @property
    def fail_open(self) -> bool:
        return self.failure == "open"


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
    event_loop: str = "uvloop"
    workers: int = 1
    admin: HostPort | None = HostPort("127.0.0.1", 15000)
    log_level: str = "debug"
    log_format: str = "console"


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
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"{key}: port {text!r} must be a number from 1 to 65535")
    return int(text)


def _element(key: str, address: str, defaults: Mapping[str, Any]) -> ElementConfig:
    parse_host_port(key, address)
    return _checked_element(key, {"address": address.strip(), **defaults})


def _checked_element(key: str, table: Mapping[str, Any]) -> ElementConfig:
    allowed = {f.name for f in fields(ElementConfig)}
    for name in table:
        if name not in allowed:
            raise ConfigError(f"{key}.{name}: unknown key; allowed: {', '.join(sorted(allowed))}")
    if "address" not in table:
        raise ConfigError(f"{key}.address: missing; every element needs address = \"HOST:PORT\"")
    address = _typed(f"{key}.address", table["address"], str)
    parse_host_port(f"{key}.address", address)
    defaults = ElementConfig(address)
    return ElementConfig(
        address=address, name=_typed(f"{key}.name", table.get("name", ""), str),
        failure=_choice(f"{key}.failure", table.get("failure", defaults.failure), FAILURE_POLICIES),
        timeout_ms=_whole(f"{key}.timeout_ms", table.get("timeout_ms", defaults.timeout_ms), 1),
        breaker_failures=_whole(f"{key}.breaker_failures", table.get("breaker_failures", defaults.breaker_failures), 0),
        breaker_cooldown_ms=_whole(f"{key}.breaker_cooldown_ms",
                                   table.get("breaker_cooldown_ms", defaults.breaker_cooldown_ms), 1))


def _typed(key: str, value: Any, kind: type) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{key}: {value!r} must be a {kind.__name__}")
    return value


def _whole(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        allowed = "above 0" if minimum == 1 else "from 0 (off) up"
        raise ConfigError(f"{key}: {value!r} must be a whole number {allowed}")
    return value


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    return value.lower()


# Whole-number settings and their smallest allowed value (0 means "off" where it is allowed).
_WHOLE_NUMBERS = {"chunk_size": 1, "window": 1, "high_water": 1, "connect_timeout_ms": 1, "drain_timeout_ms": 0,
                  "max_connections": 0, "idle_timeout_ms": 0, "max_duration_ms": 0, "max_replacement_bytes": 1,
                  "workers": 1}
_FILE_KEYS = {f.name for f in fields(ProxyConfig)} - {"elements"} | {"element"}


def read_file(path: Path) -> dict[str, Any]:
    """Reads the TOML file, rejecting unknown keys (a typo must not be silently ignored)."""
    try:
        table = tomllib.loads(path.read_text())
    except OSError as error:
        raise ConfigError(f"--config: cannot read {path}: {error.strerror}") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"--config: {path} is not valid TOML: {error}") from error
    for key in table:
        if key not in _FILE_KEYS:
            raise ConfigError(f"{key}: unknown key in {path}; allowed: {', '.join(sorted(_FILE_KEYS))}")
    return table


def build(file: Mapping[str, Any], env: Mapping[str, str], flags: Mapping[str, Any]) -> ProxyConfig:
    """Merges defaults < file < environment < flags into a checked ProxyConfig.

    `flags` holds only what was given on the command line (None values are absent).
    """
    merged: dict[str, Any] = dict(file)
    env_keys = {"TARGET_ADDR": "target", "LOG_LEVEL": "log_level", "LOG_FORMAT": "log_format"}
    for variable, key in env_keys.items():
        if env.get(variable):
            merged[key] = env[variable]
    merged.update({k: v for k, v in flags.items() if v is not None and k != "element"})

    listen_values = merged.get("listen", list(DEFAULT_LISTEN))
    if isinstance(listen_values, str) or not isinstance(listen_values, list) or not listen_values:
        raise ConfigError(f"listen: {listen_values!r} must be a non-empty list of \"HOST:PORT\"")
    listen = tuple(parse_host_port("listen", _typed("listen", a, str), require_ip=True) for a in listen_values)

    target = merged.get("target")
    element_defaults = {k: v for k, v in (("failure", flags.get("element_failure")),
                                          ("timeout_ms", flags.get("element_timeout_ms"))) if v is not None}
    if flags.get("element"):
        elements = tuple(_element("--element", a, element_defaults) for a in flags["element"])
    elif env.get("ELEMENTS", "").strip():
        elements = tuple(_element("ELEMENTS", a, element_defaults) for a in env["ELEMENTS"].split(",") if a.strip())
    else:
        tables = file.get("element", [])
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise ConfigError("element: must be an array of tables ([[element]] with address = \"HOST:PORT\")")
        elements = tuple(_checked_element(f"element[{i}]", t) for i, t in enumerate(tables))

    defaults = ProxyConfig()
    config = ProxyConfig(
        listen=listen,
        target=parse_host_port("target (TARGET_ADDR)", _typed("target", target, str)) if target else None,
        elements=elements,
        upstream_mark=_mark(merged.get("upstream_mark", 0)),
        event_loop=_choice("event_loop", merged.get("event_loop", defaults.event_loop), EVENT_LOOPS),
        admin=_admin(merged.get("admin", str(defaults.admin))),
        log_level=_choice("log_level (LOG_LEVEL)", merged.get("log_level", defaults.log_level), LOG_LEVELS),
        log_format=_choice("log_format (LOG_FORMAT)", merged.get("log_format", defaults.log_format), LOG_FORMATS),
        **{key: _whole(key, merged.get(key, getattr(defaults, key)), minimum)
           for key, minimum in _WHOLE_NUMBERS.items()},
    )
    if config.high_water < config.chunk_size:
        raise ConfigError(f"high_water: {config.high_water} must be at least chunk_size ({config.chunk_size})")
    return config


def _admin(value: Any) -> HostPort | None:
    if _typed("admin", value, str).strip().lower() == "off":
        return None
    return parse_host_port("admin", value, require_ip=True)


def _mark(value: Any) -> int:
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise ConfigError(f"upstream_mark: {value!r} must be a number (e.g. 1337 or 0x539)") from None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 32:
        raise ConfigError(f"upstream_mark: {value!r} must be a number from 0 (off) to 4294967295")
    return value


def describe(config: ProxyConfig) -> dict[str, Any]:
    """The effective configuration as plain data (for the startup log and the admin endpoint)."""
    return {
        "listen": [str(a) for a in config.listen],
        "target": str(config.target) if config.target else None,
        "admin": str(config.admin) if config.admin else "off",
        "elements": [{"address": e.address, "name": e.name, "failure": e.failure, "timeout_ms": e.timeout_ms}
                     for e in config.elements],
        **{f.name: getattr(config, f.name) for f in fields(ProxyConfig)
           if f.name not in ("listen", "target", "elements", "admin")},
    }
