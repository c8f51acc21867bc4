"""`element-proxy iptables`: the rules it builds, what they do to a ruleset, and real interception.

The pure tests need nothing. The rest need root and iptables, and only ever touch
namespaces they create (tests/netns.py); the interception tests use a test-only
transparent forwarder (tests/capture_tools.py) so they do not depend on the proxy.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.netns import TwoHosts, namespace, run_in, two_hosts
from tests.procs import REPO, Proc
from proxy.interception import iptables
from proxy.interception.iptables_rules import Family, our_rules, uninstall_commands

TOOLS = str(REPO / "tests" / "capture_tools.py")
NOBODY = 65534
APP_PORT = 8080

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("iptables") and shutil.which("ip6tables") and shutil.which("ip")),
    reason="needs root, iptables/ip6tables and iproute2 (network namespaces); CI runs them as root",
)


def dry_run(capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    assert iptables.main(["install", "--dry-run", *args]) == 0
    return capsys.readouterr().out.splitlines()


def chain(lines: list[str], binary: str, name: str) -> list[str]:
    """The rules of one chain, without the `<binary> -t nat -A <chain>` prefix."""
    prefix = f"{binary} -t nat -A {name} "
    return [line.removeprefix(prefix) for line in lines if line.startswith(prefix)]


# -- pure: the commands ----------------------------------------------------------------------

DEFAULT_V4 = """\
iptables -t nat -N EP_OUTPUT
iptables -t nat -N EP_REDIRECT
iptables -t nat -A EP_REDIRECT -p tcp -j REDIRECT --to-ports 15002
iptables -t nat -A EP_OUTPUT -m owner --uid-owner 1337 -j RETURN
iptables -t nat -A EP_OUTPUT -o lo -j RETURN
iptables -t nat -A EP_OUTPUT -p tcp -j EP_REDIRECT
iptables -t nat -N EP_PREROUTING
iptables -t nat -N EP_INBOUND_REDIRECT
iptables -t nat -A EP_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15006
iptables -t nat -A EP_PREROUTING -p tcp -m tcp --dport 15006 -j RETURN
iptables -t nat -A EP_PREROUTING -p tcp -m tcp --dport 15002 -j RETURN
iptables -t nat -A EP_PREROUTING -p tcp -j EP_INBOUND_REDIRECT
iptables -t nat -A OUTPUT -p tcp -j EP_OUTPUT
iptables -t nat -A PREROUTING -p tcp -j EP_PREROUTING
"""


def test_default_dry_run_is_both_families_in_our_chains(capsys: pytest.CaptureFixture[str]) -> None:
    expected = DEFAULT_V4 + DEFAULT_V4.replace("iptables -t", "ip6tables -t")
    assert "\n".join(dry_run(capsys, "--exclude-uid", "1337")) + "\n" == expected


@pytest.mark.parametrize("args, binary, name, rules", [
    (["--outbound-port", "16001"], "iptables", "EP_REDIRECT", ["-p tcp -j REDIRECT --to-ports 16001"]),
    (["--inbound-port", "16006"], "ip6tables", "EP_INBOUND_REDIRECT", ["-p tcp -j REDIRECT --to-ports 16006"]),
    (["--inbound-port", "16006"], "iptables", "EP_PREROUTING", [
        "-p tcp -m tcp --dport 16006 -j RETURN", "-p tcp -m tcp --dport 15002 -j RETURN",
        "-p tcp -j EP_INBOUND_REDIRECT"]),
    (["--outbound-ports", "80,443,8000:8100"], "iptables", "EP_OUTPUT", [
        "-m owner --uid-owner 1337 -j RETURN", "-o lo -j RETURN", "-p tcp -m tcp --dport 80 -j EP_REDIRECT",
        "-p tcp -m tcp --dport 443 -j EP_REDIRECT", "-p tcp -m tcp --dport 8000:8100 -j EP_REDIRECT"]),
    (["--exclude-outbound-ports", "22,8000-8100", "--exclude-outbound-ports", "53"], "ip6tables", "EP_OUTPUT", [
        "-m owner --uid-owner 1337 -j RETURN", "-o lo -j RETURN", "-p tcp -m tcp --dport 22 -j RETURN",
        "-p tcp -m tcp --dport 8000:8100 -j RETURN", "-p tcp -m tcp --dport 53 -j RETURN", "-p tcp -j EP_REDIRECT"]),
    (["--inbound-ports", "8080", "--exclude-inbound-ports", "22"], "iptables", "EP_PREROUTING", [
        "-p tcp -m tcp --dport 15006 -j RETURN", "-p tcp -m tcp --dport 15002 -j RETURN",
        "-p tcp -m tcp --dport 22 -j RETURN", "-p tcp -m tcp --dport 8080 -j EP_INBOUND_REDIRECT"]),
    (["--exclude-cidr", "10.0.0.0/8,fd00::/8", "--exclude-cidr", "192.168.1.1"], "iptables", "EP_OUTPUT", [
        "-m owner --uid-owner 1337 -j RETURN", "-o lo -j RETURN", "-d 10.0.0.0/8 -j RETURN",
        "-d 192.168.1.1/32 -j RETURN", "-p tcp -j EP_REDIRECT"]),
    (["--exclude-cidr", "10.0.0.0/8,fd00::/8"], "ip6tables", "EP_OUTPUT", [
        "-m owner --uid-owner 1337 -j RETURN", "-o lo -j RETURN", "-d fd00::/8 -j RETURN", "-p tcp -j EP_REDIRECT"]),
    (["--exclude-cidr", "10.0.0.0/8,fd00::/8"], "ip6tables", "EP_PREROUTING", [
        "-p tcp -m tcp --dport 15006 -j RETURN", "-p tcp -m tcp --dport 15002 -j RETURN",
        "-s fd00::/8 -j RETURN", "-p tcp -j EP_INBOUND_REDIRECT"]),
    (["--exclude-uid", "nobody,42", "--exclude-gid", "root", "--exclude-gid", "7"], "iptables", "EP_OUTPUT", [
        "-m owner --uid-owner 1337 -j RETURN", "-m owner --uid-owner 65534 -j RETURN",
        "-m owner --uid-owner 42 -j RETURN", "-m owner --gid-owner 0 -j RETURN", "-m owner --gid-owner 7 -j RETURN",
        "-o lo -j RETURN", "-p tcp -j EP_REDIRECT"]),
    (["--exclude-mark", "1337,0x100/0xf00"], "ip6tables", "EP_OUTPUT", [
        "-m owner --uid-owner 1337 -j RETURN", "-m mark --mark 0x539 -j RETURN", "-m mark --mark 0x100/0xf00 -j RETURN",
        "-o lo -j RETURN", "-p tcp -j EP_REDIRECT"]),
    (["--capture-loopback", "--outbound-port", "16001"], "iptables", "EP_OUTPUT", [
        "-m owner --uid-owner 1337 -j RETURN", "-o lo -p tcp -m tcp --dport 16001 -j RETURN",
        "-o lo -p tcp -m tcp --dport 15006 -j RETURN", "-p tcp -j EP_REDIRECT"]),
])
def test_each_option_changes_its_chain(capsys: pytest.CaptureFixture[str], args: list[str], binary: str,
                                       name: str, rules: list[str]) -> None:
    assert chain(dry_run(capsys, "--exclude-uid", "1337", *args), binary, name) == rules


@pytest.mark.parametrize("args, binaries, chains", [
    (["--no-ipv6"], {"iptables"}, {"EP_OUTPUT", "EP_REDIRECT", "EP_PREROUTING", "EP_INBOUND_REDIRECT"}),
    (["--no-ipv4"], {"ip6tables"}, {"EP_OUTPUT", "EP_REDIRECT", "EP_PREROUTING", "EP_INBOUND_REDIRECT"}),
    (["--no-inbound"], {"iptables", "ip6tables"}, {"EP_OUTPUT", "EP_REDIRECT"}),
    (["--no-outbound"], {"iptables", "ip6tables"}, {"EP_PREROUTING", "EP_INBOUND_REDIRECT"}),
])
def test_families_and_directions_switch_off(capsys: pytest.CaptureFixture[str], args: list[str],
                                            binaries: set[str], chains: set[str]) -> None:
    lines = dry_run(capsys, "--exclude-uid", "1337", *args)
    assert {line.split()[0] for line in lines} == binaries
    assert {line.split()[4] for line in lines if " -N " in line} == chains
    jumps = {line.split(" -t nat ")[1] for line in lines if line.split()[4] in ("OUTPUT", "PREROUTING")}
    assert jumps == ({"-A OUTPUT -p tcp -j EP_OUTPUT"} if "EP_OUTPUT" in chains else set()) | (
        {"-A PREROUTING -p tcp -j EP_PREROUTING"} if "EP_PREROUTING" in chains else set())


def test_inbound_only_needs_no_exclusion(capsys: pytest.CaptureFixture[str]) -> None:
    assert dry_run(capsys, "--no-outbound")


@pytest.mark.parametrize("args, fragments", [
    (["--outbound-port", "0"], ["--outbound-port", "'0'", "1 to 65535"]),
    (["--inbound-port", "http"], ["--inbound-port", "'http'", "1 to 65535"]),
    (["--inbound-port", "15002"], ["--outbound-port and --inbound-port are both 15002", "different"]),
    (["--exclude-outbound-ports", "70000"], ["--exclude-outbound-ports", "'70000'", "1 to 65535"]),
    (["--exclude-inbound-ports", "22,,80"], ["--exclude-inbound-ports", "'22,,80'", "empty item"]),
    (["--inbound-ports", "90:80"], ["--inbound-ports", "'90:80'", "lower port first"]),
    (["--exclude-cidr", "10.0.0.0/33"], ["--exclude-cidr", "'10.0.0.0/33'", "10.0.0.0/8"]),
    (["--exclude-cidr", "example.com"], ["--exclude-cidr", "'example.com'", "IPv4 or IPv6"]),
    (["--exclude-cidr", "10.1.2.3/8"], ["--exclude-cidr", "'10.1.2.3/8'", "did you mean 10.0.0.0/8"]),
    (["--exclude-uid", "no-such-user-ept"], ["--exclude-uid", "'no-such-user-ept'", "numeric id"]),
    (["--exclude-gid", "no-such-group-ept"], ["--exclude-gid", "'no-such-group-ept'", "numeric id"]),
    (["--exclude-uid", "4294967295"], ["--exclude-uid", "'4294967295'", "out of range"]),
    (["--exclude-mark", "0"], ["--exclude-mark", "'0'", "every unmarked packet"]),
    (["--exclude-mark", "red"], ["--exclude-mark", "'red'", "VALUE/MASK"]),
    (["--exclude-mark", "0x539/0xff"], ["--exclude-mark", "outside its mask", "0x39/0xff"]),
    (["--no-ipv4", "--no-ipv6"], ["--no-ipv4 and --no-ipv6", "capture nothing"]),
    (["--no-inbound", "--no-outbound"], ["--no-outbound and --no-inbound", "capture nothing"]),
])
def test_bad_input_exits_2_naming_the_option(capsys: pytest.CaptureFixture[str], args: list[str],
                                             fragments: list[str]) -> None:
    assert iptables.main(["install", "--dry-run", "--exclude-uid", "1337", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    for fragment in fragments:
        assert fragment in captured.err


def test_outbound_without_an_exclusion_is_refused_as_a_loop(capsys: pytest.CaptureFixture[str]) -> None:
    assert iptables.main(["install", "--dry-run"]) == 2
    err = capsys.readouterr().err
    for fragment in ("--exclude-uid", "--exclude-gid", "--exclude-mark", "loop", "--no-outbound"):
        assert fragment in err


SHOWN = """\
-P PREROUTING ACCEPT
-P OUTPUT ACCEPT
-N EP_OUTPUT
-N EP_REDIRECT
-N KEEP
-A PREROUTING -s 192.0.2.0/24 -j ACCEPT
-A OUTPUT -p tcp -j EP_OUTPUT
-A OUTPUT -d 192.0.2.1/32 -m comment --comment "not ours: -j EP_OUTPUT" -j KEEP
-A OUTPUT -p tcp -j EP_OUTPUT
-A EP_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A EP_OUTPUT -p tcp -j EP_REDIRECT
-A EP_REDIRECT -p tcp -j REDIRECT --to-ports 15002
-A KEEP -j RETURN
"""


def test_uninstall_removes_jumps_then_chains_and_nothing_else() -> None:
    assert uninstall_commands(Family.V6, SHOWN) == [
        ["ip6tables", "-t", "nat", *step.split()] for step in (
            "-D OUTPUT -p tcp -j EP_OUTPUT", "-D OUTPUT -p tcp -j EP_OUTPUT",
            "-F EP_OUTPUT", "-F EP_REDIRECT", "-X EP_OUTPUT", "-X EP_REDIRECT")
    ]
    assert uninstall_commands(Family.V4, "-P OUTPUT ACCEPT\n") == []
    assert our_rules(SHOWN) == [line for line in SHOWN.splitlines() if "EP_" in line and "KEEP" not in line]


# -- prerequisites: real processes --------------------------------------------------------------

def cli(argv: list[str], env: dict[str, str] | None = None,
        prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(prefix or []), sys.executable, "-m", "proxy.interception.iptables", *argv], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, **(env or {})}, timeout=30)


def test_not_root_is_told_to_use_root_or_cap_net_admin() -> None:
    drop = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]
    done = cli(["install", "--exclude-uid", "1337"], prefix=drop if os.geteuid() == 0 else [])
    assert done.returncode == 2, done.stderr
    assert "run as root or with CAP_NET_ADMIN" in done.stderr


@needs_root
def test_missing_iptables_binary_says_which_package(tmp_path: Path) -> None:
    for command in (["install", "--exclude-uid", "1337"], ["uninstall"], ["show"]):
        done = cli(command, env={"PATH": str(tmp_path)})
        assert done.returncode == 2, done.stderr
        assert "iptables not found on PATH" in done.stderr and "install the iptables package" in done.stderr


# -- a real ruleset in a fresh namespace -----------------------------------------------------------

def nat_save(ns: str) -> dict[str, str]:
    """iptables-save / ip6tables-save of the nat table, without timestamps and counters."""
    saved = {}
    for family in Family:
        text = run_in(ns, [f"{family.binary}-save", "-t", "nat"]).stdout
        lines = [re.sub(r"\[\d+:\d+\]", "[0:0]", line) for line in text.splitlines() if not line.startswith("#")]
        saved[family.binary] = "\n".join(lines)
    return saved


def by_chain(lines: list[str]) -> dict[str, list[str]]:
    """`-S`-style lines grouped by chain in order; chain creations as a sorted group (nft lists them by name)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for line in lines:
        verb, name = line.split()[:2]
        groups["-N" if verb == "-N" else name].append(line)
    groups["-N"].sort()
    return dict(groups)


