"""`element-proxy iptables install | uninstall | show`: the init step of a sidecar deployment.

The rules themselves are built in `proxy/interception/iptables_rules.py`; this module parses the
command line, checks what running them needs (root, the binaries), runs them one by
one and names the command that failed. It never leaves half an install behind: a
failed install removes what it added.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import NoReturn, TextIO, TypeVar

from proxy.interception.iptables_rules import (
    MAX_ID, Capture, ConfigError, Family, install_commands, our_rules, parse_marks, parse_networks,
    parse_port, parse_port_ranges, parse_port_selection, render, split_items, uninstall_commands,
)

PROG = "element-proxy iptables"
CAP_NET_ADMIN = 12
DRY_RUN_HELP = "print the commands, one per line, and change nothing"
T = TypeVar("T")


class UsageError(Exception):
    """Bad input or a missing prerequisite: exit 2 with a message that says what to do."""


class ApplyError(Exception):
    """An iptables command failed: exit 1 with the command and its stderr."""


class Output:
    """stdout that outlives its reader: once the reader of a pipe has gone (`show | head -1`),
    the rest goes nowhere instead of raising BrokenPipeError, so an install or uninstall whose
    log is cut short still runs to its end, and no traceback is printed."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.reader_gone = False

    def write(self, text: str) -> None:
        if self.reader_gone:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            self.reader_gone = True
            # what is still buffered goes to /dev/null when the interpreter flushes at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message}\n(see {self.prog} --help)")


def _resolve_ids(text: str, lookup: Callable[[str], int], kind: str) -> tuple[int, ...]:
    """Numeric ids are taken as they are (a container's proxy user is often absent from the
    init step's /etc/passwd); names must exist here."""
    ids = []
    for item in split_items(text):
        if item.isdigit():
            if int(item) > MAX_ID:
                raise ValueError(f"{item!r} is out of range; {kind} ids go from 0 to {MAX_ID}")
            ids.append(int(item))
            continue
        try:
            ids.append(lookup(item))
        except KeyError:
            raise ValueError(f"there is no {kind} named {item!r} on this host; "
                             f"give a numeric id or an existing {kind} name") from None
    return tuple(ids)


def parse_uids(text: str) -> tuple[int, ...]:
    return _resolve_ids(text, lambda name: pwd.getpwnam(name).pw_uid, "user")


def parse_gids(text: str) -> tuple[int, ...]:
    return _resolve_ids(text, lambda name: grp.getgrnam(name).gr_gid, "group")


def _arg(parse: Callable[[str], T]) -> Callable[[str], T]:
    """Lets argparse report our message (prefixed with the option name) instead of a generic one."""
    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from error
    return convert


def _add_families(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ipv4", action=argparse.BooleanOptionalAction, default=True, help="iptables (default: on)")
    parser.add_argument("--ipv6", action=argparse.BooleanOptionalAction, default=True, help="ip6tables (default: on)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Install, remove or show the nat rules that redirect TCP to element-proxy.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{install,uninstall,show}")

    install = commands.add_parser("install", help="add the rules (removing a previous install first)")
    install.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP)
    install.add_argument("--outbound-port", type=_arg(parse_port), default=15002, metavar="PORT",
                         help="the proxy's outbound listener (15002)")
    install.add_argument("--inbound-port", type=_arg(parse_port), default=15006, metavar="PORT",
                         help="the proxy's inbound listener (15006)")
    install.add_argument("--outbound", action=argparse.BooleanOptionalAction, default=True,
                         help="capture locally generated TCP (nat OUTPUT; default: on)")
    install.add_argument("--inbound", action=argparse.BooleanOptionalAction, default=True,
                         help="capture TCP arriving from other hosts (nat PREROUTING; default: on)")
    install.add_argument("--outbound-ports", type=_arg(parse_port_selection), default=None, metavar="PORTS",
                         help="destination ports to capture outbound: * (default) or e.g. 80,443,8000:8100")
    install.add_argument("--exclude-outbound-ports", type=_arg(parse_port_ranges), action="extend", default=[],
                         metavar="PORTS", help="destination ports never captured outbound (repeatable)")
    install.add_argument("--inbound-ports", type=_arg(parse_port_selection), default=None, metavar="PORTS",
                         help="local ports to capture inbound: * (default) or e.g. 8080,9000:9100")
    install.add_argument("--exclude-inbound-ports", type=_arg(parse_port_ranges), action="extend", default=[],
                         metavar="PORTS", help="local ports never captured inbound, e.g. 22 (repeatable)")
    install.add_argument("--exclude-cidr", type=_arg(parse_networks), action="extend", default=[], metavar="CIDR",
                         help="peers never captured: outbound to them, inbound from them; IPv4 or IPv6 (repeatable)")
    install.add_argument("--exclude-uid", type=_arg(parse_uids), action="extend", default=[], metavar="UID",
                         help="user (id or name) whose connections are never captured: the proxy's (repeatable)")
    install.add_argument("--exclude-gid", type=_arg(parse_gids), action="extend", default=[], metavar="GID",
                         help="group (id or name) whose connections are never captured (repeatable)")
    install.add_argument("--exclude-mark", type=_arg(parse_marks), action="extend", default=[], metavar="MARK",
                         help="SO_MARK (VALUE or VALUE/MASK) never captured: the proxy's upstream_mark (repeatable)")
    install.add_argument("--capture-loopback", action="store_true",
                         help="also capture outbound connections that stay on this host (default: not captured)")
    _add_families(install)

    uninstall = commands.add_parser("uninstall", help="remove everything install added, whatever its options")
    uninstall.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP)
    _add_families(uninstall)

    show = commands.add_parser("show", help="print the rules install added (iptables -t nat -S)")
    _add_families(show)
    return parser


