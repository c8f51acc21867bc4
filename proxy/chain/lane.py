"""One direction of a connection: bytes read on one socket, through the stages, to the other.

A lane's life is a handful of named states (`LaneState`), every move between them is a
row of `TRANSITIONS`, and every verdict is applied by looking its action up in
verdicts.py. Ordering needs no reorder buffer: each inline stage keeps the chunks it
holds in a FIFO and releases them strictly in send order, so chunks leave the last
stage in the order they were read, whatever order verdicts arrive in.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Protocol

from proxy.chain.group import Group
from proxy.chain.pending import Pending
from proxy.chain.types import Action, ChainPlan, Direction, ElementPort, LaneLimits, Outcome, Payload, SocketSide, Stage
from proxy.chain.verdicts import RULES, Effect, Rule, rule


class LaneState(enum.Enum):
    READING = "reading"        # the source is open: reads are dispatched, or queued while the window is full
    EOF_QUEUED = "eof queued"  # the source half-closed; its EOF waits behind the queued bytes
    EOF_SENT = "eof sent"      # the EOF travels through the stages behind the last bytes
    DRAINING = "draining"      # an element closed the connection: what is in flight finishes, then EOF
    DONE = "done"              # the EOF was written out
    ENDED = "ended"            # the connection ended: nothing more happens here


READING, EOF_QUEUED, EOF_SENT = LaneState.READING, LaneState.EOF_QUEUED, LaneState.EOF_SENT
DRAINING, DONE, ENDED = LaneState.DRAINING, LaneState.DONE, LaneState.ENDED

# Every move a lane can make; anything else is a bug, raised where it happens.
TRANSITIONS: dict[LaneState, frozenset[LaneState]] = {
    READING: frozenset((EOF_QUEUED, DONE, DRAINING, ENDED)),
    EOF_QUEUED: frozenset((EOF_SENT, DRAINING, ENDED)),
    EOF_SENT: frozenset((DONE, DRAINING, ENDED)),
    DRAINING: frozenset((DRAINING, DONE, ENDED)),
    DONE: frozenset((ENDED,)),
    ENDED: frozenset(),
}

Verdict = tuple[int, bytes | None, Mapping[str, str] | None]
_PASS_UNCHANGED: Verdict = (Action.PASS, None, None)


class LaneOwner(Protocol):
    """What a lane asks of its flow (flow.py): both lanes share one sequence, one set of elements
    used, and one end."""

    id: str
    plan: ChainPlan
    ports: Sequence[ElementPort]
    sockets: SocketSide
    touched: set[int]

    def next_seq(self) -> int: ...

    def use(self, element: int) -> None: ...

    def close_by_element(self, lane: Lane, seq: int, element: int) -> None: ...

    def end(self, outcome: Outcome, detail: str) -> None: ...

    def lane_done(self) -> None: ...


class _Chunk:
    __slots__ = ("seq", "data", "eos", "size", "metadata", "verdict")

    def __init__(self, seq: int, data: Payload, eos: bool) -> None:
        self.seq = seq
        self.data = data
        self.eos = eos
        self.size = len(data)
        self.metadata: dict[str, str] | None = None
        self.verdict: Verdict | None = None


class Lane:
    """One direction: `feed` and `feed_eof` from its source, `on_verdict` from its stages' elements."""

    __slots__ = ("flow", "direction", "stages", "limits", "ports", "sockets", "emit", "fifos", "seen", "pending",
                 "in_flight", "in_flight_bytes", "state", "reading", "passthrough", "pumping", "groups")

    def __init__(self, flow: LaneOwner, direction: Direction, stages: tuple[Stage, ...], limits: LaneLimits) -> None:
        self.flow = flow
        self.direction = direction
        self.stages = stages
        self.limits = limits
        self.ports = flow.ports
        self.sockets = flow.sockets
        self.emit = flow.sockets.writer(direction)
        self.fifos: list[deque[_Chunk]] = [deque() for _ in stages]
        self.seen = [0] * len(stages)
        self.pending = Pending()
        self.in_flight = 0
        self.in_flight_bytes = 0
        self.state = READING
        self.reading = True
        self.passthrough = not stages
        self.pumping = False
        self.groups: dict[int, Group] | None = None  # parallel stages by position, made at their first chunk

    def become(self, state: LaneState) -> None:
        """Moves to `state`, which TRANSITIONS must allow from the current one."""
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"{self.direction.name.lower()} lane: {self.state.value} -> {state.value} "
                               f"is not a transition")
        self.state = state

    def feed(self, data: bytes) -> None:
        """Bytes read from this direction's source."""
        if self.state is not READING:
            return
        if self.in_flight == 0 and self.passthrough:
            self.emit(data)
            return
        if not self.pending.size and self.in_flight < self.limits.window and len(data) <= self.limits.chunk_size:
            self._dispatch(data, False)
        else:
            self.pending.append(data)
        self._pump()

    def feed_eof(self) -> None:
        """The source half-closed: the EOF travels through the chain behind the last bytes."""
        if self.state is not READING:
            return
        if self.in_flight == 0 and self.passthrough:
            self._write_eof()
            return
        self.become(EOF_QUEUED)
        self._pump()

    def stop_input(self, drop_from_seq: int | None) -> None:
        """An element closed the connection: read nothing more, drop chunks from drop_from_seq on,
        let the rest finish the chain, then half-close (see ACTION_CLOSE in the proto)."""
        if self.state is ENDED:
            return
        if self.state is not DONE:
            self.become(DRAINING)
        if drop_from_seq is not None:
            self.pending.clear()
            for fifo in self.fifos:
                kept = [chunk for chunk in fifo if chunk.seq < drop_from_seq]
                for chunk in fifo:
                    if chunk.seq >= drop_from_seq:
                        self._forget(chunk)
                fifo.clear()
                fifo.extend(kept)
        self._set_reading(False)
        self._pump()

    def on_verdict(self, pos: int, seq: int, action: int, data: bytes | None,
                   metadata: Mapping[str, str] | None) -> None:
        """A verdict from the element at stage `pos`; released strictly in send order."""
        if self.state is ENDED:
            return
        fifo = self.fifos[pos]
        if not fifo:
            return
        if fifo[0].seq != seq:
            for chunk in fifo:
                if chunk.seq == seq:
                    chunk.verdict = (action, data, metadata)
            return
        fifo[0].verdict = (action, data, metadata)
        while fifo and fifo[0].verdict is not None and self.state is not ENDED:
            chunk = fifo.popleft()
            verdict = chunk.verdict
            chunk.verdict = None
            self._apply(chunk, pos, verdict)

    def _apply(self, chunk: _Chunk, pos: int, verdict: Verdict | None) -> None:
        """Does what the verdict's action says (verdicts.RULES) to `chunk`, held at stage `pos`."""
        assert verdict is not None
        found = RULES.get(verdict[0]) or rule(verdict[0])
        _EFFECTS[found.on_chunk](self, chunk, pos, verdict, found)

    def _forward(self, chunk: _Chunk, pos: int, verdict: Verdict, found: Rule) -> None:
        _, data, metadata = verdict
        if data is not None:
            chunk.data = data
        if metadata:
            chunk.metadata = {**chunk.metadata, **metadata} if chunk.metadata else dict(metadata)
        self._advance(chunk, pos + 1)

    def _discard(self, chunk: _Chunk, pos: int, verdict: Verdict, found: Rule) -> None:
        if chunk.eos:  # a half-close cannot be swallowed, or the peer would hang
            chunk.data = b""
            self._advance(chunk, pos + 1)
        else:
            self._forget(chunk)
            self._pump()

    def _close(self, chunk: _Chunk, pos: int, verdict: Verdict, found: Rule) -> None:
        self._forget(chunk)
        self.flow.close_by_element(self, chunk.seq, self._judge(pos, chunk.seq))

    def _end(self, chunk: _Chunk, pos: int, verdict: Verdict, found: Rule) -> None:
        assert found.outcome is not None
        self.flow.end(found.outcome, f"element {self.flow.plan.name(self._judge(pos, chunk.seq))} {found.said()}")

    def _judge(self, pos: int, seq: int) -> int:
        """The element whose verdict at stage `pos` on chunk `seq` ends or closes the connection."""
        if self.groups is not None and pos in self.groups:
            return self.groups[pos].judge(seq)
        return self.stages[pos].element

    def _dispatch(self, data: Payload, eos: bool) -> None:
        chunk = _Chunk(self.flow.next_seq(), data, eos)
        self.in_flight += 1
        self.in_flight_bytes += chunk.size
        if eos:
            self.become(EOF_SENT)
        self._advance(chunk, 0)

    def _advance(self, chunk: _Chunk, pos: int) -> None:
        """Moves the chunk through stages from `pos` until one must answer, or out to the wire."""
        stages = self.stages
        while pos < len(stages):
            stage = stages[pos]
            if stage.byte_limit and self.seen[pos] >= stage.byte_limit:
                if stage.inline and self.fifos[pos]:
                    # bypassed, but behind chunks still waiting here: it leaves after them
                    chunk.verdict = _PASS_UNCHANGED
                    self.fifos[pos].append(chunk)
                    return
            elif self._send(stage, pos, chunk) or self.state is ENDED:
                return
            pos += 1
        self._leave(chunk)

    def _send(self, stage: Stage, pos: int, chunk: _Chunk) -> bool:
        """Sends the chunk to the stage's element; True when the stage holds it for the verdict."""
        if stage.peers:
            return self._send_group(stage, pos, chunk)
        self.seen[pos] += len(chunk.data)
        if stage.byte_limit and self.seen[pos] >= stage.byte_limit:
            self._check_passthrough()
        flow = self.flow
        element = stage.element
        if element not in flow.touched:
            flow.use(element)
        if stage.inline:
            self.fifos[pos].append(chunk)
            self.ports[element].send_data(flow.id, chunk.seq, self.direction, chunk.data, chunk.eos, chunk.metadata,
                                          self, pos)
            return True
        self.ports[element].send_data(flow.id, chunk.seq, self.direction, chunk.data, chunk.eos, chunk.metadata,
                                      None, pos)
        return False

    def _send_group(self, stage: Stage, pos: int, chunk: _Chunk) -> bool:
        """A parallel stage (group.py): the chunk to every member at once, held for their combined verdict."""
        if self.groups is None:
            self.groups = {}
        group = self.groups.get(pos) or self.groups.setdefault(pos, Group(self, pos, stage))
        group.expect(chunk.seq, chunk.eos)
        self.fifos[pos].append(chunk)
        flow = self.flow
        for member, element in enumerate(group.members):
            if element not in flow.touched:
                flow.use(element)
            self.ports[element].send_data(flow.id, chunk.seq, self.direction, chunk.data, chunk.eos, chunk.metadata,
                                          group, member)
            if self.state is ENDED:
                break
        return True

    def _leave(self, chunk: _Chunk) -> None:
        """The chunk passed every stage: out to the wire, with the half-close it may carry."""
        self._forget(chunk)
        if chunk.data:
            self.emit(chunk.data)
        if chunk.eos and self.state is not ENDED:
            self._write_eof()
        self._pump()

    def _check_passthrough(self) -> None:
        self.passthrough = all(stage.byte_limit and seen >= stage.byte_limit
                               for stage, seen in zip(self.stages, self.seen))

    def _forget(self, chunk: _Chunk) -> None:
        self.in_flight -= 1
        self.in_flight_bytes -= chunk.size

    def _pump(self) -> None:
        """After anything that may free room or end the input: dispatch, then half-close a drained
        lane or apply backpressure to a reading one."""
        if self.state is ENDED or self.pumping:
            return
        self._dispatch_queued()
        state = self.state
        if state is DRAINING:
            if not self.pending.size and self.in_flight == 0:
                self._write_eof()
        elif state is READING:
            self._backpressure()

    def _dispatch_queued(self) -> None:
        """Dispatches queued bytes (and a queued EOF) while the window has room.

        Chunks that leave the chain at once call back into _pump; the flag turns that
        recursion into this loop's next turn, so stack depth stays flat.
        """
        limits = self.limits
        pending = self.pending  # tested by .size: len() would be a Python call each time
        self.pumping = True
        try:
            while pending.size and self.in_flight < limits.window and self.state is not ENDED:
                piece = pending.take(limits.chunk_size)
                self._dispatch(piece, self.state is EOF_QUEUED and not pending.size)
            if self.state is EOF_QUEUED and not pending.size and self.in_flight < limits.window:
                self._dispatch(b"", True)
        finally:
            self.pumping = False

    def _backpressure(self) -> None:
        """Pauses the source at high_water bytes read but not yet written, resumes below half of it."""
        buffered = self.pending.size + self.in_flight_bytes
        high_water = self.limits.high_water
        if buffered >= high_water:
            if self.reading:
                self._set_reading(False)
        elif not self.reading and 2 * buffered < high_water:
            self._set_reading(True)

    def _set_reading(self, reading: bool) -> None:
        if reading != self.reading:
            self.reading = reading
            self.sockets.set_reading(self.direction, reading)

    def _write_eof(self) -> None:
        if self.state is DONE or self.state is ENDED:
            return
        self.become(DONE)
        self.sockets.write_eof(self.direction)
        self.flow.lane_done()


# How a lane carries out each effect of verdicts.RULES: one entry per Effect, checked at import.
_EFFECTS = {Effect.FORWARD: Lane._forward, Effect.DISCARD: Lane._discard, Effect.CLOSE: Lane._close,
            Effect.END: Lane._end}
assert set(_EFFECTS) == set(Effect), "every Effect needs its handler in the lane"
