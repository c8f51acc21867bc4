"""One proxy process: its listeners, its element sessions and its live connections.

Nothing here is module-level: several workers (processes) or several test proxies
never share state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import secrets
import socket
import time
from typing import Any

from proxy.chain import LaneLimits, Outcome
from proxy.config import ProxyConfig, describe
from proxy.connection import ClientSide, Connection
from proxy.logs import fields
from proxy.plan import Chain

log = logging.getLogger("proxy")

STARTUP_WAIT = 5.0


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
        self.config = config
        self.limits = LaneLimits(config.chunk_size, config.window, config.high_water)
        self.ids = ConnectionIds()
        self.chain = Chain(config.elements, config.max_replacement_bytes)
        self.connections: dict[str, Connection] = {}
        self.servers: list[asyncio.base_events.Server] = []
        self.accepted = {str(address): 0 for address in config.listen}
        self.outcomes: dict[str, int] = {}
        self.closed_bytes = {"request": 0, "response": 0}
        self.refused = 0
        self.draining = False
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, reuse_port: bool = False) -> None:
        """Starts sessions, waits (bounded) for every element to answer, then listens."""
        await _start_chain(self.chain)
        loop = asyncio.get_running_loop()
        for address in self.config.listen:
            server = await loop.create_server(
                lambda address=address: ClientSide(self, address), address.host, address.port,
                family=socket.AF_INET6 if ":" in address.host else socket.AF_INET,
                reuse_address=True, reuse_port=reuse_port, backlog=4096)
            self.servers.append(server)
            log.info("listening", extra=fields(address=str(address)))
        if self.config.idle_timeout_ms or self.config.max_duration_ms:
            self._sweeper = asyncio.create_task(self._sweep())

    def refusal(self) -> str | None:
        """Why a new connection must be refused at once, or None to accept it."""
        limit = self.config.max_connections
        if limit and len(self.connections) >= limit:
            return f"max_connections ({limit}) reached"
        return self.chain.refusing()

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
                    connection.flow.reset(Outcome.MAX_DURATION, f"open longer than {self.config.max_duration_ms} ms")
                elif idle and now - connection.last_active > idle:
                    connection.flow.reset(Outcome.IDLE_TIMEOUT, f"idle for {self.config.idle_timeout_ms} ms")

    def opened(self, connection: Connection) -> None:
        self.connections[connection.id] = connection
        self.accepted[str(connection.listener)] += 1

    def closed(self, connection: Connection, outcome: Outcome) -> None:
        if self.connections.pop(connection.id, None) is None:
            return
        name = outcome.name.lower()
        self.outcomes[name] = self.outcomes.get(name, 0) + 1
        self.closed_bytes["request"] += connection.request_bytes
        self.closed_bytes["response"] += connection.response_bytes

    def snapshot(self) -> dict[str, Any]:
        """Counters for /metrics: plain data, so several workers' snapshots add up (stats.merge)."""
        active = dict.fromkeys(self.accepted, 0)
        written = dict(self.closed_bytes)
        for connection in self.connections.values():
            active[str(connection.listener)] += 1
            written["request"] += connection.request_bytes
            written["response"] += connection.response_bytes
        return {
            "connections": {listener: {"active": active[listener], "total": total}
                            for listener, total in self.accepted.items()},
            "closed": dict(self.outcomes),
            "refused": self.refused,
            "bytes": written,
            "elements": {f"{s.index}:{s.name}": s.stats.snapshot(s.up, s.tripped) for s in self.chain.sessions},
        }

    def connection_list(self) -> list[dict[str, Any]]:
        return [connection.describe() for connection in self.connections.values()]

    def unready(self) -> list[str]:
        """Why this worker should not get traffic: listeners down, fail-closed elements unreachable."""
        reasons = ["draining"] if self.draining else []
        if not self.servers or not all(server.is_serving() for server in self.servers):
            reasons.append("not listening")
        reasons += [f"element {s.name} (fail-closed) session down" for s in self.chain.sessions
                    if not s.up and not s.config.fail_open]
        return reasons

    async def reload(self, config: ProxyConfig) -> None:
        """SIGHUP: a new chain for new connections, once its elements answer; open connections keep theirs."""
        if config.elements == self.chain.elements:
            log.info("reload: the chain is unchanged")
            return
        chain = Chain(config.elements, self.config.max_replacement_bytes)
        await _start_chain(chain)
        old, self.chain = self.chain, chain
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
        for server in self.servers:
            server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        deadline = time.monotonic() + self.config.drain_timeout_ms / 1000
        if self.connections:
            log.info("draining", extra=fields(connections=len(self.connections),
                                              drain_timeout_ms=self.config.drain_timeout_ms))
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.connections.values()):
            connection.flow.reset(Outcome.PROXY_STOPPING, f"still open after drain_timeout_ms "
                                                          f"({self.config.drain_timeout_ms})")
        await self.chain.stop()


async def _start_chain(chain: Chain) -> None:
    chain.start()
    deadline = time.monotonic() + STARTUP_WAIT
    while not chain.all_up and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    for session in chain.sessions:
        if not session.up:
            log.warning("element %s not reachable; its failure policy (%s) applies until it is",
                        session.name, session.config.failure)
