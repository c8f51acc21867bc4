"""Transparent interception in production shape (issue 3), with the real proxy.

Two hosts joined by a veth pair (tests/netns.py): a "client" host and a "pod" host.
The pod runs an app server, the logger element, the proxy and the rules of
`python -m proxy.interception.iptables install` in its own namespace, like a sidecar; the client
host runs the servers that the pod's app dials (outbound) and the client that dials
the pod's app (inbound).

Four proxies run side by side in the pod, on their own port pairs, for the whole
module (a proxy with an unreachable element spends 5 s waiting for it at start, so
they start together):

    uid     15002/15006  as uid 1337, rules --exclude-uid 1337
    mark    15012/15016  as root with --upstream-mark 0x539, rules --exclude-mark 0x539
    closed  15022/15026  element unreachable, --element-failure closed
    open    15032/15036  element unreachable, --element-failure open

A test installs the rules pointing at the proxy it exercises (`install` replaces the
previous install), so which proxy a connection reaches is decided by the rules alone.
Every server logs the peer of each connection it accepts: a captured connection
arrives from the proxy's upstream socket (the proxy logs its local address), an
uncaptured one from the dialer itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.netns import Host, TwoHosts, run_in, two_hosts
from tests.procs import Proc, start_element

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("iptables", "ip6tables", "setpriv")),
    reason="needs root, iptables/ip6tables and setpriv (CI installs them and runs as root)")

MiB = 1 << 20
SEND = 4 * MiB
SERVER_PORT = 7000
EXCLUDED_PORT = 7001
APP_PORT = 8080
MARK = "0x539"
PROXY_UID = "1337"
DEAD_ELEMENT = "127.0.0.1:1"  # nothing listens there in the pod
FAMILIES = ("v4", "v6")


@dataclass(frozen=True)
class ProxySpec:
    outbound: int
    inbound: int
    exclusion: tuple[str, ...]
    options: tuple[str, ...] = ()
    as_uid: bool = False
    element: str | None = None  # None: the logger element


PROXIES = {
    "uid": ProxySpec(15002, 15006, ("--exclude-uid", PROXY_UID), as_uid=True),
    "mark": ProxySpec(15012, 15016, ("--exclude-mark", MARK), ("--upstream-mark", MARK)),
    "closed": ProxySpec(15022, 15026, ("--exclude-mark", MARK), ("--upstream-mark", MARK, "--element-failure",
                                                                   "closed"), element=DEAD_ELEMENT),
    "open": ProxySpec(15032, 15036, ("--exclude-mark", MARK), ("--upstream-mark", MARK, "--element-failure", "open"),
                      element=DEAD_ELEMENT),
}

# A tests.traffic exchange server on several addresses that prints one JSON line per
# accepted connection, {"listen": ..., "peer": ...}: `traffic serve` does not say who connected.
PEER_SERVER = r"""
import json, sys, threading
from tests import traffic

class Logged(traffic.Server):
    def _accept_loop(self):
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            print(json.dumps({"listen": self.label, "peer": address(peer[0], peer[1])}), flush=True)
            threading.Thread(target=traffic._handle, args=(conn, self.mode, self.send), daemon=True).start()

