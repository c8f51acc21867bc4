"""An element as a fleet of replicas (issue 17): three recorder elements on 127.0.0.2, .3 and .4,
the same port, behind one name that only the proxy can resolve: it runs under `unshare --mount`
with a hosts file of the test's bind-mounted on /etc/hosts, so the system resolver (getaddrinfo)
answers with the test's replicas and the host's own /etc/hosts is never touched. The file is
rewritten in place to add or remove a replica while the proxy runs.

Every replica logs every event it gets (tests/elements_for_tests/recorder.py), so its log says
which connections it served; the Upstream of tests/test_reliability.py records the sha256 of
each connection's bytes, so transfers are judged byte-exact at both ends.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TypeVar

import pytest

from tests.checks import wait_for
from tests.procs import Proc, free_port, start_element
from tests.test_reliability import EXCHANGE, KiB, Proxy, Side, Upstream, client, judge_pair, run_async

T = TypeVar("T")
RECORDER = "tests.elements_for_tests.recorder"
NAME = "replicas.test"
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
IS_ROOT = os.geteuid() == 0
pytestmark = pytest.mark.skipif(not IS_ROOT, reason="needs root: the proxy runs in a mount namespace of its own "
                                                    "(unshare --mount) with the test's hosts file on /etc/hosts")
OPEN = re.compile(r"^event open (\S+) resumed=(\d)$", re.M)
EVENT = re.compile(r"^event \w+ (\S+)", re.M)


class Replica:
    """One recorder process on host:port, restartable on the same address."""

    def __init__(self, stack: ExitStack, host: str, port: int, *options: str) -> None:
        self.stack, self.host, self.port, self.options = stack, host, port, options
        self.runs: list[Proc] = []
        self.start()

    def start(self) -> None:
        proc, _ = start_element(RECORDER, "--host", self.host, *self.options, port=self.port, host=self.host)
        self.stack.callback(proc.stop)
        self.runs.append(proc)

    @property
    def proc(self) -> Proc:
        return self.runs[-1]

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def opens(self, run: int = -1) -> dict[str, int]:
        """Connection id -> resumed (0/1), of every Open this run of the replica got."""
        return {cid: int(resumed) for cid, resumed in OPEN.findall(self.runs[run].output())}

    def seen(self) -> set[str]:
        """Every connection id any run of this replica got any event of."""
        return {cid for proc in self.runs for cid in EVENT.findall(proc.output())}


class Fleet:
    """The replicas, the hosts file naming them, the upstream and the proxy in its namespace."""

    def __init__(self, tmp_path: Path, stack: ExitStack) -> None:
        self.tmp_path, self.stack = tmp_path, stack
        self.hosts = tmp_path / "hosts"
        self.port = free_port(HOSTS[0])
        self.replicas: dict[str, Replica] = {}
        self.upstream = Upstream()
        stack.callback(self.upstream.close)
        self.procs: list[tuple[str, Proc]] = []

    def replica(self, host: str, *options: str) -> Replica:
        replica = self.replicas[host] = Replica(self.stack, host, self.port, *options)
        self.procs.append((f"replica {host}", replica.proc))
        return replica

    def name(self, *hosts: str) -> None:
        """(Re)writes the hosts file in place (the bind mount follows the inode, not the path)."""
        with self.hosts.open("r+" if self.hosts.exists() else "w") as file:
            file.seek(0)
            file.truncate()
            file.write("127.0.0.1 localhost\n" + "".join(f"{host} {NAME}\n" for host in hosts))

    def proxy(self, *options: str) -> Proxy:
        port, admin = free_port(), free_port()
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /etc/hosts && exec "$@"', str(self.hosts),
                sys.executable, "-m", "proxy", "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                "--log-format", "json", "--log-level", "info", "--target", f"127.0.0.1:{self.upstream.port}",
                "--element", f"{NAME}:{self.port}", "--element-resolve-interval-ms", "200", *options]
        proc = Proc(argv)
        self.stack.callback(proc.stop)
        self.procs.append(("proxy", proc))
        proc.wait_for_output("element-proxy ready")
        return Proxy(proc, port, admin)

    def up(self, *replica_options: str, proxy_options: tuple[str, ...] = ()) -> Proxy:
        """The three replicas, named, and a proxy using them all."""
        for host in HOSTS:
            self.replica(host, *replica_options)
        self.name(*HOSTS)
        p = self.proxy(*proxy_options)
        self.wait_up(p, *HOSTS)
        return p

    def wait_up(self, proxy: Proxy, *hosts: str) -> None:
        wanted = {self.replicas[host].address for host in hosts}
        wait_for(lambda: endpoints(proxy, "up") == dict.fromkeys(wanted, 1.0), 10, f"sessions up to {sorted(wanted)}")

    def dump(self) -> None:
        for name, proc in self.procs:
            lines = [line for line in proc.output().splitlines() if not line.startswith("event data")]
            print(f"----- {name} (pid {proc.pid}): last lines")
            print("\n".join(lines[-40:]))


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with ExitStack() as stack:
        made = Fleet(tmp_path, stack)
        try:
            yield made
        finally:
            made.dump()


def endpoints(proxy: Proxy, what: str) -> dict[str, float]:
    """element_proxy_element_endpoint_<what> by replica address."""
    found = {}
    for line in proxy.metrics().splitlines():
        if line.startswith(f"element_proxy_element_endpoint_{what}{{"):
            endpoint = line.split('endpoint="', 1)[1].split('"', 1)[0]
            found[endpoint] = float(line.rsplit(" ", 1)[1])
    return found


def transfers(proxy: Proxy, upstream: Upstream, keys: range, size: int, pace: float = 0.0,
              sides: dict[int, Side] | None = None) -> dict[int, Side]:
    """One EXCHANGE per key, all at once: `size` bytes each way, in 16 KiB pieces `pace` s apart."""
    sides = sides if sides is not None else {key: Side() for key in keys}

    async def main() -> None:
        await asyncio.gather(*(client(proxy.port, key, EXCHANGE, size, size, piece=16 * KiB, pace=pace,
                                      side=sides[key]) for key in keys))

    run_async(main(), 120)
    return sides


def judged(upstream: Upstream, sides: dict[int, Side]) -> dict[int, str | None]:
    """Why each client/upstream pair is wrong (None: byte-exact), once the upstream's side ended too."""
    return {key: judge_pair(EXCHANGE, side, upstream.record(key, 10)) for key, side in sides.items()}


