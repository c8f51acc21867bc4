"""The nat rules that hand a host's TCP to the proxy, as pure data.

Everything here maps a frozen `Capture` config (or the text of `iptables -t nat -S`)
to argv lists, so every option is unit-tested without root; `proxy/interception/iptables.py` only
runs the lists. The rules live in chains of our own, reached by one jump rule from
`nat OUTPUT` and one from `nat PREROUTING`, so removing them restores the ruleset
exactly (the layout of Istio's istio-iptables).

Each argument is written in the order `iptables -S` prints it back, so the commands
`--dry-run` shows read the same as the rules that appear.
"""

from __future__ import annotations

import enum
import ipaddress
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

OUTPUT_CHAIN = "EP_OUTPUT"
PREROUTING_CHAIN = "EP_PREROUTING"
REDIRECT_CHAIN = "EP_REDIRECT"
INBOUND_REDIRECT_CHAIN = "EP_INBOUND_REDIRECT"
CHAINS = (OUTPUT_CHAIN, PREROUTING_CHAIN, REDIRECT_CHAIN, INBOUND_REDIRECT_CHAIN)

MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel, so it is never an owner
MAX_MARK = 2**32 - 1

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """An option value the rules cannot be built from; the message names the option."""


class Family(enum.Enum):
    """An address family and the binary that programs it."""

    V4 = "iptables"
    V6 = "ip6tables"

    @property
    def binary(self) -> str:
        return self.value

    @property
    def version(self) -> int:
        return 4 if self is Family.V4 else 6


class PortRange(NamedTuple):
    first: int
    last: int

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}:{self.last}"


class Mark(NamedTuple):
    value: int
    mask: int = MAX_MARK

    def __str__(self) -> str:
        return hex(self.value) if self.mask == MAX_MARK else f"{hex(self.value)}/{hex(self.mask)}"