def address(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

servers = []
for text in sys.argv[2:]:
    host, port = traffic.split_host_port(text)
    server = Logged(host, port, "exchange", int(sys.argv[1]))
    server.label = address(host, port)
    servers.append(server.__enter__())
print(json.dumps({"ready": [s.label for s in servers]}), flush=True)
threading.Event().wait()
"""


def addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def ip_of(host: Host, family: str) -> str:
    return host.v4 if family == "v4" else host.v6


def host_of(address: str) -> str:
    """The IP of an `IP:PORT` or `[IP]:PORT` string."""
    return address.rpartition(":")[0].strip("[]")


_FIELD = re.compile(r"(\w+)=(.*?)(?= \w+=|$)")


def events(log: str, message: str) -> list[dict[str, str]]:
    """The key=value fields of every `message` line of a proxy or logger-element log."""
    found = []
    for line in log.splitlines():
        match = re.search(rf"(?:^|\s){re.escape(message)} (.*)$", line)
        if match:
            found.append(dict(_FIELD.findall(match.group(1))))
    return found


class Cursor:
    """The part of a process's output written after the cursor was made."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.start = len(proc.output())

    def new(self) -> str:
        return self.proc.output()[self.start:]

    def new_once(self, text: str, timeout: float = 5.0) -> str:
        """new(), once it contains `text` or after `timeout`: the caller's assertion judges."""
        deadline = time.monotonic() + timeout
        while text not in (out := self.new()) and time.monotonic() < deadline:
            time.sleep(0.02)
        return out


@dataclass
class Topology:
    hosts: TwoHosts
    servers: Proc            # client host: SERVER_PORT and EXCLUDED_PORT, v4 and v6
    app: Proc                # pod: APP_PORT, v4 and v6
    logger: Proc             # pod: the logger element
    proxies: dict[str, Proc]
    installed: tuple[str, ...] | None = field(default=None)

    def install(self, mode: str, *extra: str) -> None:
        """Points the pod's rules at proxy `mode`; a no-op when they already say exactly that."""
        spec = PROXIES[mode]
        argv = ("--outbound-port", str(spec.outbound), "--inbound-port", str(spec.inbound), *spec.exclusion, *extra)
        if argv != self.installed:
            self.installed = None
            run_in(self.hosts.pod.ns, [sys.executable, "-m", "proxy.interception.iptables", "install", *argv])
            self.installed = argv


def proxy_argv(spec: ProxySpec, logger: str) -> list[str]:
    argv = [sys.executable, "-m", "proxy", "--log-level", "debug", "--admin", "off",
            "--element", spec.element or logger,
            *spec.options]
    for port in (spec.outbound, spec.inbound):
        argv += ["--listen", f"0.0.0.0:{port}", "--listen", f"[::]:{port}"]
    if spec.as_uid:
        # /root (where this Python and its packages live) is 0700: uid 1337 gets
        # CAP_DAC_READ_SEARCH to read it. The owner match sees uid 1337 all the same.
        argv = ["setpriv", "--reuid", PROXY_UID, "--regid", PROXY_UID, "--clear-groups",
                "--inh-caps", "+dac_read_search", "--ambient-caps", "+dac_read_search", *argv]
    return argv


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    with ExitStack() as stack:
        hosts = stack.enter_context(two_hosts(prefix="epi", net4="10.202.0", net6="fd00:202:"))
        client, pod = hosts.client, hosts.pod

        def peer_server(ns: str, *listen: str) -> Proc:
            proc = stack.enter_context(Proc([sys.executable, "-c", PEER_SERVER, str(SEND), *listen], netns=ns))
            return proc

        servers = peer_server(client.ns, *(addr(ip_of(client, f), p) for f in FAMILIES
                                           for p in (SERVER_PORT, EXCLUDED_PORT)))
        app = peer_server(pod.ns, *(addr(ip_of(pod, f), APP_PORT) for f in FAMILIES))
        logger, logger_port = start_element("elements.logger", netns=pod.ns)
        stack.callback(logger.stop)
        proxies = {mode: stack.enter_context(Proc(proxy_argv(spec, f"127.0.0.1:{logger_port}"), netns=pod.ns))
                   for mode, spec in PROXIES.items()}
        for proc in (servers, app):
            proc.wait_for_output('"ready"')
        for proc in proxies.values():
            proc.wait_for_output("element-proxy ready", timeout=15)
        stack.callback(run_in, pod.ns, [sys.executable, "-m", "proxy.interception.iptables", "uninstall"], check=False)
        yield Topology(hosts, servers, app, logger, proxies)


@dataclass
class Transfer:
    result: dict[str, object]
    seconds: float
    proxy: str      # what the proxy logged meanwhile
    server: str     # what the receiving server logged meanwhile
    logger: Cursor  # the logger element: an observe-mode tap may log its Open line a little later

    def explain(self) -> str:
        return (f"dial: {self.result} in {self.seconds:.2f}s\n--- proxy log (new) ---\n{self.proxy}"
                f"--- server peers (new) ---\n{self.server}--- logger element (new) ---\n{self.logger.new()}")


def transfer(topo: Topology, mode: str, ns: str, destination: str, server: Proc, closes: int = 0) -> Transfer:
    """Dials destination from ns (10 s timeout) and collects what each process logged meanwhile.

    `closes` is how many `connection closed` lines to wait for: the proxy logs a close
    just after the client reads the last byte."""
    proxy, peers, logger = Cursor(topo.proxies[mode]), Cursor(server), Cursor(topo.logger)
    started = time.monotonic()
    done = run_in(ns, [sys.executable, "-m", "tests.traffic", "dial", destination, "--send", str(SEND),
                       "--timeout", "10"], check=False, timeout=30)
    seconds = time.monotonic() - started
    result = json.loads(done.stdout) if done.stdout.strip() else {"ok": False, "stderr": done.stderr}
    deadline = time.monotonic() + 5
    while len(events(proxy.new(), "connection closed")) < closes and time.monotonic() < deadline:
        time.sleep(0.02)
    return Transfer(result, seconds, proxy.new(), peers.new(), logger)


def peers(log: str, listen: str) -> list[str]:
    return [entry["peer"] for line in log.splitlines() if line.startswith("{")
            for entry in [json.loads(line)] if entry.get("listen") == listen]


def assert_proxied_once(t: Transfer, *, client: str, destination: str, listener_port: int) -> None:
    """One connection captured, through the element, upstream connection not captured again."""
    why = t.explain()
    assert t.result.get("ok") is True and t.result.get("received") == SEND, why
    opened = events(t.proxy, "connection opened")
    assert len(opened) == 1, f"expected exactly one captured connection (no loop)\n{why}"
    conn = opened[0]
    assert host_of(conn["client"]) == client and conn["destination"] == destination, why
    assert conn["listener"].endswith(f":{listener_port}"), why
    closed = [c for c in events(t.proxy, "connection closed") if c["conn"] == conn["conn"]]
    assert len(closed) == 1 and closed[0]["outcome"] == "completed", why
    # every reply carries a 64-byte trailer (tests/traffic.py)
    assert (closed[0]["request_bytes"], closed[0]["response_bytes"]) == (str(SEND), str(SEND + 64)), why
    upstream = [u for u in events(t.proxy, "upstream connected") if u["conn"] == conn["conn"]]
    assert len(upstream) == 1, why
    assert peers(t.server, destination) == [upstream[0]["local"]], \
        f"the server should see exactly one connection, the proxy's upstream one\n{why}"
    logged = [o for o in events(t.logger.new_once(f"open id={conn['conn']} "), "open") if o["id"] == conn["conn"]]
    assert logged and logged[0]["client"] == conn["client"] and logged[0]["destination"] == destination, \
        f"the logger element should have seen the Open event\n{why}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["uid", "mark"])
def test_outbound_is_captured_once_through_the_element(topo: Topology, mode: str, family: str) -> None:
    topo.install(mode)
    if mode == "uid":
        status = Path(f"/proc/{topo.proxies['uid'].pid}/status").read_text()
        assert re.search(rf"^Uid:\s+{PROXY_UID}\s+{PROXY_UID}\s", status, re.M), status
    client, pod = topo.hosts.client, topo.hosts.pod
    destination = addr(ip_of(client, family), SERVER_PORT)
    t = transfer(topo, mode, pod.ns, destination, topo.servers, closes=1)
    assert_proxied_once(t, client=ip_of(pod, family), destination=destination, listener_port=PROXIES[mode].outbound)
    assert host_of(peers(t.server, destination)[0]) == ip_of(pod, family), t.explain()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["uid", "mark"])
