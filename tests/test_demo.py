"""`element-proxy demo`: shows each element at work, starts quietly, and leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.procs import REPO, stop_popen

EXPECTED = (
    "sent 'hello world': reply 'target got: howdy world'",
    "sent 'SELECT 1; DROP TABLE users;': connection reset by the proxy",
    "sent 'just passing through': reply 'target got: just passing through'",
)


def check_demo_output(stdout: str, stderr: str) -> None:
    """What the README promises the quick start prints, and no warning (a dial before the
    elements listened used to log three) nor a second log format."""
    for line in EXPECTED:
        assert line in stdout, stdout
    assert "outcome=reset_by_element detail=element firewall reset it" in stderr, stderr
    logged = [line for line in (stdout + stderr).splitlines() if line and not line.startswith("==")]
    assert logged, stderr
    unusual = [line for line in logged if " info    " not in line]
    assert not unusual, "\n".join(unusual)


def test_demo_shows_rewrite_firewall_and_pass() -> None:
    done = subprocess.run([sys.executable, "-m", "proxy", "demo"], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    check_demo_output(done.stdout, done.stderr)


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    pending = [pid]
    while pending:
        for task in Path(f"/proc/{pending.pop()}/task").glob("*"):
            try:
                children = {int(child) for child in (task / "children").read_text().split()}
            except OSError:
                continue
            pending += children - found
            found |= children
    return found


def test_sigterm_stops_the_demo_and_every_element() -> None:
    demo = subprocess.Popen([sys.executable, "-m", "proxy", "demo", "--keep-running"], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert demo.stdout is not None
        deadline = time.monotonic() + 60
        for line in demo.stdout:
            if "stops the demo" in line or time.monotonic() > deadline:
                break
        assert "stops the demo" in line, line
        children = _descendants(demo.pid)
        assert len(children) >= 3, children  # the three elements
        os.kill(demo.pid, signal.SIGTERM)
        assert demo.wait(30) == 0
        left = [pid for pid in children if Path(f"/proc/{pid}").exists()]
        assert not left, f"the demo left {left} running"
    finally:
        stop_popen(demo)