SEED = [
    ["-N", "KEEP"], ["-A", "KEEP", "-p", "tcp", "-j", "RETURN"],
    ["-A", "OUTPUT", "-p", "tcp", "-m", "tcp", "--dport", "9", "-j", "KEEP"],
    ["-A", "PREROUTING", "-p", "tcp", "-m", "tcp", "--dport", "9", "-j", "ACCEPT"],
]
INSTALL_ARGS = ["--exclude-uid", "1337", "--exclude-mark", "0x539", "--exclude-cidr", "192.0.2.0/24,2001:db8::/32",
                "--exclude-inbound-ports", "22", "--exclude-outbound-ports", "25"]


@needs_root
def test_install_is_idempotent_uninstall_restores_and_dry_run_is_exact(
        capsys: pytest.CaptureFixture[str]) -> None:
    planned = dry_run(capsys, *INSTALL_ARGS)
    with namespace("rules") as ns:
        for family in Family:
            for rule in SEED:
                run_in(ns, [family.binary, "-t", "nat", *rule])
        before = nat_save(ns)
        listed = {family: run_in(ns, [family.binary, "-t", "nat", "-S"]).stdout.splitlines() for family in Family}

        applied = run_in(ns, [sys.executable, "-m", "proxy.interception.iptables", "install", *INSTALL_ARGS]).stdout
        once = nat_save(ns)
        assert applied.splitlines() == planned
        for family in Family:
            now = run_in(ns, [family.binary, "-t", "nat", "-S"]).stdout.splitlines()
            added = [line for line in now if line not in listed[family]]
            prefix = f"{family.binary} -t nat "
            wanted = [line.removeprefix(prefix) for line in planned if line.startswith(prefix)]
            assert by_chain(added) == by_chain(wanted)
        shown = run_in(ns, [sys.executable, "-m", "proxy.interception.iptables", "show"]).stdout
        assert sum(line.startswith("-") for line in shown.splitlines()) == len(planned)

        run_in(ns, [sys.executable, "-m", "proxy.interception.iptables", "install", *INSTALL_ARGS])
        assert nat_save(ns) == once
        removal = run_in(ns, [sys.executable, "-m", "proxy.interception.iptables", "uninstall", "--dry-run"]).stdout
        assert nat_save(ns) == once
        assert run_in(ns, [sys.executable, "-m", "proxy.interception.iptables", "uninstall"]).stdout == removal
        assert nat_save(ns) == before
        assert run_in(ns, [sys.executable, "-m", "proxy.interception.iptables", "uninstall"]).stdout == ""


