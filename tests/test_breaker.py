"""The circuit breaker's two rules, on a clock the test sets: K failures in a row, and a failure rate
over a sliding window (an element that fails every fifth event never fails five times in a row)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from proxy.sessions.breaker import Breaker
from proxy.config import ElementConfig
from proxy.sessions.endpoint import Endpoint
from proxy.sessions.faultlog import FaultLog

CONFIG = ElementConfig("127.0.0.1:1", breaker_failures=5, breaker_window_ms=10_000, breaker_failure_percent=10,
                       breaker_min_events=20, breaker_cooldown_ms=3_600_000)


def run_breaker(script: Callable[[Breaker], None], config: ElementConfig = CONFIG) -> tuple[Breaker, int]:
    """Runs `script` against a breaker inside a loop (opening starts its probe task); returns it and
    how many times it told the chain to replan."""
    changes = []

    async def main() -> Breaker:
        breaker = Breaker(config, "e", lambda: changes.append(1), Endpoint(config.address, config).channel)
        script(breaker)
        await breaker.stop()
        return breaker

    return asyncio.run(main()), len(changes)


def test_k_failures_in_a_row_open_it_and_one_success_starts_the_count_again() -> None:
    def script(breaker: Breaker) -> None:
        for t in range(4):
            breaker.failed(100.0 + t / 100)
        breaker.succeeded(100.05)
        for t in range(4):
            breaker.failed(100.1 + t / 100)
        assert not breaker.tripped
        breaker.failed(100.2)

    breaker, changes = run_breaker(script)
    assert breaker.tripped and changes == 1


def test_one_failure_in_five_opens_it_by_rate_within_the_window() -> None:
    def script(breaker: Breaker) -> None:
        for i in range(19):
            (breaker.failed if i % 5 == 4 else breaker.succeeded)(200.0 + i / 100)
        assert not breaker.tripped  # 3 of 19: fewer than breaker_min_events verdicts were due
        breaker.failed(200.2)

    breaker, _ = run_breaker(script)
    assert breaker.tripped


def test_failures_older_than_the_window_are_forgotten() -> None:
    def script(breaker: Breaker) -> None:
        for i in range(3):
            breaker.failed(300.0 + i / 100)
            breaker.succeeded(300.0 + i / 100)
        for i in range(40):  # 11 s later: the early failures left the window
            breaker.succeeded(311.0 + i / 100)
        breaker.failed(311.5)
        breaker.succeeded(311.6)
        breaker.failed(311.7)
        breaker.succeeded(311.8)
        breaker.failed(311.9)

    breaker, _ = run_breaker(script)
    assert not breaker.tripped  # 3 of 45 in the window: under 10 %


def test_the_rate_rule_is_off_at_zero_percent() -> None:
    config = ElementConfig("127.0.0.1:1", breaker_failures=0, breaker_failure_percent=0)

    def script(breaker: Breaker) -> None:
        for i in range(100):
            breaker.failed(400.0 + i / 100)

    breaker, _ = run_breaker(script, config)
    assert not breaker.tripped


def test_closing_it_counts_afresh() -> None:
    def script(breaker: Breaker) -> None:
        for i in range(5):
            breaker.failed(500.0 + i / 100)
        assert breaker.tripped
        breaker.close("test")
        for i in range(4):
            breaker.failed(500.1 + i / 100)

    breaker, changes = run_breaker(script)
    assert not breaker.tripped and changes == 2


def test_fault_log_says_the_first_then_how_many_it_held_back(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        faults = FaultLog(logging.getLogger("test.faults"), "element e", window=0.2)
        for i in range(50):
            faults.warn("timeout", "timeouts", "no verdict for connection c%d", i)
        faults.warn("bad_action", "invalid verdicts (bad_action)", "action %d", 77)
        await asyncio.sleep(0.3)
        faults.warn("timeout", "timeouts", "no verdict for connection c%d", 99)
        await asyncio.sleep(0.3)

    with caplog.at_level(logging.WARNING, "test.faults"):
        asyncio.run(main())
    assert [r.getMessage() for r in caplog.records] == [
        "element e: no verdict for connection c0", "element e: action 77",
        "element e: 49 more timeouts in the last 0.2 s", "element e: 1 more timeouts in the last 0.2 s"]
