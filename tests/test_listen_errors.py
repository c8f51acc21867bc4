"""A proxy that cannot bind says which setting, which address and what to do, exits 1, and
leaves no process behind (with --workers, none was started)."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.procs import Proc, free_port


@contextmanager
def taken_port() -> Iterator[int]:
    """A loopback port another process (this one) listens on, without SO_REUSEPORT."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def run_until_exit(*args: str) -> tuple[int, str, list[int]]:
    """Runs the proxy to its exit (bounded); returns its code, its output and the PIDs of any
    process of its group still alive afterwards (killed before returning)."""
    proc = Proc([sys.executable, "-m", "proxy", "--log-level", "info", *args])
    try:
        code = proc.popen.wait(timeout=20)
    finally:
        proc.stop()
    left = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _group_of(int(pid)) == proc.pid]
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    return code, proc.log_path.read_text(errors="replace"), left


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_a_taken_listen_port_is_named_with_its_flag() -> None:
    with taken_port() as port:
        code, output, left = run_until_exit("--listen", f"127.0.0.1:{port}", "--target", "127.0.0.1:9",
                                            "--admin", "off")
    assert code == 1, output
    assert f"cannot listen on 127.0.0.1:{port} (--listen / listen): address already in use" in output
    assert "Traceback" not in output
    assert left == []


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_admin_port_is_named_and_no_worker_is_left_behind(workers: str) -> None:
    listen = free_port()
    with taken_port() as admin_port:
        started = time.monotonic()
        code, output, left = run_until_exit("--listen", f"127.0.0.1:{listen}", "--target", "127.0.0.1:9",
                                            "--admin", f"127.0.0.1:{admin_port}", "--workers", workers)
    assert left == [], f"still running after the proxy exited: {left}\n{output}"
    assert code == 1, output
    assert (f"cannot serve the admin endpoint on 127.0.0.1:{admin_port} (--admin / admin): address already in use"
            in output)
    assert "give each its own --admin HOST:PORT, or --admin off" in output
    assert "Traceback" not in output
    assert "listening" not in output, f"a listener came up before the admin endpoint failed:\n{output}"
    assert time.monotonic() - started < 15


def test_an_address_this_host_does_not_have_is_named() -> None:
    code, output, _ = run_until_exit("--listen", "192.0.2.1:15002", "--target", "127.0.0.1:9", "--admin", "off")
    assert code == 1, output
    assert "cannot listen on 192.0.2.1:15002 (--listen / listen): this host has no such address" in output
