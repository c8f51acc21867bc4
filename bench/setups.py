"""The servers and the set-ups: each set-up is a way to reach the same iperf3 and redis servers.

`direct` dials the servers, `haproxy` goes through haproxy (mode tcp, one thread),
`minimal` through the least a uvloop forwarder can do (bench/min_forwarder.py: what the
runtime allows), the others go through element-proxy with a chain of element processes.
`guard1` (elements.redis_guard) speaks Redis only, so it is set up in front of redis alone.
TARGET_ADDR is a single target, so each proxied set-up runs one front process per target
server (one for iperf3, one for redis), each with its own element processes, and haproxy
and the minimal forwarder are run the same way: the peak RSS of a front under bulk then
belongs to bulk alone.

`ro3` is three passthroughs that say they are read-only (one parallel stage: asked at once),
against `pass3`'s three in sequence. `detect1` and `shadow1` run the passthrough in the
operator's detect and shadow modes (never waited for), against `empty` and `observe1`.
`pass1-unix` is `pass1` with its element on a unix domain socket instead of TCP loopback.

`pass1x2` runs its one element as two replicas (127.0.0.2 and 127.0.0.3, the same port)
behind one name, as a scaled element is run: the proxy resolves the name from a hosts file
bind-mounted on /etc/hosts in a mount namespace of its own (`unshare --mount`: needs root),
and spreads its connections over both.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import Proc, Procs, free_port

TARGETS = ("iperf", "redis", "http")

# element-proxy set-ups: name -> element modules (with their options), in chain order
CHAINS: dict[str, list[str]] = {
    "empty": [],
    "pass1": ["elements.passthrough"],
    "pass3": ["elements.passthrough"] * 3,
    "ro3": ["elements.passthrough --read-only"] * 3,
    "observe1": ["bench.observe_element"],
    "detect1": ["elements.passthrough"],
    "shadow1": ["elements.passthrough"],
    "pass1-unix": ["elements.passthrough"],
    "pass1x2": ["elements.passthrough"],
    "guard1": ["elements.redis_guard --deny FLUSHALL,FLUSHDB,DEBUG"],
}
# set-ups whose elements the proxy runs in an operator's mode (--element-mode)
MODES = {"detect1": "detect", "shadow1": "shadow"}
# set-ups whose elements listen on a unix domain socket (--unix), not on TCP loopback
UNIX = frozenset(("pass1-unix",))
# set-ups whose element runs as replicas behind one name: set-up -> the replicas' addresses
REPLICAS = {"pass1x2": ("127.0.0.2", "127.0.0.3")}
REPLICA_NAME = "bench-replicas"
# the targets a set-up is put in front of, where not both
ONLY = {"guard1": ("redis",)}
# the default run: pass1x2 needs root (a mount namespace), so it runs when asked for
SETUPS = ["direct", "haproxy", "minimal", *(name for name in CHAINS if name not in REPLICAS)]
KNOWN_SETUPS = [*SETUPS, *REPLICAS]
MIN_FORWARDER = str(Path(__file__).resolve().parent / "min_forwarder.py")

HAPROXY_CFG = """\
global
    nbthread 1
    maxconn {maxconn}
defaults
    mode tcp
    timeout connect 5s
    timeout client 5m
    timeout server 5m
frontend front
    bind 127.0.0.1:{listen}
    default_backend back
backend back
    server target 127.0.0.1:{target}
"""
# The HTTP server `ab` talks to: haproxy answering every request itself, so the origin is
# never the bottleneck of a connection-per-request workload.
HTTP_ORIGIN_CFG = """\
global
    nbthread 1
    maxconn {maxconn}
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend origin
    bind 127.0.0.1:{listen}
    http-request return status 200 content-type text/plain string ok
