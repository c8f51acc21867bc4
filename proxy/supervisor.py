"""`--workers N`: N processes share the listening ports with SO_REUSEPORT.

Workers are fresh interpreters (the same command line, re-executed), not forks: gRPC's
core does not survive fork() once initialised, and a fresh process keeps every worker's
state its own. The supervisor forwards SIGTERM/SIGINT and, if a worker dies on its
own, stops the others and exits 1 so the orchestrator restarts the whole proxy.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

log = logging.getLogger("proxy")

WORKER_ENV = "ELEMENT_PROXY_WORKER"
STOP_GRACE = 10.0


def is_worker() -> bool:
    return WORKER_ENV in os.environ


def supervise(argv: Sequence[str], workers: int) -> int:
    children = [subprocess.Popen([sys.executable, "-m", "proxy", *argv], env={**os.environ, WORKER_ENV: str(i)})
                for i in range(workers)]
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    log.info("supervising %d workers", workers, extra={"fields": {"pids": [c.pid for c in children]}})
    while not stopping:
        exited = [child for child in children if child.poll() is not None]
        if exited:
            log.error("worker %d exited with %d; stopping the others", exited[0].pid, exited[0].returncode)
            forward(signal.SIGTERM, None)
            break
        time.sleep(0.2)
    deadline = time.monotonic() + STOP_GRACE
    for child in children:
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    codes = [child.returncode for child in children]
    return 0 if stopping and not exited and all(code == 0 for code in codes) else 1
