"""Idle connections: what holding many open, silent connections costs a front's memory.

The benchmark process opens the client sockets itself and holds them; redis-server is
the target (started with --maxclients 20000), and its connected_clients count says
when every connection has been carried through to it.
"""

from __future__ import annotations

import socket
import subprocess
import time

from bench.procs import Proc


def redis_clients(port: int) -> int:
    out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), "info", "clients"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    for line in out.splitlines():
        if line.startswith("connected_clients:"):
            return int(line.split(":")[1])
    raise RuntimeError(f"no connected_clients in redis INFO:\n{out}")


def _wait_clients(redis_port: int, wanted: int, timeout: float, front: Proc) -> int:
    deadline = time.monotonic() + timeout
    count = redis_clients(redis_port)
    while count != wanted and time.monotonic() < deadline:
        if not front.alive():
            raise RuntimeError(f"{front.name} died holding idle connections:\n{front.tail()}")
        time.sleep(0.1)
        count = redis_clients(redis_port)
    return count


def measure(front: Proc, front_port: int, redis_port: int, count: int, settle: float = 1.0) -> dict[str, float]:
    """VmRSS of `front` before and after `count` idle connections are held open through it."""
    base_clients = redis_clients(redis_port)
    time.sleep(settle)
    before = front.status()["VmRSS"]
    sockets: list[socket.socket] = []
    started = time.monotonic()
    try:
        for _ in range(count):
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(client)
            client.settimeout(10)
            client.connect(("127.0.0.1", front_port))
        reached = _wait_clients(redis_port, base_clients + count, 60, front)
        if reached != base_clients + count:
            raise RuntimeError(f"only {reached - base_clients} of {count} connections reached redis through "
                               f"{front.name}:\n{front.tail()}")
        opened_s = time.monotonic() - started
        time.sleep(settle)
        status = front.status()
        after = status["VmRSS"]
        if not front.alive():
            raise RuntimeError(f"{front.name} died holding idle connections:\n{front.tail()}")
    finally:
        for client in sockets:
            client.close()
    _wait_clients(redis_port, base_clients, 30, front)
    return {
        "connections": count,
        "rss_before_mb": before * 1024 / 1e6,
        "rss_after_mb": after * 1024 / 1e6,
        "growth_mb": (after - before) * 1024 / 1e6,
        "growth_per_10k_mb": (after - before) * 1024 / 1e6 * 10_000 / count,
        "hwm_mb": status["VmHWM"] * 1024 / 1e6,
        "open_s": opened_s,
    }
