"""One element as the fleet of replicas its address stands for: a session per replica, and which
connection uses which.

An IP address is one replica. A name is resolved (resolve.py), and every address it resolves to
gets a session of its own (session.py). To a flow the fleet is one element (chain.ElementPort):
it assigns each new connection to a replica that can take it (assign.py: rendezvous hashing)
and routes every later event of that connection there.

Which replicas can take a new connection: up, not draining (drain.py), breaker closed. When
none can, the ones that are up (a draining replica still serves), else any listed one: its
session then answers with the failure policy, as for a lone element that is down.

A replica that is lost (its session went down) has its events in flight answered by the
failure policy (session.py); its other live connections are announced, as resumed, to the
replica each hashes to among those that can take them, if any (else they wait for it to come
back, as with a lone element). The element's verdict on that resumed Open decides whether the
connection goes on: an element that keeps per-connection state (the firewall) resets it by
default. A replica that resolution no longer lists gets no new connection and keeps its open
ones until they end (or it is lost); then its session is stopped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from elements.api import element_pb2 as pb
from elements.logs import fields
from proxy.chain import Direction, ElementPort, HoldingTarget, Outcome, Payload, Peer, VerdictTarget
from proxy.config import ElementConfig, parse_host_port
from proxy.operations import stats
from proxy.sessions.assign import rendezvous
from proxy.sessions.endpoint import Endpoint
from proxy.sessions.resolve import Resolution
from proxy.sessions.session import ElementSession
from proxy.sessions.validate import VerdictLimits

log = logging.getLogger("proxy.session")


class Fleet:
    """`on_change` replans the chain when a replica comes, goes, drains or describes itself."""

    def __init__(self, index: int, config: ElementConfig, on_change: Callable[[], None],
                 limits: VerdictLimits) -> None:
        self.index = index
        self.config = config
        self._on_change = on_change
        self._limits = limits
        self.sessions: dict[str, ElementSession] = {}  # by address, the replicas resolution lists
        self._retiring: dict[str, ElementSession] = {}  # no longer listed, kept while they have connections
        self._unresolved: ElementSession | None = None  # answers by policy until the name resolves
        self._assigned: dict[str, ElementSession] = {}
        self._takers: list[ElementSession] = []  # who gets new connections, as of the last change
        self._keys: list[bytes] = []
        self._was_up: set[str] = set()
        self._ended: dict[str, Any] = {}  # the counters of sessions stopped, so totals never go back
        self._stopping: set[asyncio.Task[None]] = set()
        address = None if config.unix else parse_host_port("address", config.address)
        self.resolution: Resolution | None = None
        self.port: ElementPort = self
        if address is None:  # a unix socket: one replica for ever, as an IP address is
            self.port = self.sessions[config.address] = self._session(config.address)
        elif address.is_ip:
            # one replica for ever: flows talk to its session straight, with no routing per event
            self.port = self.sessions[str(address)] = self._session(str(address))
        else:
            self.resolution = Resolution(address, config.resolve_interval_ms, lambda: self.name, self._resolved)
        self._update_takers()

    def _session(self, address: str) -> ElementSession:
        return ElementSession(self.index, self.config, self._changed, self._limits, Endpoint(address, self.config))

    # --- what the chain asks ------------------------------------------------------------------

    @property
    def name(self) -> str:
        for session in self.sessions.values():
            if session.description is not None and session.description.name:
                return self.config.name or session.description.name
        return self.config.name or self.config.address

    @property
    def description(self) -> pb.Description | None:
        """The plan follows the replicas that are up (they are one element; the first one listed
        speaks for it), else the last Description any of them gave."""
        listed = list(self.sessions.values())
        for session in [s for s in listed if s.up] + listed:
            if session.description is not None:
                return session.description
        return None

    @property
    def up(self) -> bool:
        return any(session.up for session in self.sessions.values())

    @property
    def problem(self) -> str | None:
        """Why the element is unusable though it answers: its Describe, when no replica is up."""
        if self.up:
            return None
        return next((s.problem for s in self.sessions.values() if s.problem is not None), None)

    @property
    def tripped(self) -> bool:
        """Every replica's breaker is open (one with a closed breaker still takes connections)."""
        return bool(self.sessions) and all(session.tripped for session in self.sessions.values())

    @property
    def settled(self) -> bool:
        """A replica is up, or every one refused its Describe: start-up need not wait longer."""
        listed = self.sessions.values()
        return self.up or bool(listed) and all(session.problem is not None for session in listed)

    def unresolved(self) -> str | None:
        """Why no replica is known, while none is."""
        if self.sessions or self.resolution is None:
            return None
        return f"{self.config.address} does not resolve" + (f" ({self.resolution.error})"
                                                           if self.resolution.error else " yet")

    def start(self) -> None:
        if self.resolution is not None:
            self.resolution.start()
        for session in self.sessions.values():
            session.start()

    async def stop(self) -> None:
        if self.resolution is not None:
            await self.resolution.stop()
        for session in [*self.sessions.values(), *self._retiring.values(), *filter(None, [self._unresolved])]:
            await session.stop()
        await asyncio.gather(*self._stopping, return_exceptions=True)

    # --- chain.ElementPort: one element to a flow ----------------------------------------------

    def track(self, connection: Peer) -> None:
        session = self._pick(connection.id)
        self._assigned[connection.id] = session
        session.track(connection)

    def send_open(self, connection: Peer, metadata: Mapping[str, str], target: VerdictTarget | None,
                  pos: int) -> None:
        self._assigned[connection.id].send_open(connection, metadata, target, pos)

    def send_data(self, connection_id: str, seq: int, direction: Direction, data: Payload, end_of_stream: bool,
                  metadata: Mapping[str, str] | None, target: HoldingTarget | None, pos: int) -> None:
        self._assigned[connection_id].send_data(connection_id, seq, direction, data, end_of_stream, metadata,
                                                target, pos)

    def send_close(self, connection: Peer, outcome: Outcome) -> None:
        session = self._assigned.pop(connection.id)
        session.send_close(connection, outcome)
        address = session.endpoint.address
        if self._retiring.get(address) is session and not session.connections:
            self._retire(address)

    def _pick(self, connection_id: str) -> ElementSession:
        if self._takers:
            return self._takers[rendezvous(connection_id, self._keys)]
        if self._unresolved is None:
            self._unresolved = self._session(self.config.address)  # never started: it is never up
        return self._unresolved

    # --- replicas coming and going ---------------------------------------------------------------

    def _resolved(self, addresses: tuple[str, ...]) -> None:
        removed = [address for address in self.sessions if address not in addresses]
        added = [address for address in addresses if address not in self.sessions]
        for address in removed:
            self._drop(address)
        for address in added:
            self._add(address)
        if added or removed:
            log.info("element %s: %d replicas at %s", self.name, len(self.sessions), self.config.address,
                     extra=fields(replicas=list(self.sessions), added=added, removed=removed))
            self._changed()

    def _add(self, address: str) -> None:
        """A replica listed (again): a retiring one takes new connections again, a new one gets a session."""
        session = self._retiring.pop(address, None)
        if session is None:
            session = self._session(address)
            session.start()
        self.sessions[address] = session

    def _drop(self, address: str) -> None:
        """A replica no longer listed: no new connections; its session stops once its last one ends."""
        self._retiring[address] = self.sessions.pop(address)
        if not self._retiring[address].connections:
            self._retire(address)

    def _retire(self, address: str) -> None:
        """Stops the session of a replica no longer listed, once it has no connection left."""
        session = self._retiring.pop(address)
        self._ended = stats.merge([self._ended, session.stats.snapshot(False, False, False)])
        task = asyncio.get_running_loop().create_task(session.stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def _changed(self) -> None:
        """A session came up or went down, started or stopped draining, its breaker moved, or the
        replicas changed: who takes new connections, who must move, then the chain's plan."""
        up = {address for address, session in self.sessions.items() if session.up}
        if self._was_up - up and self.resolution is not None:
            self.resolution.soon()
        self._was_up = up
        self._update_takers()
        self._move_stranded()
        self._forget_unresolved()
        self._on_change()

    def _update_takers(self) -> None:
        listed = list(self.sessions.values())
        self._takers = ([s for s in listed if s.up and not s.drain.draining and not s.tripped]
                        or [s for s in listed if s.up] or listed)
        self._keys = [session.endpoint.address.encode() for session in self._takers]

    def _move_stranded(self) -> None:
        """Live connections of sessions that are down go to a replica that is up, as resumed."""
        if not any(session.up for session in self._takers):
            return
        down = [s for s in [*self.sessions.values(), *self._retiring.values(), *filter(None, [self._unresolved])]
                if not s.up and s.connections]
        for session in down:
            moved = session.hand_over()
            for connection in moved:
                taker = self._takers[rendezvous(connection.id, self._keys)]
                self._assigned[connection.id] = taker
                taker.adopt(connection)
            log.info("element %s: %d connections of %s, which is down, announced as resumed to the replicas "
                     "up", self.name, len(moved), session.endpoint.address)
            address = session.endpoint.address
            if self._retiring.get(address) is session:
                self._retire(address)

    def _forget_unresolved(self) -> None:
        """Once the name resolved and the connections that began before have moved, the stand-in
        session goes: the Close events it kept would never reach any element."""
        if self._unresolved is not None and self.sessions and not self._unresolved.connections:
            self._ended = stats.merge([self._ended, self._unresolved.stats.snapshot(False, False, False)])
            self._unresolved = None

    # --- what operators see ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The element's counters, summed over its replicas (those stopped too), and per replica
        whether it is up or draining, its connections and the events sent to it."""
        sessions = [*self.sessions.values(), *self._retiring.values(), *filter(None, [self._unresolved])]
        total = stats.merge([self._ended, *(s.stats.snapshot(False, False, False) for s in sessions)])
        total.update(up=int(self.up), breaker_open=int(self.tripped), describe_invalid=int(self.problem is not None))
        total["endpoints"] = {
            address: {"up": int(s.up), "draining": int(s.drain.draining), "listed": int(address in self.sessions),
                      "connections": s.connections, "events": sum(s.stats.events.values())}
            for address, s in [*self.sessions.items(), *self._retiring.items()]}
        return total