def test_inbound_goes_through_the_inbound_port_to_the_app(topo: Topology, mode: str, family: str) -> None:
    topo.install(mode)
    client, pod = topo.hosts.client, topo.hosts.pod
    destination = addr(ip_of(pod, family), APP_PORT)
    t = transfer(topo, mode, client.ns, destination, topo.app, closes=1)
    assert_proxied_once(t, client=ip_of(client, family), destination=destination, listener_port=PROXIES[mode].inbound)


def assert_not_captured(t: Transfer, *, peer: str, destination: str) -> None:
    """The proxy never saw the connection; the server saw the dialer's own."""
    why = t.explain()
    assert t.result.get("ok") is True and t.result.get("received") == SEND, why
    assert events(t.proxy, "connection opened") == [], f"an excluded connection was captured\n{why}"
    seen = peers(t.server, destination)
    assert len(seen) == 1 and host_of(seen[0]) == peer, why


@pytest.mark.parametrize("family", FAMILIES)
def test_an_excluded_outbound_port_is_not_captured(topo: Topology, family: str) -> None:
    topo.install("mark", "--exclude-outbound-ports", str(EXCLUDED_PORT))
    client, pod = topo.hosts.client, topo.hosts.pod
    excluded = addr(ip_of(client, family), EXCLUDED_PORT)
    t = transfer(topo, "mark", pod.ns, excluded, topo.servers)
    assert_not_captured(t, peer=ip_of(pod, family), destination=excluded)
    captured = addr(ip_of(client, family), SERVER_PORT)  # control: the same rules capture other ports
    t = transfer(topo, "mark", pod.ns, captured, topo.servers, closes=1)
    assert_proxied_once(t, client=ip_of(pod, family), destination=captured, listener_port=PROXIES["mark"].outbound)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_excluded_cidr_is_not_captured_either_way(topo: Topology, family: str) -> None:
    client, pod = topo.hosts.client, topo.hosts.pod
    other = "v6" if family == "v4" else "v4"
    topo.install("mark", "--exclude-cidr", f"{ip_of(client, family)}/{32 if family == 'v4' else 128}")
    outbound = addr(ip_of(client, family), SERVER_PORT)
    t = transfer(topo, "mark", pod.ns, outbound, topo.servers)
    assert_not_captured(t, peer=ip_of(pod, family), destination=outbound)
    inbound = addr(ip_of(pod, family), APP_PORT)
    t = transfer(topo, "mark", client.ns, inbound, topo.app)
    assert_not_captured(t, peer=ip_of(client, family), destination=inbound)  # the app sees the client itself
    captured = addr(ip_of(client, other), SERVER_PORT)  # control: the other family's peer is still captured
    t = transfer(topo, "mark", pod.ns, captured, topo.servers, closes=1)
    assert_proxied_once(t, client=ip_of(pod, other), destination=captured, listener_port=PROXIES["mark"].outbound)


