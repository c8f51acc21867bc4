"""The supervisor's Workers with real child processes and real signals: a stop signal
reaches every worker, a worker's death stops the others, a worker deaf to SIGTERM is
killed after the grace. The children are small Python scripts, so each case takes
well under a second."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest

from proxy.operations import supervisor

STOPS_ON_SIGTERM = ("import signal, sys, time\n"
                    "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
                    "print('ready', flush=True)\n"
                    "time.sleep(60)\n")
IGNORES_SIGTERM = ("import signal, time\n"
                   "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                   "print('ready', flush=True)\n"
                   "time.sleep(60)\n")
EXITS_AT_ONCE = "raise SystemExit(3)\n"


async def _child(code: str) -> asyncio.subprocess.Process:
    """A child that has printed `ready` once its signal handling is set up."""
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE)
    if code != EXITS_AT_ONCE:
        assert child.stdout is not None
        assert await asyncio.wait_for(child.stdout.readline(), 10) == b"ready\n"
    return child


def _run(codes: list[str], signum: int | None = None) -> tuple[int, list[int | None]]:
    """Runs Workers over children running `codes` until it returns, sending this process
    `signum` once its handlers are in place: its exit code, and each child's."""
    async def main() -> tuple[int, list[int | None]]:
        children = [await _child(code) for code in codes]
        try:
            run = asyncio.create_task(supervisor.Workers(children).run())
            await asyncio.sleep(0)  # one step: run puts its signal handlers in place before it awaits
            if signum is not None:
                os.kill(os.getpid(), signum)
            return await asyncio.wait_for(run, 10), [child.returncode for child in children]
        finally:
            for child in children:
                if child.returncode is None:
                    child.kill()
                    await child.wait()

    return asyncio.run(main())


def test_sigterm_reaches_every_worker_and_a_clean_stop_exits_0() -> None:
    assert _run([STOPS_ON_SIGTERM, STOPS_ON_SIGTERM], signal.SIGTERM) == (0, [0, 0])


def test_a_worker_that_dies_stops_the_others_and_the_supervisor_exits_1() -> None:
    assert _run([STOPS_ON_SIGTERM, EXITS_AT_ONCE]) == (1, [0, 3])


def test_a_worker_deaf_to_sigterm_is_killed_after_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "STOP_GRACE", 0.3)
    assert _run([STOPS_ON_SIGTERM, IGNORES_SIGTERM], signal.SIGTERM) == (1, [0, -signal.SIGKILL])
