"""One proxy process: its listeners, its element sessions and its live connections.

Nothing here is module-level: several workers (processes) or several test proxies
never share state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import os
import resource
import secrets
import socket
import time
from typing import Any

from proxy.net.acceptor import Acceptor, listening_socket
from proxy.chain import LaneLimits, Outcome
from proxy.config import HostPort, ProxyConfig, check_message_size, describe
from proxy.net.connection import Accepted, ClientSide, Connection, ConnectionContext
from proxy.operations.listen_errors import cannot_listen
from elements.logs import fields
from proxy.sessions.fleet import Fleet
from proxy.sessions.plan import Chain
from proxy.sessions.validate import VerdictLimits

log = logging.getLogger("proxy")

STARTUP_WAIT = 5.0
DESCRIPTOR_HEADROOM = 8  # for element channels that reconnect, the admin endpoint


class ConnectionIds:
    """Ids unique across the worker processes of one proxy: the pid is unique among live
    workers, the random part tells restarts apart."""

    def __init__(self) -> None:
        self.prefix = f"{os.getpid():x}{secrets.token_hex(2)}-"
        self.counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):x}"


class Worker:
    def __init__(self, config: ProxyConfig) -> None:
        """Built inside the running loop, which every connection then uses without asking."""
        self.loop = asyncio.get_running_loop()
        self.config = config
        self.limits = LaneLimits(config.chunk_size, config.window, config.high_water)
        self.ids = ConnectionIds()
        self.verdict_limits = verdict_limits(config)
        self.chain = Chain(config.elements, self.verdict_limits)
        self.context = ConnectionContext(self.loop, self.ids.next, self.chain, self.limits, config.target,
                                         config.connect_timeout_ms, config.upstream_mark, self.opened, self.closed)
        self.connections: dict[str, Connection] = {}
        self.acceptors: list[Acceptor] = []
        # keyed by HostPort and Outcome, named in snapshot(): no string made per connection
        self.accepted = {address: 0 for address in config.listen}
        self.outcomes: dict[Outcome, int] = {}
        self.closed_bytes = {"request": 0, "response": 0}
        self.refused = 0
        self.starting = 0  # accepted, transport not made yet: counted against the limits
        self.draining = False
        self._sweeper: asyncio.Task[None] | None = None
        self._descriptors_at_start = 0

    async def start(self, reuse_port: bool = False) -> None:
        """Starts sessions, waits (bounded) for every element to answer, then listens."""
        await _start_chain(self.chain)
        for address in self.config.listen:
            try:
                sock = listening_socket(address, reuse_port)
            except OSError as error:
                raise cannot_listen("listen", address, "--listen / listen", error) from error
            acceptor = Acceptor(sock, self.refusal, functools.partial(self._serve, listener=address), self.refuse)
            acceptor.start()
            self.acceptors.append(acceptor)
            log.info("listening", extra=fields(address=str(address)))
        self._descriptors_at_start = len(os.listdir("/proc/self/fd"))
        if self.config.idle_timeout_ms or self.config.max_duration_ms:
            self._sweeper = asyncio.create_task(self._sweep())

    def _serve(self, sock: socket.socket, client: tuple[str, int], listener: HostPort) -> None:
        self.starting += 1
        self.loop.create_task(self._start_connection(Accepted(sock, listener, client)))

    async def _start_connection(self, accepted: Accepted) -> None:
        """Wraps an accepted socket in a transport; connection_made creates the Connection."""
        sock = accepted.sock
        try:
            context = self.context
            await self.loop.connect_accepted_socket(lambda: ClientSide(context, accepted), sock)
        except OSError as error:
            log.info("accepted connection lost before it started", extra=fields(error=str(error)))
            sock.close()
        finally:
            self.starting -= 1

    def refusal(self) -> str | None:
        """Why a new connection must be refused at once, or None to accept it."""
        limit = self.config.max_connections
        open_now = len(self.connections) + self.starting
        if limit and open_now >= limit:
            return f"max_connections ({limit}) reached"
        if open_now >= self._descriptor_room():
            return "no file descriptors left for its upstream (raise RLIMIT_NOFILE, ulimit -n)"
        return self.chain.refusing()

    def _descriptor_room(self) -> int:
        """Connections the descriptor limit leaves room for, two descriptors each (as haproxy
        derives its maxconn): accepting more would only fail their dials. Read per connection,
        a cheap syscall, so a limit lowered at run time (prlimit) counts at once."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return (soft - self._descriptors_at_start - DESCRIPTOR_HEADROOM) // 2

    def refuse(self, reason: str, client: tuple[str, int]) -> None:
        self.refused += 1
        log.info("connection refused", extra=fields(client=f"{client[0]}:{client[1]}", reason=reason))

    async def _sweep(self) -> None:
        """Ends idle and too-old connections; one pass a second is plenty for timeouts of seconds."""
        idle = self.config.idle_timeout_ms / 1000
        longest = self.config.max_duration_ms / 1000
        while True:
            await asyncio.sleep(min(1.0, max(0.05, min(t for t in (idle, longest) if t) / 4)))
            now = time.monotonic()
            for connection in list(self.connections.values()):
                if longest and now - connection.started > longest:
                    connection.flow.end(Outcome.MAX_DURATION, f"open longer than {self.config.max_duration_ms} ms")
                elif idle and now - connection.last_active > idle:
                    connection.flow.end(Outcome.IDLE_TIMEOUT, f"idle for {self.config.idle_timeout_ms} ms")

    def opened(self, connection: Connection) -> None:
        self.connections[connection.id] = connection
        self.accepted[connection.accepted.listener] += 1

    def closed(self, connection: Connection, outcome: Outcome) -> None:
        if self.connections.pop(connection.id, None) is None:
            return
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.closed_bytes["request"] += connection.request_bytes
        self.closed_bytes["response"] += connection.response_bytes

    def snapshot(self) -> dict[str, Any]:
        """Counters for /metrics: plain data, so several workers' snapshots add up (stats.merge)."""
        active = dict.fromkeys(self.accepted, 0)
        written = dict(self.closed_bytes)
        for connection in self.connections.values():
            active[connection.accepted.listener] += 1
            written["request"] += connection.request_bytes
            written["response"] += connection.response_bytes
        return {
            "connections": {str(listener): {"active": active[listener], "total": total}
                            for listener, total in self.accepted.items()},
            "closed": {outcome.name.lower(): count for outcome, count in self.outcomes.items()},
            "refused": self.refused,
            "bytes": written,
            "elements": {f"{fleet.index}:{fleet.name}": fleet.snapshot() for fleet in self.chain.fleets},
        }

    def connection_list(self) -> list[dict[str, Any]]:
        return [connection.describe() for connection in self.connections.values()]

    def unready(self) -> list[str]:
        """Why this worker should not get traffic: listeners down, fail-closed elements unreachable."""
        reasons = ["draining"] if self.draining else []
        if not self.acceptors or not all(acceptor.serving for acceptor in self.acceptors):
            reasons.append("not listening")
        return reasons + [_down(fleet) for fleet in self.chain.fleets if not fleet.up and not fleet.config.fail_open]

    async def reload(self, config: ProxyConfig) -> None:
        """SIGHUP: a new chain for new connections, once its elements answer; open connections keep theirs."""
        if config.elements == self.chain.elements:
            log.info("reload: the chain is unchanged")
            return
        # sizes are not reloaded: the new chain must fit the running ones (raises ConfigError)
        check_message_size(dataclasses.replace(self.config, elements=config.elements))
        chain = Chain(config.elements, self.verdict_limits)
        await _start_chain(chain)
        old, self.chain = self.chain, chain
        self.context = dataclasses.replace(self.context, chain=chain)
        self.config = dataclasses.replace(self.config, elements=config.elements)
        old.retire()
        log.info("reload: new connections use the new chain", extra=fields(
            elements=[e.address for e in config.elements], connections_on_old_chain=old.users))

    def effective_config(self) -> dict[str, Any]:
        return describe(self.config)

    async def stop(self) -> None:
        """Graceful drain: stop accepting, let open connections finish within drain_timeout_ms,
        reset what is left, close the element sessions."""
        self.draining = True
        for acceptor in self.acceptors:
            acceptor.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        deadline = time.monotonic() + self.config.drain_timeout_ms / 1000
        if self.connections:
            log.info("draining", extra=fields(connections=len(self.connections),
                                              drain_timeout_ms=self.config.drain_timeout_ms))
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.connections.values()):
            connection.flow.end(Outcome.PROXY_STOPPING, f"still open after drain_timeout_ms "
                                                          f"({self.config.drain_timeout_ms})")
        await self.chain.stop()


def _down(fleet: Fleet) -> str:
    """Why a fail-closed element makes this worker unready: no replica of it is up."""
    why = fleet.unresolved() or (f"invalid Describe, {fleet.problem}" if fleet.problem else "")
    return f"element {fleet.name} (fail-closed) session down" + (f": {why}" if why else "")


def verdict_limits(config: ProxyConfig) -> VerdictLimits:
    return VerdictLimits(config.max_replacement_bytes, config.max_metadata_entries, config.max_metadata_key_bytes,
                         config.max_metadata_value_bytes, config.max_metadata_bytes)


async def _start_chain(chain: Chain) -> None:
    chain.start()
    deadline = time.monotonic() + STARTUP_WAIT
    while not chain.settled and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    for fleet in chain.fleets:
        if not fleet.up:
            log.warning("element %s not reachable; its failure policy (%s) applies until it is",
                        fleet.name, fleet.config.failure)