def _capture(args: argparse.Namespace) -> Capture:
    return Capture(
        outbound_port=args.outbound_port, inbound_port=args.inbound_port,
        outbound=args.outbound, inbound=args.inbound,
        outbound_ports=args.outbound_ports, exclude_outbound_ports=tuple(args.exclude_outbound_ports),
        inbound_ports=args.inbound_ports, exclude_inbound_ports=tuple(args.exclude_inbound_ports),
        exclude_cidrs=tuple(args.exclude_cidr), exclude_uids=tuple(args.exclude_uid),
        exclude_gids=tuple(args.exclude_gid), exclude_marks=tuple(args.exclude_mark),
        capture_loopback=args.capture_loopback, ipv4=args.ipv4, ipv6=args.ipv6,
    )


def _families(args: argparse.Namespace) -> tuple[Family, ...]:
    families = tuple(family for family, on in ((Family.V4, args.ipv4), (Family.V6, args.ipv6)) if on)
    if not families:
        raise UsageError(f"{PROG} {args.command}: error: --no-ipv4 and --no-ipv6 together leave nothing to do; "
                         "drop one")
    return families


def _has_net_admin() -> bool:
    """Root, or any user holding CAP_NET_ADMIN (a container's init step often has only that)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False


def _preflight(command: str, families: tuple[Family, ...]) -> None:
    if not _has_net_admin():
        raise UsageError(f"{PROG} {command}: error: changing or reading nat rules needs privileges; "
                         "run as root or with CAP_NET_ADMIN")
    for family in families:
        if shutil.which(family.binary) is None:
            hint = " (or pass --no-ipv6)" if family is Family.V6 else ""
            raise UsageError(f"{PROG} {command}: error: {family.binary} not found on PATH; "
                             f"install the iptables package{hint}")


def _run(command: list[str]) -> str:
    try:
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as error:
        raise ApplyError(f"`{shlex.join(command)}` failed with exit {error.returncode}: "
                         f"{(error.stderr or error.stdout).strip()}") from error
    except OSError as error:
        raise ApplyError(f"`{shlex.join(command)}` could not run: {error}") from error


def _apply(commands: list[list[str]], out: Output) -> None:
    for command in commands:
        out.write(render([command]))
        _run(command)


def _current(family: Family) -> str:
    return _run([family.binary, "-t", "nat", "-S"])


def _removal(families: tuple[Family, ...]) -> list[list[str]]:
    return [command for family in families for command in uninstall_commands(family, _current(family))]


def _install(capture: Capture, dry_run: bool, out: Output) -> None:
    commands = install_commands(capture)
    if dry_run:
        out.write(render(commands))
        return
    _preflight("install", capture.families)
    _apply(_removal(capture.families), out)
    try:
        _apply(commands, out)
    except ApplyError as error:
        try:
            _apply(_removal(capture.families), out)
        except ApplyError as cleanup_error:
            raise ApplyError(f"{error}; removing the partial install failed too: {cleanup_error}") from error
        raise ApplyError(f"{error}; the partial install was removed") from error


def _uninstall(families: tuple[Family, ...], dry_run: bool, out: Output) -> None:
    _preflight("uninstall", families)
    commands = _removal(families)
    if dry_run:
        out.write(render(commands))
    else:
        _apply(commands, out)


def _show(families: tuple[Family, ...], out: Output) -> None:
    _preflight("show", families)
    for family in families:
        lines = our_rules(_current(family))
        out.write(f"# {family.binary} -t nat\n")
        out.write("".join(line + "\n" for line in lines) if lines else "# no element-proxy rules\n")


def main(argv: list[str]) -> int:
    """Runs one subcommand; 0 on success, 2 for bad input or missing prerequisites, 1 when a command fails."""
    out = Output(sys.stdout)
    try:
        args = _parser().parse_args(argv)
        if args.command == "install":
            try:
                capture = _capture(args)
            except ConfigError as error:
                raise UsageError(f"{PROG} install: error: {error}") from error
            _install(capture, args.dry_run, out)
        elif args.command == "uninstall":
            _uninstall(_families(args), args.dry_run, out)
        else:
            _show(_families(args), out)
    except UsageError as error:
        print(error, file=sys.stderr)
        return 2
    except ApplyError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