def endpoints(topo: Topology, direction: str, family: str) -> tuple[str, str, Proc]:
    """Where to dial from, what to dial, and the server that would answer."""
    client, pod = topo.hosts.client, topo.hosts.pod
    if direction == "outbound":
        return pod.ns, addr(ip_of(client, family), SERVER_PORT), topo.servers
    return client.ns, addr(ip_of(pod, family), APP_PORT), topo.app


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("direction", ["outbound", "inbound"])
def test_fail_closed_resets_promptly_before_dialing(topo: Topology, direction: str, family: str) -> None:
    """The default policy: while the element is unreachable nothing passes, and nothing hangs."""
    topo.install("closed")
    ns, destination, server = endpoints(topo, direction, family)
    t = transfer(topo, "closed", ns, destination, server, closes=1)
    why = t.explain()
    # reset during the handshake (connect fails) or after it (the read fails), or closed
    assert t.result.get("ok") is False and t.result.get("received", 0) == 0, why
    assert "reset" in str(t.result).lower() or t.result.get("detail") == "reply shorter than its trailer", why
    assert t.seconds < 3, f"the reset should be prompt\n{why}"
    opened = events(t.proxy, "connection opened")
    assert len(opened) == 1 and opened[0]["destination"] == destination, why
    closed = events(t.proxy, "connection closed")
    assert len(closed) == 1 and closed[0]["outcome"] == "failure", why
    assert events(t.proxy, "upstream connected") == [] and peers(t.server, destination) == [], \
        f"fail-closed must not dial the destination\n{why}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("direction", ["outbound", "inbound"])
def test_fail_open_passes_the_bytes_unprocessed(topo: Topology, direction: str, family: str) -> None:
    topo.install("open")
    ns, destination, server = endpoints(topo, direction, family)
    t = transfer(topo, "open", ns, destination, server, closes=1)
    why = t.explain()
    assert t.result.get("ok") is True and t.result.get("received") == SEND, why
    assert t.seconds < 5, why
    opened = events(t.proxy, "connection opened")
    assert len(opened) == 1 and opened[0]["destination"] == destination, why
    closed = events(t.proxy, "connection closed")
    assert len(closed) == 1 and closed[0]["outcome"] == "completed", why
    upstream = events(t.proxy, "upstream connected")
    assert len(upstream) == 1 and peers(t.server, destination) == [upstream[0]["local"]], why
