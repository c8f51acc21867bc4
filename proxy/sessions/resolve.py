"""Which replicas an element's address stands for: the system resolver's answer.

getaddrinfo, so what the host's resolver knows is what the proxy uses: /etc/hosts, Docker's
embedded DNS for `docker-compose up --scale`, a Kubernetes headless Service (one A/AAAA
record per ready pod), IPv4 and IPv6 alike. Asked at start, every `resolve_interval_ms`,
and at once when a session is lost (the replica may be gone for good). A failed lookup
keeps the replicas known so far: a resolver that hiccups must not take every replica away.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

from proxy.config import HostPort

log = logging.getLogger("proxy.session")

# Until a first answer comes, ask again this often (the proxy waits for its elements at start).
FIRST_RETRY = 0.25
# A replica that flaps must not turn into a lookup per reconnect.
LEAST_GAP = 0.1


def endpoints_of(infos: Iterable[tuple[Any, ...]], port: int) -> tuple[str, ...]:
    """getaddrinfo's answer as addresses to dial, each once, sorted (so two answers in another
    order are the same set, and log lines read the same)."""
    found = {str(HostPort(sockaddr[0], port)) for family, _, _, _, sockaddr in infos
             if family in (socket.AF_INET, socket.AF_INET6)}
    return tuple(sorted(found))


class Resolution:
    """Resolves `address` until stopped, handing each new answer to `on_result`."""

    def __init__(self, address: HostPort, interval_ms: int, subject: Callable[[], str],
                 on_result: Callable[[tuple[str, ...]], None]) -> None:
        self.address = address
        self.error: str | None = None  # why the last lookup failed; None after a good one
        self.answered = False
        self._interval = interval_ms / 1000
        self._subject = subject
        self._on_result = on_result
        self._now = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"resolve-{self.address}")

    def soon(self) -> None:
        """A session was lost: look again now (its replica may have left)."""
        self._now.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            self._now.clear()
            await self._once()
            delay = self._interval if self.answered else FIRST_RETRY
            try:
                await asyncio.wait_for(self._now.wait(), delay or None)
            except TimeoutError:
                pass
            await asyncio.sleep(LEAST_GAP)

    async def _once(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self.address.host, self.address.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as error:
            why = str(error)
            if why != self.error:
                log.warning("element %s: cannot resolve %s (%s); %s", self._subject(), self.address.host, why,
                            "keeping the replicas known so far" if self.answered else "failure policy applies")
            self.error = why
            return
        self.error = None
        self.answered = True
        self._on_result(endpoints_of(infos, self.address.port))
