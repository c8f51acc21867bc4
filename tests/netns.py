"""Network namespaces for tests: throwaway hosts whose iptables rules and addresses are their own.

Tests that install nat rules or need two hosts create them here, so nothing touches
the machine's own ruleset. Names are unique per process (`<prefix>-<pid>-<n>-<role>`)
and every namespace is deleted on exit from its `with`, even when the test fails.

    with two_hosts() as hosts:
        run_in(hosts.pod.ns, ["python3", "-m", "proxy.interception.iptables", "install", ...])
        Proc([...], netns=hosts.client.ns)        # tests.procs
        hosts.pod.v4, hosts.pod.v6                # "10.201.0.2", "fd00:201::2"
"""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from tests.procs import REPO

_serial = itertools.count(1)


@dataclass(frozen=True)
class Host:
    """One namespace: its name, and its address on the veth link (IPv4 /24, IPv6 /64)."""

    ns: str
    v4: str
    v6: str
    ifname: str = "veth0"


@dataclass(frozen=True)
class TwoHosts:
    """A "client" host and a "pod" host joined by one veth pair, like two machines on a LAN."""

    client: Host
    pod: Host


def run_in(ns: str, argv: list[str], *, check: bool = True, timeout: float = 30.0,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Runs argv inside ns from the repository root; output captured as text.

    With check=True a failure raises with the command's output in the message, so a
    failing test shows why."""
    done = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=timeout, input=input, cwd=REPO)
    if check and done.returncode != 0:
        raise AssertionError(f"{argv} in netns {ns} exited {done.returncode}\n"
                             f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}")
    return done


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _wait_for_carrier(host: Host, timeout: float = 5.0) -> None:
    """The kernel reports a veth's carrier asynchronously; until then IPv6 drops what arrives
    (a first SYN lost costs a 1 s retransmit), so a host is handed out only once it is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        link = subprocess.run(["ip", "-n", host.ns, "-o", "link", "show", host.ifname],
                              capture_output=True, text=True, check=True).stdout
        if "state UP" in link:
            return
        time.sleep(0.01)
    raise TimeoutError(f"{host.ifname} in netns {host.ns} had no carrier after {timeout}s")


@contextmanager
def namespace(role: str = "ns", prefix: str = "ept") -> Iterator[str]:
    """A fresh namespace with loopback up; deleted on exit."""
    name = f"{prefix}-{os.getpid()}-{next(_serial)}-{role}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


@contextmanager
def two_hosts(prefix: str = "ept", net4: str = "10.201.0", net6: str = "fd00:201:") -> Iterator[TwoHosts]:
    """Two namespaces joined by a veth pair: client at .1/::1, pod at .2/::2.

    Both ends of the pair are created directly inside the namespaces, so the host's
    interface names are never touched; IPv6 addresses skip duplicate address detection
    (`nodad`) and are usable at once."""
    with ExitStack() as stack:
        client = Host(stack.enter_context(namespace("client", prefix)), f"{net4}.1", f"{net6}:1")
        pod = Host(stack.enter_context(namespace("pod", prefix)), f"{net4}.2", f"{net6}:2")
        _ip("link", "add", client.ifname, "netns", client.ns, "type", "veth",
            "peer", "name", pod.ifname, "netns", pod.ns)
        for host in (client, pod):
            _ip("-n", host.ns, "addr", "add", f"{host.v4}/24", "dev", host.ifname)
            _ip("-n", host.ns, "-6", "addr", "add", f"{host.v6}/64", "dev", host.ifname, "nodad")
            _ip("-n", host.ns, "link", "set", host.ifname, "up")
        for host in (client, pod):
            _wait_for_carrier(host)
        yield TwoHosts(client, pod)
