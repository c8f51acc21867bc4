"""Processes the benchmark starts: output in a file, readiness by listening port, stop by PID.

Every child goes through `Procs.start`, so `Procs.stop_all` (called from a `finally`)
stops exactly what the benchmark started, by PID, SIGTERM then SIGKILL, and never
anything else. Children run in their own session, so a Ctrl-C in the terminal
reaches the benchmark only, which then stops them in order.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.procs import stop_popen

REPO = Path(__file__).resolve().parent.parent
LISTEN = "0A"  # TCP state code in /proc/net/tcp


def free_port() -> int:
    """A loopback port the kernel just handed out, so runs do not collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """True when some socket listens on host:port (an IPv4 loopback address) or 0.0.0.0:port.

    Read from /proc/net/tcp rather than probed with a connect, because a probe to a
    proxy would be forwarded to its target (iperf3 serves one client at a time).
    """
    little_endian = bytes(reversed(socket.inet_aton(host))).hex().upper()
    wanted = {f"{address}:{port:04X}" for address in (
        little_endian, "00000000",  # host, 0.0.0.0
        "0" * 32, f"0000000000000000FFFF0000{little_endian}")}  # ::, ::ffff:host (grpc binds this one)
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as table:
            next(table)
            for line in table:
                parts = line.split()
                if parts[1] in wanted and parts[3] == LISTEN:
                    return True
    return False


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, ... of /proc/PID/status, in KiB."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key.startswith("Vm"):
                values[key] = int(rest.split()[0])
    return values


class Proc:
    """One child process with its stdout+stderr in a file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log", dir=log_dir)[1])
        self._log = self.log_path.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env, cwd=REPO, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def status(self) -> dict[str, int]:
        return proc_status(self.pid)

    def wait_listening(self, ports: list[int], timeout: float = 20.0, host: str = "127.0.0.1") -> None:
        """Polls until every port listens; fails fast, with the log tail, if the process died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
            if all(listening(port, host) for port in ports):
                return
            time.sleep(0.02)
        raise TimeoutError(f"{self.name} did not listen on {ports} within {timeout}s:\n{self.tail()}")

    def wait_unix(self, path: Path, timeout: float = 20.0) -> None:
        """Polls until the unix domain socket `path` accepts; fails fast if the process died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(path))
                    return
                except OSError:
                    pass
            time.sleep(0.02)
        raise TimeoutError(f"{self.name} did not listen on unix:{path} within {timeout}s:\n{self.tail()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        code = stop_popen(self.popen, timeout)
        self._log.close()
        return code


class Procs:
    """Everything the benchmark started, stopped in reverse order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Proc] = []

    def start(self, name: str, argv: list[str]) -> Proc:
        proc = Proc(name, argv, self.log_dir)
        self.started.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self) -> None:
        while self.started:
            proc = self.started.pop()
            try:
                proc.stop()
            except (OSError, subprocess.SubprocessError) as error:
                print(f"bench: could not stop {proc.name} (pid {proc.pid}): {error}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (its threads included)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_wait_sockets() -> int:
    """TIME_WAIT sockets on the machine: churn leaves them, and they cost later connects."""
    with open("/proc/net/tcp") as table:
        return sum(1 for line in table if line.split()[3] == "06")


def open_connections(port: int) -> int:
    """Connections on local port `port` that its side has not closed yet (ESTABLISHED, CLOSE_WAIT)."""
    suffix = f":{port:04X}"
    count = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as table:
            next(table)
            for line in table:
                parts = line.split()
                if parts[1].endswith(suffix) and parts[3] in ("01", "08"):
                    count += 1
    return count


def machine_busy_seconds() -> float:
    """CPU time every process on the machine has used (user + nice + system), all CPUs summed."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    return (int(fields[1]) + int(fields[2]) + int(fields[3])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU time of the benchmark's finished children (the clients it waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Pins every thread of a process (grpc and uvloop start their own) to `cpus`."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except (ProcessLookupError, FileNotFoundError):
            pass  # a thread that just ended
