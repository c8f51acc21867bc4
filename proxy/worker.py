"""One proxy process: its listeners, its element sessions and its live connections.

Nothing here is module-level: several workers (processes) or several test proxies
never share state.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import socket
import time

from proxy.chain import LaneLimits, Outcome
from proxy.config import HostPort, ProxyConfig
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
        self.chain = Chain(config.elements)
        self.connections: dict[str, Connection] = {}
        self.servers: list[asyncio.base_events.Server] = []

    async def start(self, reuse_port: bool = False) -> None:
        """Starts sessions, waits (bounded) for every element to answer, then listens."""
        self.chain.start()
        deadline = time.monotonic() + STARTUP_WAIT
        while not self.chain.all_up and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for session in self.chain.sessions:
            if not session.up:
                log.warning("element %s not reachable at start; its failure policy (%s) applies until it is",
                            session.name, session.config.failure)
        loop = asyncio.get_running_loop()
        for address in self.config.listen:
            server = await loop.create_server(
                lambda address=address: ClientSide(self, address), address.host, address.port,
                family=socket.AF_INET6 if ":" in address.host else socket.AF_INET,
                reuse_address=True, reuse_port=reuse_port, backlog=4096)
            self.servers.append(server)
            log.info("listening", extra=fields(address=str(address)))

    def opened(self, connection: Connection) -> None:
        self.connections[connection.id] = connection

    def closed(self, connection: Connection) -> None:
        self.connections.pop(connection.id, None)

    async def stop(self) -> None:
        """Stops accepting, resets what is still open, closes the element sessions."""
        for server in self.servers:
            server.close()
        for connection in list(self.connections.values()):
            connection.flow.reset(Outcome.FAILURE, "proxy stopping")
        await self.chain.stop()