"""


@dataclass
class Front:
    """The process(es) one set-up puts in front of one target server."""

    port: int
    proc: Proc | None = None
    argv: list[str] = field(default_factory=list)
    elements: list[Proc] = field(default_factory=list)
    restarts: int = 0


@dataclass
class Setup:
    name: str
    fronts: dict[str, Front]

    @property
    def proxied(self) -> bool:
        return self.name in CHAINS


class Stack:
    """Starts the servers and every set-up once; restarts what dies, by PID."""

    def __init__(self, procs: Procs, work_dir: Path, max_fds: int) -> None:
        self.procs = procs
        self.work_dir = work_dir
        self.max_fds = max_fds
        self.server_ports = {"iperf": free_port(), "redis": free_port(), "http": free_port()}
        self.servers: dict[str, Proc] = {}
        self.setups: dict[str, Setup] = {}

    # servers -------------------------------------------------------------
    def start_servers(self) -> None:
        self.start_iperf()
        port = self.server_ports["redis"]
        self.servers["redis"] = self.procs.start("redis", [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--maxclients", "20000", "--loglevel", "warning"])
        self.servers["redis"].wait_listening([port])
        port = self.server_ports["http"]
        cfg = self.work_dir / "http-origin.cfg"
        cfg.write_text(HTTP_ORIGIN_CFG.format(maxconn=(self.max_fds - 100) // 2, listen=port))
        self.servers["http"] = self.procs.start("http-origin", ["haproxy", "-f", str(cfg), "-db"])
        self.servers["http"].wait_listening([port])

    def start_iperf(self) -> None:
        """(Re)starts `iperf3 -s`: a failed test can leave it busy, and it serves one test at a time."""
        old = self.servers.get("iperf")
        if old is not None:
            self.procs.stop(old)
        port = self.server_ports["iperf"]
        self.servers["iperf"] = self.procs.start("iperf3-server", ["iperf3", "-s", "-p", str(port), "-B", "127.0.0.1"])
        self.servers["iperf"].wait_listening([port])

    # set-ups ---------------------------------------------------------------
    def start_setups(self, names: list[str]) -> None:
        if "direct" in names:
            self.setups["direct"] = Setup("direct", {t: Front(self.server_ports[t]) for t in TARGETS})
        if "haproxy" in names:
            self.setups["haproxy"] = Setup("haproxy", {t: self.start_haproxy(t) for t in TARGETS})
        if "minimal" in names:
            self.setups["minimal"] = Setup("minimal", {t: self.start_minimal(t) for t in TARGETS})
        proxied = [name for name in names if name in CHAINS]
        # every element first (in parallel), then every proxy
        pending: dict[tuple[str, str], tuple[list[Proc], list[int]]] = {}
        for name in proxied:
            hosts = REPLICAS.get(name, ("127.0.0.1",))
            for target in ONLY.get(name, TARGETS):
                ports = [free_port() for _ in CHAINS[name]]
                elements = [self.start_element(spec, port, f"{name}-{target}-el{i}"
                                               + (f"-{host}" if name in REPLICAS else ""), host,
                                               self.socket_path(name, target, i) if name in UNIX else None)
                            for i, (spec, port) in enumerate(zip(CHAINS[name], ports)) for host in hosts]
                pending[name, target] = (elements, ports)
        for name, _ in pending:
            if name in REPLICAS and os.geteuid() != 0:
                raise RuntimeError(f"set-up {name} needs root: its proxy runs in a mount namespace of its own")
        for (name, target), (elements, ports) in pending.items():
            hosts = REPLICAS.get(name, ("127.0.0.1",))
            for i, (proc, (port, host)) in enumerate(zip(elements, [(port, host) for port in ports for host in hosts])):
                if name in UNIX:
                    proc.wait_unix(self.socket_path(name, target, i))
                else:
                    proc.wait_listening([port], host=host)
        for name in proxied:
            fronts = {}
            for target in ONLY.get(name, TARGETS):
                elements, ports = pending[name, target]
                front = Front(free_port(), elements=elements)
                addresses = ([f"unix:{self.socket_path(name, target, i)}" for i in range(len(ports))] if name in UNIX
                             else [f"{REPLICA_NAME if name in REPLICAS else '127.0.0.1'}:{port}" for port in ports])
                front.argv = self.proxy_argv(front.port, target, addresses, self.replicas_hosts(name, target),
                                             MODES.get(name))
                front.proc = self.procs.start(f"proxy-{name}-{target}", front.argv)
                fronts[target] = front
            self.setups[name] = Setup(name, fronts)
        for name in proxied:
            for front in self.setups[name].fronts.values():
                self.wait_proxy(front)

    def start_element(self, spec: str, port: int, label: str, host: str = "127.0.0.1",
                      unix: Path | None = None) -> Proc:
        listen = ["--unix", str(unix)] if unix else ["--host", host, "--port", str(port)]
        return self.procs.start(label, [sys.executable, "-m", *spec.split(), *listen, "--log-level", "warning"])

    def socket_path(self, name: str, target: str, index: int) -> Path:
        return self.work_dir / f"{name}-{target}-el{index}.sock"

    def replicas_hosts(self, name: str, target: str) -> Path | None:
        """The hosts file that names the set-up's replicas, for its proxy's /etc/hosts."""
        if name not in REPLICAS:
            return None
        path = self.work_dir / f"hosts-{name}-{target}"
        path.write_text("127.0.0.1 localhost\n" + "".join(f"{host} {REPLICA_NAME}\n" for host in REPLICAS[name]))
        return path

    def start_minimal(self, target: str) -> Front:
        front = Front(free_port())
        front.argv = [sys.executable, MIN_FORWARDER, "--listen-port", str(front.port),
                      "--target-port", str(self.server_ports[target])]
        front.proc = self.procs.start(f"minimal-{target}", front.argv)
        front.proc.wait_listening([front.port])
        return front

    def start_haproxy(self, target: str, label: str = "") -> Front:
        front = Front(free_port())
        cfg = self.work_dir / f"haproxy-{target}{label}.cfg"
        # haproxy needs two descriptors per proxied connection
        cfg.write_text(HAPROXY_CFG.format(maxconn=(self.max_fds - 100) // 2, listen=front.port,
                                          target=self.server_ports[target]))
        front.argv = ["haproxy", "-f", str(cfg), "-db"]
        front.proc = self.procs.start(f"haproxy-{target}{label}", front.argv)
        front.proc.wait_listening([front.port])
        return front

    def start_proxy(self, name: str, target: str, label: str = "") -> Front:
        """A fresh element-proxy with no element (the idle-connection test uses it)."""
        assert name == "empty"
        front = Front(free_port())
        front.argv = self.proxy_argv(front.port, target, [])
        front.proc = self.procs.start(f"proxy-{name}-{target}{label}", front.argv)
        self.wait_proxy(front)
        return front

    def proxy_argv(self, port: int, target: str, elements: list[str], hosts: Path | None = None,
                   mode: str | None = None) -> list[str]:
        """Defaults otherwise; each proxy gets its own admin port (the default 15000 would collide).
        With `hosts`, the elements are named REPLICA_NAME, which that file resolves, in the proxy's
        own mount namespace."""
        argv = [sys.executable, "-m", "proxy", "--listen", f"127.0.0.1:{port}",
                "--target", f"127.0.0.1:{self.server_ports[target]}",
                *[arg for element in elements for arg in ("--element", element)],
                *(["--element-mode", mode] if mode else []),
                "--admin", f"127.0.0.1:{free_port()}", "--event-loop", "uvloop", "--log-level", "warning"]
        if hosts is None:
            return argv
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount --bind "$0" /etc/hosts && '
                'exec "$@"', str(hosts), *argv]

    def wait_proxy(self, front: Front) -> None:
        """Ready = listening. The proxy listens once every element session is up, or after 5 s
        without one; "element-proxy ready" is logged at info, which --log-level warning hides,
        so a start without an element is caught by its warning instead."""
        assert front.proc is not None
        front.proc.wait_listening([front.port])
        if "not reachable at start" in front.proc.output():
            raise RuntimeError(f"{front.proc.name}: an element was not up:\n{front.proc.tail()}")

    def restart_front(self, front: Front) -> None:
        """Starts a dead proxy again on the same port, so the remaining figures are still measured."""
        assert front.proc is not None
        self.procs.stop(front.proc)
        base = front.proc.name.split("-restart")[0]
        front.proc = self.procs.start(f"{base}-restart{front.restarts + 1}", front.argv)
        front.restarts += 1
        front.proc.wait_listening([front.port])