# --- spread -----------------------------------------------------------------------------------------

def test_three_replicas_share_300_connections_each_served_by_exactly_one(fleet: Fleet) -> None:
    """300 connections through three replicas: each replica holds 20-47% of them, every event of a
    connection reached the one replica its Open did, every transfer is byte-exact, and /readyz and
    /metrics list the three replicas up with their connections and events."""
    p = fleet.up()
    sides = transfers(p, fleet.upstream, range(300), 64 * KiB)
    assert all(problem is None for problem in judged(fleet.upstream, sides).values()), judged(fleet.upstream, sides)
    p.wait_closed(300)
    ids = {entry["conn"] for entry in p.closed()}
    opened = {host: set(fleet.replicas[host].opens()) for host in HOSTS}
    share = {host: len(opened[host]) / 300 for host in HOSTS}
    print(f"share of 300 connections per replica: {share}")
    assert all(0.20 <= part <= 0.47 for part in share.values()), share
    assert set().union(*opened.values()) == ids, "a connection's Open reached no replica"
    for host in HOSTS:
        others = set().union(*(opened[h] for h in HOSTS if h != host))
        stray = fleet.replicas[host].seen() & others
        assert not stray, f"{host} got events of connections another replica had opened: {sorted(stray)[:5]}"
        assert not any(fleet.replicas[host].opens().values()), f"{host} got resumed Opens"
    events = endpoints(p, "events_total")
    assert set(events) == {fleet.replicas[h].address for h in HOSTS} and all(n > 300 for n in events.values()), events
    assert set(endpoints(p, "connections").values()) == {0.0}
    status, body = p.get("/readyz")
    assert status == 200 and all(f'"{fleet.replicas[h].address}"' in body for h in HOSTS), body


def test_ipv4_and_ipv6_replicas_behind_one_name(fleet: Fleet) -> None:
    """A name with an A and an AAAA record: one replica on 127.0.0.5, one on ::1, both used."""
    v4, v6 = fleet.replica("127.0.0.5"), fleet.replica("::1")
    fleet.name("127.0.0.5", "::1")
    p = fleet.proxy()
    fleet.wait_up(p, "127.0.0.5", "::1")
    sides = transfers(p, fleet.upstream, range(40), 4 * KiB)
    assert all(problem is None for problem in judged(fleet.upstream, sides).values())
    assert v4.opens() and v6.opens(), (len(v4.opens()), len(v6.opens()))
    assert len(v4.opens()) + len(v6.opens()) == 40


# --- a replica lost, a replica draining ----------------------------------------------------------------