def split_items(text: str) -> list[str]:
    """Splits a comma-separated option value; an empty item is always a typo."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise ValueError(f"{text!r} has an empty item; separate values with single commas")
    return items


def parse_port(text: str) -> int:
    """A TCP port, 1-65535."""
    if not text.strip().isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{text!r} is not a TCP port; give a number from 1 to 65535")
    return int(text)


def parse_port_ranges(text: str) -> tuple[PortRange, ...]:
    """Comma-separated ports or ranges (`22,8000:8100`; `8000-8100` is accepted too)."""
    ranges = []
    for item in split_items(text):
        first, _, last = item.replace("-", ":").partition(":")
        try:
            port_range = PortRange(parse_port(first), parse_port(last or first))
        except ValueError:
            raise ValueError(
                f"{item!r} is not a port or a port range; give ports from 1 to 65535 such as 22 or 8000:8100"
            ) from None
        if port_range.first > port_range.last:
            raise ValueError(f"{item!r} is an empty range; write the lower port first")
        ranges.append(port_range)
    return tuple(ranges)


def parse_port_selection(text: str) -> tuple[PortRange, ...] | None:
    """`*` (every port, returned as None) or a list of ports and ranges."""
    return None if text.strip() == "*" else parse_port_ranges(text)


def parse_networks(text: str) -> tuple[Network, ...]:
    """Comma-separated IPv4/IPv6 addresses or CIDRs; host bits set are refused, not masked."""
    networks = []
    for item in split_items(text):
        try:
            networks.append(ipaddress.ip_network(item, strict=True))
        except ValueError:
            try:
                loose = ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f"{item!r} is not an IPv4 or IPv6 address or CIDR; give e.g. 10.0.0.0/8, 10.1.2.3 or fd00::/8"
                ) from None
            raise ValueError(f"{item!r} has host bits set; did you mean {loose}?") from None
    return tuple(networks)


def parse_marks(text: str) -> tuple[Mark, ...]:
    """Comma-separated packet marks, `VALUE` or `VALUE/MASK`, decimal or 0x-hex."""
    marks = []
    for item in split_items(text):
        value_text, _, mask_text = item.partition("/")
        try:
            mark = Mark(int(value_text, 0), int(mask_text, 0) if mask_text else MAX_MARK)
        except ValueError:
            raise ValueError(f"{item!r} is not a mark; give VALUE or VALUE/MASK such as 0x539 or 1337") from None
        if not (0 <= mark.value <= MAX_MARK and 0 < mark.mask <= MAX_MARK):
            raise ValueError(f"{item!r} is out of range; marks and masks are 32-bit")
        if mark.value & mark.mask == 0:
            raise ValueError(f"{item!r} matches every unmarked packet, so nothing would be captured; "
                             "use a nonzero mark")
        if mark.value & ~mark.mask:
            masked = Mark(mark.value & mark.mask, mark.mask)
            raise ValueError(f"{item!r} sets bits outside its mask; did you mean {masked}?")
        marks.append(mark)
    return tuple(marks)


@dataclass(frozen=True)
class Capture:
    """What to capture; validated on construction, with messages that name the option."""

    outbound_port: int = 15002
    inbound_port: int = 15006
    outbound: bool = True
    inbound: bool = True
    outbound_ports: tuple[PortRange, ...] | None = None
    exclude_outbound_ports: tuple[PortRange, ...] = ()
    inbound_ports: tuple[PortRange, ...] | None = None
    exclude_inbound_ports: tuple[PortRange, ...] = ()
    exclude_cidrs: tuple[Network, ...] = ()
    exclude_uids: tuple[int, ...] = ()
    exclude_gids: tuple[int, ...] = ()
    exclude_marks: tuple[Mark, ...] = ()
    capture_loopback: bool = False
    ipv4: bool = True
    ipv6: bool = True

    def __post_init__(self) -> None:
        for refused, message in _REFUSED:
            if refused(self):
                raise ConfigError(message.format(capture=self))

    @property
    def families(self) -> tuple[Family, ...]:
        return tuple(family for family, on in ((Family.V4, self.ipv4), (Family.V6, self.ipv6)) if on)


# Each row: options that cannot work together, and the message that refuses them.
_REFUSED: tuple[tuple[Callable[[Capture], bool], str], ...] = (
    (lambda c: c.outbound_port == c.inbound_port,
     "--outbound-port and --inbound-port are both {capture.outbound_port}; "
     "the proxy tells the directions apart by port, so give them different ports"),
    (lambda c: not (c.outbound or c.inbound),
     "--no-outbound and --no-inbound together capture nothing; drop one of them"),
    (lambda c: not (c.ipv4 or c.ipv6),
     "--no-ipv4 and --no-ipv6 together capture nothing; drop one of them"),
    (lambda c: c.outbound and not (c.exclude_uids or c.exclude_gids or c.exclude_marks),
     "outbound capture needs --exclude-uid, --exclude-gid or --exclude-mark matching the proxy, "
     "otherwise its own upstream connections are captured again (a loop); "
     "give one of them, or --no-outbound"),
    (lambda c: c.outbound_ports == () or c.inbound_ports == (),
     "--outbound-ports and --inbound-ports need at least one port, or * for all"),
)


def _tcp(port_range: PortRange | None) -> list[str]:
    return ["-p", "tcp"] + ([] if port_range is None else ["-m", "tcp", "--dport", str(port_range)])


def _outbound_rules(capture: Capture, family: Family) -> list[list[str]]:
    """EP_OUTPUT: the proxy's own traffic and exclusions return first, the rest is redirected."""
    rules = [*_owner_returns(capture), *_loopback_returns(capture),
             *_network_returns("-d", capture.exclude_cidrs, family),
             *_port_returns(capture.exclude_outbound_ports), *_jumps(capture.outbound_ports, REDIRECT_CHAIN)]
    return [["-A", OUTPUT_CHAIN, *rule] for rule in rules]


def _inbound_rules(capture: Capture, family: Family) -> list[list[str]]:
    """EP_PREROUTING: connections straight to the proxy's ports and exclusions return first."""
    rules = [*_proxy_port_returns(capture.inbound_port, capture.outbound_port),
             *_network_returns("-s", capture.exclude_cidrs, family),
             *_port_returns(capture.exclude_inbound_ports), *_jumps(capture.inbound_ports, INBOUND_REDIRECT_CHAIN)]
    return [["-A", PREROUTING_CHAIN, *rule] for rule in rules]


def _owner_returns(capture: Capture) -> list[list[str]]:
    """The proxy's own upstream connections, told apart by its uid, gid or mark."""
    matches = (("owner", "--uid-owner", capture.exclude_uids), ("owner", "--gid-owner", capture.exclude_gids),
               ("mark", "--mark", capture.exclude_marks))
    return [["-m", module, option, str(value), "-j", "RETURN"] for module, option, values in matches for value in values]


