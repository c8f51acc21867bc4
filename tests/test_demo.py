"""`element-proxy demo`: shows each element at work, starts quietly, and leaves no process behind;
and the README's quick start, verbatim, from a clean copy of the repository.

The quick start never reaches beyond loopback: `pip install -e .` finds the project's
dependencies (and setuptools, to build it) in a wheelhouse that tests/wheelhouse.py repacks
from the distributions installed in the Python running the tests, and the test sets
PIP_NO_INDEX=1 and PIP_FIND_LINKS=<that wheelhouse> in the environment, so the command runs
exactly as the README writes it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import wheelhouse
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


def run_bounded(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Runs argv in a process group of its own; past `timeout` the group gets SIGTERM (the demo
    then stops its elements), then SIGKILL, so nothing outlives the test."""
    popen = subprocess.Popen(argv, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
    try:
        stdout, stderr = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGTERM)
        try:
            stdout, stderr = popen.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            stdout, stderr = popen.communicate()
        raise AssertionError(f"{argv} did not finish in {timeout} s\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    return subprocess.CompletedProcess(argv, popen.returncode, stdout, stderr)


def readme_command(heading: str) -> str:
    """The first ```bash block under a README heading: the command a newcomer types."""
    section = (REPO / "README.md").read_text().split(f"\n## {heading}\n", 1)[1]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, f"no bash block under '## {heading}' in README.md"
    return match.group(1).strip()


def clean_copy(into: Path) -> Path:
    """The repository's tracked files as they are in the work tree: a clone of what is being
    tested, with no .venv, egg-info or caches."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout to know the repository's files")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    return into


def test_the_readme_quick_start_runs_verbatim_in_a_fresh_venv(tmp_path: Path) -> None:
    command = readme_command("Quick start")
    assert "python3 -m venv .venv" in command, command
    checkout = clean_copy(tmp_path / "element-proxy")
    wheels = wheelhouse.build(REPO / "pyproject.toml", tmp_path / "wheels")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PIP_", "PYTHON")) and key != "VIRTUAL_ENV"}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", PIP_NO_INDEX="1",
               PIP_FIND_LINKS=str(tmp_path / "wheels"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    done = run_bounded(["bash", "-c", command], cwd=checkout, env=env, timeout=300)
    assert done.returncode == 0, f"{command}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert (checkout / ".venv" / "bin" / "element-proxy").exists()
    warned = [line for line in (done.stdout + done.stderr).splitlines() if "warn" in line.lower()]
    assert not warned, "\n".join(warned)
    installed, demo = done.stdout.split("Successfully installed", 1)
    assert "element-proxy" in demo.splitlines()[0], f"{len(wheels)} wheels offered; pip said:\n{installed}"
    check_demo_output(demo.split("\n", 1)[1], done.stderr)


def test_ci_runs_the_readmes_test_command_verbatim() -> None:
    """.ci/run ends with the command README gives for the suite, and it keeps pyproject's -ra
    (a -r of its own would drop the FAILED lines of a failed run)."""
    last = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"`{last}`" in (REPO / "README.md").read_text(), last
    assert last.endswith("-m pytest -q") and " -r" not in last, last
    assert readme_command("Quick start").startswith("python3 -m venv .venv && ")