def under_load(p: Proxy, sides: dict[int, Side], size: int, pace: float, during: Callable[[], T]) -> T:
    """Paced transfers of `size` bytes each way; once every one is under way, `during()` runs (in a
    thread); returns what it returned, when every transfer has ended."""
    async def main() -> T:
        tasks = [asyncio.create_task(client(p.port, key, EXCHANGE, size, size, piece=16 * KiB, pace=pace, side=side))
                 for key, side in sides.items()]
        await asyncio.to_thread(wait_for, lambda: all(side.received > 64 * KiB for side in sides.values()), 30,
                                "every transfer under way")
        result = await asyncio.to_thread(during)
        await asyncio.gather(*tasks)
        return result

    return run_async(main(), 120)


def placement(p: Proxy, fleet: Fleet) -> dict[str, str]:
    """The client address of every connection the proxy closed -> the replica its first (not resumed)
    Open reached, read from the proxy's and the replicas' logs."""
    first = {cid: host for host, replica in fleet.replicas.items() for run in range(len(replica.runs))
             for cid, resumed in replica.opens(run).items() if not resumed}
    return {entry["client"]: first.get(entry["conn"], "none") for entry in p.closed()}


def test_sigkill_one_replica_resets_its_fail_closed_connections_only_and_new_ones_avoid_it(fleet: Fleet) -> None:
    """30 paced transfers over three replicas that reset resumed connections (as the firewall does);
    SIGKILL one: its connections are reset (events in flight: the failure policy; the rest: re-announced
    and reset by the replica they moved to), the others finish byte-exact, the proxy stops using it
    within 1 s, new connections all succeed on the other two; restarted, it gets new connections again."""
    p = fleet.up("--reset-resumed")
    sides = {key: Side() for key in range(30)}
    victim = fleet.replicas[HOSTS[1]]

    def kill() -> float:
        os.kill(victim.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: endpoints(p, "up").get(victim.address) == 0, 5, "the proxy sees the replica down")
        return time.monotonic() - killed

    noticed = under_load(p, sides, 4 << 20, 0.01, kill)
    print(f"the proxy saw the replica gone {noticed:.3f}s after the SIGKILL")
    assert noticed < 1.0
    p.wait_closed(30)
    where = placement(p, fleet)
    results = judged(fleet.upstream, sides)
    on_victim = [key for key, side in sides.items() if where[side.local] == HOSTS[1]]
    print(f"connections per replica: {collections.Counter(where[side.local] for side in sides.values())}")
    assert on_victim, "no connection was on the killed replica"
    outcome = {entry["client"]: entry["outcome"] for entry in p.closed()}
    for key, side in sides.items():
        if where[side.local] != HOSTS[1]:
            assert results[key] is None, (key, where[side.local], results[key])
            continue
        assert outcome[side.local] in ("failure", "reset_by_element"), (key, outcome[side.local])
        server = fleet.upstream.record(key)
        for receiver, sender in ((server, side), (side, server)):  # a direction cut short ends in a reset
            if receiver.received < sender.sent:
                assert receiver.read_end == "reset", (key, receiver.read_end, results[key])
            if receiver.read_end == "eof":
                assert receiver.rx.digest() == sender.tx.digest(), (key, "a clean EOF after a short stream")
    fresh = transfers(p, fleet.upstream, range(100, 130), 16 * KiB)
    assert all(problem is None for problem in judged(fleet.upstream, fresh).values()), \
        "a new connection went to the dead replica"
    victim.start()
    fleet.procs.append(("replica restarted", victim.proc))
    fleet.wait_up(p, *HOSTS)
    transfers(p, fleet.upstream, range(200, 230), 4 * KiB)
    assert victim.opens(), "the restarted replica got no new connection"


def test_sigkill_one_replica_fail_open_re_announces_its_connections_to_the_others(fleet: Fleet) -> None:
    """Fail-open, replicas that keep resumed connections: SIGKILL one under load and every transfer still
    finishes byte-exact; the killed replica's connections reached the others as resumed Opens."""
    p = fleet.up(proxy_options=("--element-failure", "open"))
    sides = {key: Side() for key in range(30)}
    victim = fleet.replicas[HOSTS[2]]
    under_load(p, sides, 2 << 20, 0.01, lambda: os.kill(victim.proc.pid, signal.SIGKILL))
    results = judged(fleet.upstream, sides)
    assert all(problem is None for problem in results.values()), {k: v for k, v in results.items() if v}
    p.wait_closed(30)
    where = placement(p, fleet)
    moved = {entry["conn"] for entry in p.closed() if where[entry["client"]] == HOSTS[2]}
    resumed = {cid for host in HOSTS[:2] for cid, flag in fleet.replicas[host].opens().items() if flag}
    assert moved and moved == resumed, (sorted(moved), sorted(resumed))