@needs_root
def test_failed_install_names_the_command_and_removes_the_partial_install(tmp_path: Path) -> None:
    """ip6tables refuses one rule halfway through: everything added before it, v4 included, goes."""
    fake = tmp_path / "ip6tables"
    fake.write_text('#!/bin/sh\ncase "$*" in *"-A EP_PREROUTING"*) echo "refused by the test" >&2; exit 4;; esac\n'
                    f'exec {shutil.which("ip6tables")} "$@"\n')
    fake.chmod(0o755)
    with namespace("fail") as ns:
        before = nat_save(ns)
        done = run_in(ns, ["env", f"PATH={tmp_path}:{os.environ['PATH']}", sys.executable, "-m", "proxy.interception.iptables",
                           "install", "--exclude-uid", "1337"], check=False)
        assert done.returncode == 1, done.stderr
        failed = "`ip6tables -t nat -A EP_PREROUTING -p tcp -m tcp --dport 15006 -j RETURN` failed with exit 4"
        assert failed in done.stderr
        assert "refused by the test" in done.stderr and "the partial install was removed" in done.stderr
        assert nat_save(ns) == before


@needs_root
def test_output_cut_short_by_its_reader_is_no_error(capsys: pytest.CaptureFixture[str]) -> None:
    """`show | head -1` exits 0 without a traceback; an install whose log reader went away still
    installs every rule."""
    with namespace("pipe") as ns:
        module = f"{shlex.quote(sys.executable)} -m proxy.interception.iptables"
        script = (f"{module} install --exclude-uid 1337 | head -1 >/dev/null; echo install=${{PIPESTATUS[0]}}; "
                  f"{module} show | head -1; echo show=${{PIPESTATUS[0]}}")
        done = run_in(ns, ["bash", "-c", script])
        complete = run_in(ns, [sys.executable, "-m", "proxy.interception.iptables", "show"]).stdout
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.stdout.splitlines() == ["install=0", "# iptables -t nat", "show=0"], done.stdout
    assert sum(line.startswith("-") for line in complete.splitlines()) == len(dry_run(capsys, "--exclude-uid", "1337"))


