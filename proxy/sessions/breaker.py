"""One element's circuit breaker: when to stop asking it, and the health probe that ends that.

It opens on `breaker_failures` failures (timeouts, invalid verdicts) in a row, or when
within `breaker_window_ms` at least `breaker_min_events` verdicts were due and
`breaker_failure_percent` of them failed: an element that answers every fifth event
with nonsense never fails five times in a row, yet cannot be trusted. While open, a
fail-open element is skipped and a fail-closed one makes the proxy refuse new
connections; after `breaker_cooldown_ms` a grpc.health.v1 probe (or the session coming
back) closes it.

Counting is per one-tenth of the window, so a verdict costs two increments, not a list.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proxy.config import ElementConfig

log = logging.getLogger("proxy.session")

SLOTS = 10


class Breaker:
    """`name` is the element's as logged; `on_change` replans the chain when it opens or closes;
    `dial` makes the probe's channel, with the session's own credentials (a probe that skipped TLS
    would pass for an element the session cannot use)."""

    def __init__(self, config: ElementConfig, name: str, on_change: Callable[[], None],
                 dial: Callable[[], grpc.aio.Channel]) -> None:
        self.config = config
        self._dial = dial
        self.name = name
        self.tripped = False
        self.in_a_row = 0
        self._on_change = on_change
        self._span = config.breaker_window_ms / 1000 / SLOTS
        self._slot_index = 0  # which span of time the current slot counts
        self._answered = [0] * SLOTS
        self._failed = [0] * SLOTS
        self._probe: asyncio.Task[None] | None = None

    def succeeded(self, now: float) -> None:
        """A verdict arrived and was valid."""
        self.in_a_row = 0
        index = int(now / self._span)
        if index != self._slot_index:
            self._roll(index)
        self._answered[index % SLOTS] += 1

    def failed(self, now: float) -> None:
        """A timeout or an invalid verdict: opens the breaker when either rule says so."""
        self.in_a_row += 1
        index = int(now / self._span)
        if index != self._slot_index:
            self._roll(index)
        self._failed[index % SLOTS] += 1
        if self.tripped:
            return
        config = self.config
        if config.breaker_failures and self.in_a_row >= config.breaker_failures:
            self._open(f"{self.in_a_row} failures in a row")
            return
        failed = sum(self._failed)
        due = sum(self._answered) + failed
        if (config.breaker_failure_percent and due >= config.breaker_min_events
                and failed * 100 >= config.breaker_failure_percent * due):
            self._open(f"{failed} of {due} verdicts failed within {config.breaker_window_ms} ms")

    def _roll(self, index: int) -> None:
        """Empties the slots of the spans that passed since the last count."""
        for passed in range(self._slot_index + 1, min(index, self._slot_index + SLOTS) + 1):
            self._answered[passed % SLOTS] = self._failed[passed % SLOTS] = 0
        self._slot_index = index

    def _open(self, why: str) -> None:
        self.tripped = True
        log.warning("element %s: circuit breaker open after %s; %s for %d ms, then probing", self.name, why,
                    "skipping it" if self.config.fail_open else "refusing new connections",
                    self.config.breaker_cooldown_ms)
        self._on_change()
        self._probe = asyncio.create_task(self._probe_until_healthy())

    def close(self, why: str) -> None:
        """The element earned trust again (a passing probe, its session up): count afresh."""
        self.in_a_row = 0
        self._answered = [0] * SLOTS
        self._failed = [0] * SLOTS
        if self.tripped:
            self.tripped = False
            log.info("element %s: circuit breaker closed (%s)", self.name, why)
            self._on_change()

    async def stop(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)

    async def _probe_until_healthy(self) -> None:
        timeout = self.config.timeout_ms / 1000
        while self.tripped:
            await asyncio.sleep(self.config.breaker_cooldown_ms / 1000)
            async with self._dial() as channel:
                try:
                    health = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=timeout)
                except grpc.aio.AioRpcError as error:
                    log.info("element %s: probe failed (%s), breaker stays open", self.name, error.code().name)
                    continue
            if health.status == health_pb2.HealthCheckResponse.SERVING:
                self.close("health probe passed")
