"""Whether a replica is draining: it says so (grpc.health.v1 NOT_SERVING), or its server sent
GOAWAY. A draining replica gets no new connections and keeps the ones it has (fleet.py).

Both are watched on the session's own channel, so they cost no connection of their own: a
Health.Watch stream pushes every status change at once, and a GOAWAY moves the channel out
of READY while the Session stream it already carries goes on. An element without the health
service is simply never draining by health.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger("proxy.session")

_SERVING = health_pb2.HealthCheckResponse.SERVING
# A channel leaves READY on a GOAWAY and also when its replica dies; in the second case the session
# ends (and stops this watch) within this long, so only a channel still carrying it is draining.
GOAWAY_CONFIRM = 0.05


class DrainWatch:
    """`where` names the replica in log lines; `on_change` replans when it starts or stops draining."""

    def __init__(self, where: Callable[[], str], on_change: Callable[[], None]) -> None:
        self.draining = False
        self.why = ""
        self._where = where
        self._on_change = on_change
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, channel: grpc.aio.Channel) -> None:
        """A new session is up on `channel`: serving until it says otherwise."""
        self.draining, self.why = False, ""
        self._tasks = [asyncio.create_task(self._health(channel)), asyncio.create_task(self._goaway(channel))]

    async def stop(self) -> None:
        """The session ended: a replica that is down is down, not draining."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self.draining, self.why = False, ""

    def _set(self, draining: bool, why: str) -> None:
        if draining == self.draining:
            return
        self.draining, self.why = draining, why
        if draining:
            log.info("element %s draining (%s): no new connections, the open ones stay", self._where(), why)
        else:
            log.info("element %s serving again (%s)", self._where(), why)
        self._on_change()

    async def _health(self, channel: grpc.aio.Channel) -> None:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        try:
            async for response in call:
                if self.why != "GOAWAY":  # a GOAWAY is final for this channel, whatever health says
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
                    self._set(response.status != _SERVING, f"health {status}")
        except grpc.aio.AioRpcError:
            return  # no health service (UNIMPLEMENTED), or the channel is gone: the session says which

    async def _goaway(self, channel: grpc.aio.Channel) -> None:
        await channel.wait_for_state_change(grpc.ChannelConnectivity.READY)
        await asyncio.sleep(GOAWAY_CONFIRM)
        self._set(True, "GOAWAY")
