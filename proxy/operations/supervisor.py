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
from proxy.net.listen_errors import CannotListen

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
    sockets = [os.path.join(folder, f"worker-{i}.sock") for i in range(config.workers)]
    # The endpoint first: if its address is taken, no worker has been started to be left behind.
    try:
        server = (await admin.serve(admin.WorkersSource(sockets, describe(config)), config.admin)
                  if config.admin else None)
    except CannotListen:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    children = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *argv, env={**os.environ, WORKER_ENV: str(i), ADMIN_SOCKET_ENV: path})
        for i, path in enumerate(sockets)]
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def forward(signum: int) -> None:
        for child in children:
            if child.returncode is None:
                child.send_signal(signum)

    def stop(signum: int) -> None:
        stopping.set()
        forward(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum)
    loop.add_signal_handler(signal.SIGHUP, forward, signal.SIGHUP)
    log.info("supervising workers", extra={"fields": {"pids": [c.pid for c in children]}})
    waits = [asyncio.create_task(child.wait()) for child in children]
    stop_wait = asyncio.create_task(stopping.wait())
    await asyncio.wait([*waits, stop_wait], return_when=asyncio.FIRST_COMPLETED)
    died = not stopping.is_set()
    if died:
        dead = next(child for child in children if child.returncode is not None)
        log.error("worker %d exited with %d; stopping the others", dead.pid, dead.returncode)
        forward(signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.gather(*waits), STOP_GRACE)
    except TimeoutError:
        forward(signal.SIGKILL)
        await asyncio.gather(*waits)
    stop_wait.cancel()
    if server is not None:
        server.close()
    shutil.rmtree(folder, ignore_errors=True)
    return 1 if died or any(child.returncode != 0 for child in children) else 0