def _loopback_returns(capture: Capture) -> list[list[str]]:
    """Loopback stays uncaptured, or with --capture-loopback, only connections to the proxy's ports do."""
    if not capture.capture_loopback:
        return [["-o", "lo", "-j", "RETURN"]]
    return [["-o", "lo", *rule] for rule in _proxy_port_returns(capture.outbound_port, capture.inbound_port)]


def _proxy_port_returns(*ports: int) -> list[list[str]]:
    return [[*_tcp(PortRange(port, port)), "-j", "RETURN"] for port in ports]


def _network_returns(option: str, networks: tuple[Network, ...], family: Family) -> list[list[str]]:
    return [[option, str(net), "-j", "RETURN"] for net in networks if net.version == family.version]


def _port_returns(excluded: tuple[PortRange, ...]) -> list[list[str]]:
    return [[*_tcp(ports), "-j", "RETURN"] for ports in excluded]


def _jumps(selected: tuple[PortRange, ...] | None, chain: str) -> list[list[str]]:
    """Into the redirect chain: the selected ports, or every port (None)."""
    return [[*_tcp(ports), "-j", chain] for ports in selected or [None]]


def _redirect(chain: str, port: int) -> list[list[str]]:
    return [["-N", chain], ["-A", chain, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(port)]]


def install_commands(capture: Capture) -> list[list[str]]:
    """Every command install runs on a ruleset without our chains; the jumps come last,
    so nothing is captured until the chains are complete."""
    commands = []
    for family in capture.families:
        rules: list[list[str]] = []
        jumps: list[list[str]] = []
        if capture.outbound:
            rules += [["-N", OUTPUT_CHAIN], *_redirect(REDIRECT_CHAIN, capture.outbound_port)]
            rules += _outbound_rules(capture, family)
            jumps.append(["-A", "OUTPUT", "-p", "tcp", "-j", OUTPUT_CHAIN])
        if capture.inbound:
            rules += [["-N", PREROUTING_CHAIN], *_redirect(INBOUND_REDIRECT_CHAIN, capture.inbound_port)]
            rules += _inbound_rules(capture, family)
            jumps.append(["-A", "PREROUTING", "-p", "tcp", "-j", PREROUTING_CHAIN])
        commands += [[family.binary, "-t", "nat", *rule] for rule in rules + jumps]
    return commands


def _lines(rules_text: str) -> list[str]:
    return [line for line in rules_text.splitlines() if line.strip()]


def _is_ours(rule: list[str]) -> bool:
    """A chain of ours, a rule in one, or a jump into one from a chain that is not ours."""
    if rule[0] in ("-N", "-A") and rule[1] in CHAINS:
        return True
    return rule[0] == "-A" and any(a == "-j" and b in CHAINS for a, b in zip(rule, rule[1:]))


def our_rules(rules_text: str) -> list[str]:
    """The lines of `iptables -t nat -S` that install added, for `show`."""
    return [line for line in _lines(rules_text) if _is_ours(shlex.split(line))]


def uninstall_commands(family: Family, rules_text: str) -> list[list[str]]:
    """Removes whatever install added, whatever options it had, given `iptables -t nat -S`:
    the jumps first (capture stops at once), then flush every chain of ours, then delete them
    (a chain still referenced by another cannot be deleted)."""
    rules = [shlex.split(line) for line in _lines(rules_text)]
    present = _our_chains(rules)
    steps = _our_jumps(rules) + [["-F", chain] for chain in present] + [["-X", chain] for chain in present]
    return [[family.binary, "-t", "nat", *step] for step in steps]


def _our_chains(rules: list[list[str]]) -> list[str]:
    return [rule[1] for rule in rules if rule[0] == "-N" and rule[1] in CHAINS]


def _our_jumps(rules: list[list[str]]) -> list[list[str]]:
    """Deletions of the rules outside our chains that jump into one."""
    return [["-D", *rule[1:]] for rule in rules if rule[0] == "-A" and rule[1] not in CHAINS and _is_ours(rule)]


def render(commands: list[list[str]]) -> str:
    """One shell-quoted command per line: what --dry-run prints and install logs."""
    return "".join(shlex.join(command) + "\n" for command in commands)
