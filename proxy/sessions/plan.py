"""The chain this worker runs: one fleet per element (a session per replica, fleet.py) and the
plan their descriptions give.

The plan is rebuilt only when a session (re)describes its element, then shared by
every new connection; a connection keeps the plan it started with.
"""

from __future__ import annotations

import asyncio

from elements.api import element_pb2 as pb
from proxy.chain import ChainPlan, Direction, ElementPort, Stage
from proxy.config import ElementConfig
from proxy.sessions.fleet import Fleet
from proxy.sessions.validate import VerdictLimits


def plan_for(descriptions: list[pb.Description | None], names: tuple[str, ...] = (),
             skipped: frozenset[int] = frozenset(), unwaited: frozenset[int] = frozenset()) -> ChainPlan:
    """Stages per direction: requests visit elements 0..N-1, responses N-1..0.

    An element never reached has no description: it is planned as inline on Open and
    both directions, so its failure policy decides (fail-closed rejects before dialing).
    `skipped` elements (fail-open, breaker open) get no stage at all; `unwaited` ones (the
    operator's detect and shadow modes) are planned like observe-mode elements, whatever they say.
    """
    request: list[Stage] = []
    response: list[Stage] = []
    open_stages: list[Stage] = []
    for index, description in enumerate(descriptions):
        if index in skipped:
            continue
        if description is None:
            if index in unwaited:
                continue  # never waited for, so never answered for: its session's warning says it is down
            for stages in (request, response, open_stages):
                stages.append(Stage(index))
            continue
        _plan_element(index, description, index not in unwaited, request, response, open_stages)
    read_only = frozenset(i for i, d in enumerate(descriptions) if d is not None and d.read_only)
    return ChainPlan(_parallel(request, read_only), _parallel(response[::-1], read_only), tuple(open_stages),
                     names)


def _parallel(stages: list[Stage], read_only: frozenset[int]) -> tuple[Stage, ...]:
    """Consecutive inline read-only stages without a byte limit become one parallel stage (its first
    element, the others as `peers`, in chain order): one round trip for all of them per chunk."""
    planned: list[Stage] = []
    for stage in stages:
        joins = stage.inline and not stage.byte_limit and stage.element in read_only
        last = planned[-1] if planned else None
        if joins and last is not None and last.inline and not last.byte_limit and last.element in read_only:
            planned[-1] = Stage(last.element, peers=(*last.peers, stage.element))
        else:
            planned.append(stage)
    return tuple(planned)


def _plan_element(index: int, description: pb.Description, waited: bool, request: list[Stage],
                  response: list[Stage], open_stages: list[Stage]) -> None:
    """The stages of one element that described itself."""
    inline = description.mode != pb.MODE_OBSERVE and waited
    directions = set(description.directions) or {Direction.REQUEST, Direction.RESPONSE}
    if Direction.REQUEST in directions:
        request.append(Stage(index, inline, description.request_bytes_limit))
    if Direction.RESPONSE in directions:
        response.append(Stage(index, inline, description.response_bytes_limit))
    if description.wants_open:
        open_stages.append(Stage(index, inline))


class Chain:
    """The element fleets of one worker, the ports flows talk to, and the current plan."""

    def __init__(self, elements: tuple[ElementConfig, ...], limits: VerdictLimits) -> None:
        self.elements = elements
        self.fleets = [Fleet(i, e, self._replan, limits) for i, e in enumerate(elements)]
        self.ports: list[ElementPort] = [fleet.port for fleet in self.fleets]
        self.plan = plan_for([None] * len(self.fleets), tuple(f.name for f in self.fleets))
        self.users = 0
        self.retired = False

    def _replan(self) -> None:
        self.plan = plan_for([f.description for f in self.fleets], tuple(f.name for f in self.fleets),
                             frozenset(f.index for f in self.fleets if f.tripped and f.config.fail_open),
                             frozenset(f.index for f in self.fleets if f.config.mode != "inline"))

    def refusing(self) -> str | None:
        """Why new connections are refused: a fail-closed element whose every breaker is open."""
        for fleet in self.fleets:
            if fleet.tripped and not fleet.config.fail_open:
                return f"element {fleet.name} (fail-closed) circuit breaker open"
        return None

    def start(self) -> None:
        for fleet in self.fleets:
            fleet.start()

    @property
    def settled(self) -> bool:
        """Every element answered: a replica is up, or its Describe was refused (which only a
        restart of the element changes, so start-up does not wait for it)."""
        return all(fleet.settled for fleet in self.fleets)

    async def stop(self) -> None:
        for fleet in self.fleets:
            await fleet.stop()

    def acquire(self) -> None:
        """A connection starts on this chain; it keeps it until it ends, even across a reload."""
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.retired and self.users == 0:
            asyncio.get_running_loop().create_task(self.stop())

    def retire(self) -> None:
        """Replaced by a reload: stop the sessions once the last connection on this chain ends."""
        self.retired = True
        if self.users == 0:
            asyncio.get_running_loop().create_task(self.stop())