def test_sigterm_drains_a_replica_losing_no_connection(fleet: Fleet) -> None:
    """20 paced transfers over three replicas; SIGTERM one (the SDK drains: NOT_SERVING, GOAWAY, its
    open connections go on): none is reset, the proxy marks it draining, new connections avoid it,
    and it exits 0 once its connections ended."""
    p = fleet.up()
    sides = {key: Side() for key in range(20)}
    draining = fleet.replicas[HOSTS[0]]

    def terminate() -> None:
        os.kill(draining.proc.pid, signal.SIGTERM)
        wait_for(lambda: endpoints(p, "draining").get(draining.address) == 1, 5, "the proxy sees the replica draining")

    under_load(p, sides, 1 << 20, 0.02, terminate)
    before = set(draining.opens())
    fresh = transfers(p, fleet.upstream, range(100, 130), 16 * KiB)
    results = judged(fleet.upstream, {**sides, **fresh})
    assert all(problem is None for problem in results.values()), results
    assert collections.Counter(e["outcome"] for e in p.wait_closed(50)) == {"completed": 50}
    where = placement(p, fleet)
    assert any(where[side.local] == HOSTS[0] for side in sides.values()), "no connection was on the draining replica"
    assert set(draining.opens()) == before, "the draining replica got new connections"
    assert draining.proc.popen.wait(10) == 0
    assert "drained" in draining.proc.output()


# --- replicas listed and unlisted while the proxy runs ----------------------------------------------

def test_replicas_come_and_go_with_resolution_moving_no_open_connection(fleet: Fleet) -> None:
    """The name resolves to nothing at first: fail-closed resets, /readyz says why. Then two replicas
    are listed, then a third while 20 paced transfers run on the two: none of them moves (no resumed
    Open anywhere), new connections reach all three. Then one is unlisted mid-transfer: its open
    connections finish byte-exact on it, new ones avoid it, and its session ends with its last one."""
    for host in HOSTS:
        fleet.replica(host)
    fleet.name()
    p = fleet.proxy()
    status, body = p.get("/readyz")
    assert status == 503 and f"{NAME}:{fleet.port} does not resolve" in body, body
    assert transfers_fail(p)
    fleet.name(*HOSTS[:2])
    fleet.wait_up(p, *HOSTS[:2])
    sides = {key: Side() for key in range(20)}
    third = fleet.replicas[HOSTS[2]]

    def list_the_third() -> None:
        fleet.name(*HOSTS)
        fleet.wait_up(p, *HOSTS)

    under_load(p, sides, 1 << 20, 0.02, list_the_third)
    fresh = transfers(p, fleet.upstream, range(100, 130), 4 * KiB)
    assert all(problem is None for problem in judged(fleet.upstream, {**sides, **fresh}).values())
    assert not any(flag for r in fleet.replicas.values() for flag in r.opens().values()), "a connection moved"
    assert third.opens(), "the replica listed later got no new connection"
    assert not set(third.opens()) & {e["conn"] for e in p.closed() if e["client"] in {s.local for s in sides.values()}}

    sides = {key: Side() for key in range(200, 220)}
    leaving = fleet.replicas[HOSTS[0]]

    def unlist_the_first() -> set[str]:
        fleet.name(*HOSTS[1:])
        wait_for(lambda: any(e.get("removed") == [leaving.address] for e in p.lines()), 5, "the proxy unlisted it")
        assert leaving.address in endpoints(p, "up"), "unlisted, its session must stay while it has connections"
        return set(leaving.opens())

    had = under_load(p, sides, 1 << 20, 0.02, unlist_the_first)
    assert all(problem is None for problem in judged(fleet.upstream, sides).values())
    fresh = transfers(p, fleet.upstream, range(300, 330), 4 * KiB)
    assert all(problem is None for problem in judged(fleet.upstream, fresh).values())
    assert set(leaving.opens()) == had, "the unlisted replica got new connections"
    assert had & {e["conn"] for e in p.closed() if e["client"] in {side.local for side in sides.values()}}, \
        "no open connection was on the unlisted replica"
    assert not any(flag for r in fleet.replicas.values() for flag in r.opens().values()), "a connection moved"
    wait_for(lambda: leaving.address not in endpoints(p, "up"), 5, "the unlisted replica's session ended")


def transfers_fail(p: Proxy) -> bool:
    """A connection while the element's name resolves to nothing: fail-closed resets it."""
    from tests.test_enforcement import send_and_end
    return send_and_end(p.port, b"hello") == "reset"
