"""`--workers N`: N processes share the listening ports with SO_REUSEPORT.

Workers are fresh interpreters (the same command line, re-executed), not forks: gRPC's
core does not survive fork() once initialised, and a fresh process keeps every worker's
state its own. The supervisor serves the admin endpoint (asking each worker over a unix
socket, so figures add up), forwards SIGTERM/SIGINT/SIGHUP, and, if a worker dies on
its own, stops the others and exits 1 so the orchestrator restarts the whole proxy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence

from proxy.operations import admin
from proxy.config import ProxyConfig, describe

log = logging.getLogger("proxy")

WORKER_ENV = "ELEMENT_PROXY_WORKER"
ADMIN_SOCKET_ENV = "ELEMENT_PROXY_ADMIN_SOCKET"
STOP_GRACE = 10.0


def is_worker() -> bool:
    return WORKER_ENV in os.environ


def admin_socket() -> str | None:
    """Where a supervised worker serves its admin routes for the supervisor."""
    return os.environ.get(ADMIN_SOCKET_ENV)


async def supervise(argv: Sequence[str], config: ProxyConfig) -> int:
    """Runs config.workers workers until a signal or a worker's death; the exit code says which."""
    folder = tempfile.mkdtemp(prefix="element-proxy-")
    try:
        sockets = [os.path.join(folder, f"worker-{i}.sock") for i in range(config.workers)]
        # The endpoint first: if its address is taken, no worker has been started to be left behind.
        server = (await admin.serve(admin.WorkersSource(sockets, describe(config)), config.admin)
                  if config.admin else None)
        try:
            return await Workers(await _start(argv, sockets)).run()
        finally:
            if server is not None:
                server.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def _start(argv: Sequence[str], sockets: Sequence[str]) -> list[asyncio.subprocess.Process]:
    """One worker per admin socket, each told its number and where to serve the supervisor."""
    return [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *argv, env={**os.environ, WORKER_ENV: str(i), ADMIN_SOCKET_ENV: path})
        for i, path in enumerate(sockets)]


class Workers:
    """The running workers: they get the supervisor's signals, and stop together."""

    def __init__(self, children: list[asyncio.subprocess.Process]) -> None:
        self.children = children
        self.stopping = asyncio.Event()
        self.waits = [asyncio.create_task(child.wait()) for child in children]

    async def run(self) -> int:
        """Until a stop signal or a worker's death; then every worker is stopped and reaped."""
        self._handle_signals(asyncio.get_running_loop())
        log.info("supervising workers", extra={"fields": {"pids": [c.pid for c in self.children]}})
        died = await self._first_exit()
        if died:
            self._stop_the_others()
        await self._reap()
        return 1 if died or any(child.returncode != 0 for child in self.children) else 0

    def _handle_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop, signum)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)

    def _forward(self, signum: int) -> None:
        for child in self.children:
            if child.returncode is None:
                child.send_signal(signum)

    def _stop(self, signum: int) -> None:
        self.stopping.set()
        self._forward(signum)

    async def _first_exit(self) -> bool:
        """True when a worker exited on its own, False when a signal asked them to stop."""
        stop_wait = asyncio.create_task(self.stopping.wait())
        await asyncio.wait([*self.waits, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        return not self.stopping.is_set()

    def _stop_the_others(self) -> None:
        dead = next(child for child in self.children if child.returncode is not None)
        log.error("worker %d exited with %d; stopping the others", dead.pid, dead.returncode)
        self._forward(signal.SIGTERM)

    async def _reap(self) -> None:
        """STOP_GRACE seconds to drain their connections, then SIGKILL for the rest.

        asyncio.wait, not wait_for: on timeout wait_for cancels the waits, and the rest
        could not be reaped."""
        _, running = await asyncio.wait(self.waits, timeout=STOP_GRACE)
        if running:
            self._forward(signal.SIGKILL)
            await asyncio.gather(*running)