# -- real interception: two hosts, a forwarder in the pod ------------------------------------------

@dataclass(frozen=True)
class Case:
    """Who serves, who dials which address, and where the connection should go."""

    install: list[str]
    server: str  # "client" or "pod": the namespace the app server runs in
    dialer: str  # the namespace the connection starts in
    target: str  # "client.v4", "pod.v6", "loopback.v4", ...: the address dialed
    captured_by: int | None  # the forwarder's listener that must see it, or None: not captured
    peer: str  # the address the server must see the connection come from
    forwarder: list[str] = field(default_factory=lambda: ["--uid", str(NOBODY), "--gid", str(NOBODY)])


def address(hosts: TwoHosts, name: str) -> str:
    host, version = name.split(".")
    if host == "loopback":
        return "127.0.0.1" if version == "v4" else "::1"
    return getattr(getattr(hosts, host), version)


def ns_of(hosts: TwoHosts, role: str) -> str:
    return getattr(hosts, role).ns


def events(proc: Proc, kind: str) -> list[dict[str, object]]:
    found = [json.loads(line) for line in proc.output().splitlines() if line.startswith("{")]
    return [event for event in found if event["event"] == kind]


UID = ["--exclude-uid", str(NOBODY)]
MARK_FORWARDER = ["--mark", "0x539"]
CASES = {
    "outbound v4, uid exclusion": Case(UID, "client", "pod", "client.v4", 15002, "pod.v4"),
    "outbound v4, mark exclusion": Case(["--exclude-mark", "0x539"], "client", "pod", "client.v4", 15002, "pod.v4",
                                        MARK_FORWARDER),
    "outbound v6, uid exclusion": Case(UID, "client", "pod", "client.v6", 15002, "pod.v6"),
    "outbound v6, mark exclusion": Case(["--exclude-mark", "0x539"], "client", "pod", "client.v6", 15002, "pod.v6",
                                        MARK_FORWARDER),
    "inbound v4": Case(UID, "pod", "client", "pod.v4", 15006, "pod.v4"),
    "inbound v6": Case(UID, "pod", "client", "pod.v6", 15006, "pod.v6"),
    "outbound excluded port": Case(UID + ["--exclude-outbound-ports", str(APP_PORT)], "client", "pod", "client.v4",
                                   None, "pod.v4"),
    "outbound port not included": Case(UID + ["--outbound-ports", "443"], "client", "pod", "client.v6", None, "pod.v6"),
    "outbound excluded cidr v4": Case(UID + ["--exclude-cidr", "10.201.0.0/30"], "client", "pod", "client.v4",
                                      None, "pod.v4"),
    "outbound excluded cidr v6": Case(UID + ["--exclude-cidr", "fd00:201::1/128"], "client", "pod", "client.v6",
                                      None, "pod.v6"),
    "inbound excluded port": Case(UID + ["--exclude-inbound-ports", str(APP_PORT)], "pod", "client", "pod.v4",
                                  None, "client.v4"),
    "inbound excluded cidr v4": Case(UID + ["--exclude-cidr", "10.201.0.1"], "pod", "client", "pod.v4",
                                     None, "client.v4"),
    "inbound excluded cidr v6": Case(UID + ["--exclude-cidr", "fd00:201::/64"], "pod", "client", "pod.v6",
                                     None, "client.v6"),
    "inbound port not included": Case(UID + ["--inbound-ports", "9000:9100"], "pod", "client", "pod.v6",
                                      None, "client.v6"),
    "loopback not captured by default": Case(UID, "pod", "pod", "loopback.v4", None, "loopback.v4"),
    "loopback captured on request": Case(UID + ["--capture-loopback"], "pod", "pod", "loopback.v6", 15002,
                                         "loopback.v6"),
    "inbound only needs no exclusion": Case(["--no-outbound"], "pod", "client", "pod.v4", 15006, "pod.v4", []),
    "ipv6 off leaves v6 alone": Case(UID + ["--no-ipv6"], "client", "pod", "client.v6", None, "pod.v6"),
}


