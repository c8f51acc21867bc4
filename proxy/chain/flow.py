"""Both directions of one connection, plus its Open phase and its end.

A flow takes events (bytes read, EOF read, a verdict arrived, a peer reset) and asks its
two sides for actions: its sockets (write these bytes, half-close, dial, end with FIN
or RST) and its elements (send this event to element i). No sockets and no gRPC live
here, so every rule about ordering, pipelining, half-close, close and reset is tested
without I/O (tests/test_chain.py, tests/chain_model.py).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

from proxy.chain.lane import DONE, ENDED, Lane
from proxy.chain.types import Action, ChainPlan, Direction, ElementPort, FlowView, LaneLimits, Outcome, Peer, SocketSide
from proxy.chain.verdicts import Effect, rule


class FlowState(enum.Enum):
    OPENING = "opening"    # the Open phase: inline Open stages answer, in chain order, before the dial
    RELAYING = "relaying"  # the upstream is dialed or dialing; both lanes run
    CLOSING = "closing"    # an element closed it: both lanes drain, then FIN both ways
    ENDED = "ended"


class Flow:
    """One connection's decisions; `peer` is the connection as elements see it (its id, addresses)."""

    __slots__ = ("plan", "sockets", "ports", "peer", "id", "request", "response", "seq", "touched", "open_metadata",
                 "state", "open_waiting")

    def __init__(self, plan: ChainPlan, limits: LaneLimits, sockets: SocketSide, ports: Sequence[ElementPort],
                 peer: Peer) -> None:
        self.plan = plan
        self.sockets = sockets
        self.ports = ports
        self.peer = peer
        self.id = peer.id
        self.state = FlowState.OPENING
        self.request = Lane(self, Direction.REQUEST, plan.request, limits)
        self.response = Lane(self, Direction.RESPONSE, plan.response, limits)
        self.seq = 0
        self.touched: set[int] = set()
        self.open_metadata: dict[str, str] = {}
        self.open_waiting = -1

    @property
    def ended(self) -> bool:
        return self.state is FlowState.ENDED

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def lane(self, direction: Direction) -> Lane:
        return self.request if direction == Direction.REQUEST else self.response

    def use(self, element: int) -> None:
        """The first event of this connection for `element` is on its way."""
        self.touched.add(element)
        self.ports[element].track(self.peer)

    def start(self) -> None:
        """Runs the Open phase: inline Open stages answer in chain order before the upstream is dialed.

        Call it once for every connection, Open stages or not: it is what marks the flow relaying."""
        self._open_from(0)

    def _open_from(self, pos: int) -> None:
        stages = self.plan.open
        while pos < len(stages):
            element = stages[pos].element
            if element not in self.touched:
                self.use(element)
            if stages[pos].inline:
                self.open_waiting = pos
                self.ports[element].send_open(self.peer, self.open_metadata, self, pos)
                return
            self.ports[element].send_open(self.peer, self.open_metadata, None, pos)
            if self.state is FlowState.ENDED:
                return
            pos += 1
        self.state = FlowState.RELAYING
        self.sockets.dial()

    def on_verdict(self, pos: int, seq: int, action: int, data: bytes | None,
                   metadata: Mapping[str, str] | None, reply: bytes | None = None, done: bool = False) -> None:
        """A verdict on the Open event sent to the stage at `pos` of the Open phase; its reply goes to
        the client before anything else (with CLOSE, before the FIN)."""
        if self.state is not FlowState.OPENING or pos != self.open_waiting:
            return
        found = rule(action)
        element = self.plan.open[pos].element
        if reply and found.on_chunk is not Effect.END:
            self.reply(Direction.REQUEST, reply)
        if found.open_continues:
            if metadata:
                self.open_metadata = {**self.open_metadata, **metadata}
            if done:
                self._bypass(element)
            self._open_from(pos + 1)
            return
        assert found.outcome is not None
        self.end(found.outcome, f"element {self.plan.name(element)} {found.said(' on open')}")

    def on_resumed_verdict(self, element: int, action: int, done: bool = False) -> None:
        """A verdict on the resumed Open a new session of `element` was sent: CLOSE and RESET end
        the connection as they would mid-stream (nothing of it is waiting on that verdict). A reply
        is ignored: the connection is mid-stream, where bytes of the element's would corrupt it."""
        self._unawaited(element, action, " on resume", done)

    def on_late_verdict(self, element: int, action: int) -> None:
        """A detect-mode element's CLOSE or RESET, applied when it arrives: what was written stays
        written; a CLOSE drains what is in flight, then FIN both ways."""
        self._unawaited(element, action, " (detect mode, late)")

    def _unawaited(self, element: int, action: int, at: str, done: bool = False) -> None:
        found = rule(action)
        if self.state is FlowState.ENDED:
            return
        if found.open_continues:
            if done:
                self._bypass(element)
            return
        if found.outcome is Outcome.CLOSED_BY_ELEMENT:
            self._close(None, None, element, found.said(at))
            return
        assert found.outcome is not None
        self.end(found.outcome, f"element {self.plan.name(element)} {found.said(at)}")

    def _bypass(self, element: int) -> None:
        """`done` on an Open verdict: the element wants no Data event of this connection."""
        for lane in (self.request, self.response):
            for pos, stage in enumerate(lane.stages):
                if stage.element == element:
                    lane.exhaust(pos)

    def reply(self, direction: Direction, data: bytes) -> None:
        """A verdict's reply to the sender of a chunk of `direction`, written at once by the lane
        that writes to that side, unless that side got its EOF already."""
        back = self.response if direction == Direction.REQUEST else self.request
        if back.state is not DONE and back.state is not ENDED:
            back.emit(data)

    def close_by_element(self, lane: Lane, seq: int, element: int) -> None:
        """ACTION_CLOSE: drop from `seq` on in `lane`, drain both lanes, then FIN both ways."""
        self._close(lane, seq, element, rule(Action.CLOSE).said())

    def _close(self, lane: Lane | None, seq: int | None, element: int, says: str) -> None:
        if self.state is FlowState.OPENING:
            self.end(Outcome.CLOSED_BY_ELEMENT, f"element {self.plan.name(element)} {says}")
            return
        self.state = FlowState.CLOSING
        first = lane or self.request
        other = self.response if first is self.request else self.request
        first.stop_input(seq)
        other.stop_input(None)

    def lane_done(self) -> None:
        if self.request.state is DONE and self.response.state is DONE:
            self.end(Outcome.CLOSED_BY_ELEMENT if self.state is FlowState.CLOSING else Outcome.COMPLETED, "")

    def end(self, outcome: Outcome, detail: str) -> None:
        """The connection is over: both lanes stop, every element it used gets its Close, then the
        sockets end with FIN or RST (by `outcome`)."""
        if self.state is FlowState.ENDED:
            return
        self.state = FlowState.ENDED
        self.request.state = self.response.state = ENDED
        for element in sorted(self.touched):
            self.ports[element].send_close(self.peer, outcome)
        self.sockets.finish(outcome, detail)


class Resumed:
    """Where the verdict on a resumed Open goes: `pos` is the element's index in the chain."""

    __slots__ = ("flow",)

    def __init__(self, flow: FlowView) -> None:
        self.flow = flow

    def on_verdict(self, pos: int, seq: int, action: int, data: bytes | None,
                   metadata: Mapping[str, str] | None, reply: bytes | None = None, done: bool = False) -> None:
        self.flow.on_resumed_verdict(pos, action, done)
