"""firewall: rejects connections by destination, resets connections whose bytes match.

    python -m elements.firewall --port 50052 --deny-cidr 10.0.0.0/8 --deny-port 23 \\
        --regex '(?i)flushall' --regex '(?i)drop\\s+table' --direction request

On Open, a connection whose original destination is in a `--deny-cidr` network or
has a `--deny-port` port gets `--open-action` (reset or close; default reset) and is
never dialed. On Data, a chunk in which a `--pattern` (literal, UTF-8),
`--pattern-hex` (literal, hex) or `--regex` (Python bytes regex) matches gets
`--action` (reset, close or drop; default reset), in `--direction` (request,
response or both; default both). All options repeat. TCP splits streams anywhere,
so each connection and direction keeps its last bytes (the longest literal minus
one, or `--regex-window` bytes when there are regexes, default 4096) and searches
them together with the next chunk: a pattern split across chunks is still caught.

That kept tail is lost when the firewall restarts. So a connection the proxy
announces as resumed (already under way when this firewall's session began) is reset
when there are patterns to match, since a pattern split across the restart would slip
through; `--accept-resumed` keeps such connections (its destination is still checked).
Byte patterns match bytes: they cannot know that Redis commands are case-insensitive
(`flushall` is FLUSHALL) and may be quoted inline (`"FLUSH\\x41LL"`), that SQL allows
comments between keywords (`DROP/**/TABLE`), or that a match in the response direction
comes after the server acted. `(?i)` helps with case only: where the protocol matters,
use a protocol-aware element (elements/redis_guard.py for Redis).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import re
from collections.abc import Iterable
from typing import Self

from elements.sdk import Chunk, Close, Connection, Direction, Drop, Element, Reset, Verdict, port_number, run

VERDICTS = {"reset": Reset(), "close": Close(), "drop": Drop()}
DIRECTIONS = {"request": (Direction.REQUEST,), "response": (Direction.RESPONSE,),
              "both": (Direction.REQUEST, Direction.RESPONSE)}
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

log = logging.getLogger("elements.firewall")


class Firewall(Element):
    """Inline, wants Open: a destination ACL plus a byte-pattern matcher."""

    name = "firewall"
    wants_open = True
    read_only = True  # it resets, closes or drops; it never rewrites a byte

    def __init__(self, deny_cidrs: Iterable[Network] = (), deny_ports: Iterable[int] = (),
                 open_action: str = "reset", patterns: Iterable[bytes] = (),
                 regexes: Iterable[re.Pattern[bytes]] = (), action: str = "reset",
                 direction: str = "both", regex_window: int = 4096, accept_resumed: bool = False) -> None:
        patterns, regexes = list(patterns), list(regexes)
        if b"" in patterns:
            raise ValueError("--pattern '': an empty pattern would match every chunk")
        self.deny_cidrs = tuple(deny_cidrs)
        self.deny_ports = frozenset(deny_ports)
        self.open_verdict = VERDICTS[open_action]
        self.verdict = VERDICTS[action]
        self.directions = DIRECTIONS[direction]
        literal = [re.compile(b"|".join(re.escape(p) for p in patterns))] if patterns else []
        self.matchers = literal + regexes
        self.window = max([len(p) - 1 for p in patterns] + ([regex_window] if regexes else []), default=0)
        self.accept_resumed = accept_resumed

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument
        add("--deny-cidr", type=_cidr, action="append", default=[], metavar="CIDR", help="reject destinations in it")
        add("--deny-port", type=port_number, action="append", default=[], metavar="PORT",
            help="reject destinations with this port")
        add("--open-action", choices=["reset", "close"], default="reset", help="verdict on a denied Open")
        add("--pattern", type=str.encode, action="append", default=[], metavar="TEXT", help="literal text (UTF-8)")
        add("--pattern-hex", type=_hex, action="append", default=[], metavar="HEX", help="literal bytes in hex")
        add("--regex", type=_regex, action="append", default=[], metavar="REGEX", help="Python bytes regex")
        add("--action", choices=list(VERDICTS), default="reset", help="verdict on a match")
        add("--direction", choices=list(DIRECTIONS), default="both", help="where to look for matches")
        add("--regex-window", type=int, default=4096, metavar="N", help="bytes kept across chunks for regexes")
        add("--accept-resumed", action="store_true",
            help="keep connections already under way when this firewall (re)started, though a pattern split "
                 "across the restart goes unseen (default: reset them when there are patterns)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        if args.regex_window < 0:
            raise ValueError(f"--regex-window {args.regex_window}: must be 0 or more")
        return cls(args.deny_cidr, args.deny_port, args.open_action, args.pattern + args.pattern_hex, args.regex,
                   args.action, args.direction, args.regex_window, args.accept_resumed)

    def on_open(self, conn: Connection) -> Verdict | None:
        if conn.resumed and self.matchers and not self.accept_resumed:
            log.info("connection %s resumed after %d/%d bytes: reset, its earlier bytes were not seen by this "
                     "firewall (--accept-resumed keeps such connections)", conn.id, conn.request_bytes,
                     conn.response_bytes)
            return Reset()
        destination = conn.original_destination
        if destination.port in self.deny_ports or self._denied_ip(destination.ip):
            return self.open_verdict
        return None

    def on_data(self, conn: Connection, chunk: Chunk) -> Verdict | None:
        if not self.matchers or chunk.direction not in self.directions:
            return None
        tail = conn.state.get(chunk.direction)
        window = tail + chunk.data if tail else chunk.data
        if any(matcher.search(window) for matcher in self.matchers):
            conn.state[chunk.direction] = b""
            return self.verdict
        if self.window:
            conn.state[chunk.direction] = window[-self.window:]
        return None

    def _denied_ip(self, text: str) -> bool:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.deny_cidrs)


def _cidr(text: str) -> Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a CIDR network ({err})") from None


def _hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not hex ({err})") from None


def _regex(text: str) -> re.Pattern[bytes]:
    try:
        return re.compile(text.encode())
    except re.error as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid regex ({err})") from None


if __name__ == "__main__":
    run(Firewall)