def start(ns: str, *argv: str) -> Proc:
    proc = Proc([sys.executable, TOOLS, *argv], netns=ns)
    try:
        proc.wait_for_output('"ready"')
    except BaseException:
        proc.stop()
        raise
    return proc


def dial(ns: str, host: str, port: int = APP_PORT) -> dict[str, object]:
    return json.loads(run_in(ns, [sys.executable, TOOLS, "dial", host, str(port)]).stdout)


@needs_root
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_interception(case: Case) -> None:
    with two_hosts() as hosts, \
            start(ns_of(hosts, case.server), "serve", "--port", str(APP_PORT)) as server, \
            start(hosts.pod.ns, "forward", *case.forwarder) as forwarder:
        run_in(hosts.pod.ns, [sys.executable, "-m", "proxy.interception.iptables", "install", *case.install])
        result = dial(ns_of(hosts, case.dialer), address(hosts, case.target))

        assert "error" not in result and result["reply"], (result, forwarder.output())
        assert result["reply"]["sha256"] == result["sent_sha256"] == result["echo_sha256"]
        assert result["reply"]["peer"] == address(hosts, case.peer)
        assert len(events(server, "conn")) == 1
        seen = events(forwarder, "conn")
        if case.captured_by is None:
            assert seen == []
        else:
            assert [(event["listener"], event["orig"]) for event in seen] == [
                (case.captured_by, [address(hosts, case.target), APP_PORT])]
            assert events(forwarder, "dial-failed") == []


@needs_root
def test_without_the_right_exclusion_the_forwarder_loops() -> None:
    """The control for the cases above: they would notice a loop."""
    with two_hosts() as hosts, \
            start(hosts.client.ns, "serve", "--port", str(APP_PORT)) as server, \
            start(hosts.pod.ns, "forward", "--uid", str(NOBODY), "--gid", str(NOBODY), "--max-conns", "3") as forwarder:
        run_in(hosts.pod.ns, [sys.executable, "-m", "proxy.interception.iptables", "install", "--exclude-uid", "4242"])
        result = dial(hosts.pod.ns, hosts.client.v4)
        assert "reply" not in result or result["reply"] is None
        assert len(events(forwarder, "conn")) > 3
        assert events(server, "conn") == []
