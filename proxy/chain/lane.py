"""One direction of a connection: bytes read on one socket, through the stages, to the other.

A lane's life is a handful of named states (`LaneState`), every move between them is a
row of `TRANSITIONS`, and every verdict is applied by looking its action up in
verdicts.py. Ordering needs no reorder buffer: each inline stage keeps the chunks it
holds in a FIFO and releases them strictly in send order, so chunks leave the last
stage in the order they were read, whatever order verdicts arrive in.

A chunk an element answered HOLD leaves its stage's FIFO for that stage's `held` list: it
no longer takes a window slot (the element waits for more bytes, which the window must
let through) but its bytes still count against high_water. The element's next verdict
there decides the held chunks together with its own chunk, which carries them on.
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

    # members are singletons: identity hashing spares Enum's Python-level __hash__ on each
    # TRANSITIONS lookup (two per state change)
    __hash__ = object.__hash__


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

# action, replacement bytes, metadata, reply, done (the proto Verdict's fields, as the lane needs them)
Verdict = tuple[int, bytes | None, Mapping[str, str] | None, bytes | None, bool]
_PASS_UNCHANGED: Verdict = (Action.PASS, None, None, None, False)


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

    def reply(self, direction: Direction, data: bytes) -> None: ...

    def end(self, outcome: Outcome, detail: str) -> None: ...

    def lane_done(self) -> None: ...


class _Chunk:
    __slots__ = ("seq", "data", "eos", "size", "metadata", "verdict", "held")

    def __init__(self, seq: int, data: Payload, eos: bool) -> None:
        self.seq = seq
        self.data = data
        self.eos = eos
        self.size = len(data)  # bytes read that this chunk accounts for: its own, plus those it carries on
        self.metadata: dict[str, str] | None = None
        self.verdict: Verdict | None = None
        self.held: list[_Chunk] | None = None  # the chunks its verdict decides with it (HOLD)


class Lane:
    """One direction: `feed` and `feed_eof` from its source, `on_verdict` from its stages' elements."""

    __slots__ = ("flow", "direction", "stages", "limits", "ports", "sockets", "emit", "fifos", "seen", "exhausted",
                 "held", "pending", "in_flight", "in_flight_bytes", "state", "reading", "passthrough", "tapping",
                 "pumping", "groups")

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
        self.exhausted = [False] * len(stages)  # bypassed: its byte limit is reached, or its element said done
        self.held: dict[int, list[_Chunk]] = {}  # stage position -> chunks its element holds (HOLD), in order
        self.pending = Pending()
        self.in_flight = 0
        self.in_flight_bytes = 0
        self.state = READING
        self.reading = True
        self.passthrough = not stages
        # no stage waits (observe, detect, shadow): a read goes to each element and straight out
        self.tapping = bool(stages) and not any(stage.inline for stage in stages)
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
        if self.in_flight == 0:
            if self.passthrough:
                self.emit(data)
                return
            if self.tapping and len(data) <= self.limits.chunk_size:
                self._tap(data)
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
            self._drop_held(drop_from_seq)
        self._set_reading(False)
        self._pump()

    def exhaust(self, pos: int) -> None:
        """The element at `pos` wants no more of this lane (`done`): later chunks bypass it."""
        self.exhausted[pos] = True
        self._check_passthrough()

    def holder_lost(self, pos: int, action: int) -> None:
        """The element at `pos` can no longer decide the chunks it holds (its session ended):
        `action`, its failure policy, decides them, as if it answered the last of them so."""
        chunks = self.held.get(pos)
        if not chunks or self.state is ENDED:
            return
        last = chunks.pop()
        if not chunks:
            del self.held[pos]
        self.in_flight += 1  # on its way again: it takes a window slot
        self._apply(last, pos, (action, None, None, None, False))

    def on_verdict(self, pos: int, seq: int, action: int, data: bytes | None,
                   metadata: Mapping[str, str] | None, reply: bytes | None = None, done: bool = False) -> None:
        """A verdict from the element at stage `pos`; released strictly in send order."""
        if self.state is ENDED:
            return
        fifo = self.fifos[pos]
        if not fifo:
            return
        if fifo[0].seq != seq:
            for chunk in fifo:
                if chunk.seq == seq:
                    chunk.verdict = (action, data, metadata, reply, done)
            return
        fifo[0].verdict = (action, data, metadata, reply, done)
        while fifo and fifo[0].verdict is not None and self.state is not ENDED:
            chunk = fifo.popleft()
            verdict = chunk.verdict
            chunk.verdict = None
            self._apply(chunk, pos, verdict)

    def _apply(self, chunk: _Chunk, pos: int, verdict: Verdict | None) -> None:
        """Does what the verdict's action says (verdicts.RULES) to `chunk`, waiting at stage `pos`, and
        to the chunks that stage holds: first its reply goes back to the sender, then the effect."""
        assert verdict is not None
        found = RULES.get(verdict[0]) or rule(verdict[0])
        effect = found.on_chunk
        if (verdict[3] or verdict[4] or self.held) and not self._besides(chunk, pos, verdict, effect):
            return
        _EFFECTS[effect](self, chunk, pos, verdict, found)

    def _besides(self, chunk: _Chunk, pos: int, verdict: Verdict, effect: Effect) -> bool:
        """What a verdict does besides its effect, in this order: its reply goes back, the chunks
        the stage holds join `chunk` (unless it is held too), `done` bypasses the stage. False when
        writing the reply ended the connection."""
        if verdict[3] and effect is not Effect.END:
            self.flow.reply(self.direction, verdict[3])
            if self.state is ENDED:
                return False
        if effect is not Effect.HOLD and pos in self.held:
            chunk.held = self.held.pop(pos)
            chunk.size += sum(earlier.size for earlier in chunk.held)
            self._check_passthrough()
        if verdict[4] and (effect is Effect.FORWARD or effect is Effect.DISCARD):
            self.exhaust(pos)
        return True

    def _forward(self, chunk: _Chunk, pos: int, verdict: Verdict, found: Rule) -> None:
        data, metadata = verdict[1], verdict[2]
        held = chunk.held
        if held is not None:
            chunk.held = None
            if data is None:
                data = b"".join([*(earlier.data for earlier in held), chunk.data])
            merged: dict[str, str] = {}
            for earlier in (*held, chunk):
                merged.update(earlier.metadata or ())
            chunk.metadata = merged or None
        if data is not None:
            chunk.data = data
        if metadata:
            chunk.metadata = {**chunk.metadata, **metadata} if chunk.metadata else dict(metadata)
        self._advance(chunk, pos + 1)

    def _discard(self, chunk: _Chunk, pos: int, verdict: Verdict, found: Rule) -> None:
        chunk.held = None  # gone with it: its size accounts for them
        if chunk.eos:  # a half-close cannot be swallowed, or the peer would hang
            chunk.data = b""
            self._advance(chunk, pos + 1)
        else:
            self._forget(chunk)
            self._pump()

    def _close(self, chunk: _Chunk, pos: int, verdict: Verdict, found: Rule) -> None:
        first = chunk.held[0].seq if chunk.held else chunk.seq
        chunk.held = None
        self._forget(chunk)
        self.flow.close_by_element(self, first, self._judge(pos, chunk.seq))

    def _hold(self, chunk: _Chunk, pos: int, verdict: Verdict, found: Rule) -> None:
        if chunk.eos:  # nothing could follow to decide it
            self._end(chunk, pos, verdict, found)
            return
        metadata = verdict[2]
        if metadata:
            chunk.metadata = {**chunk.metadata, **metadata} if chunk.metadata else dict(metadata)
        self.held.setdefault(pos, []).append(chunk)
        self.in_flight -= 1
        self.passthrough = False
        self._pump()

    def _drop_held(self, from_seq: int) -> None:
        """Discards held chunks read at or after `from_seq` (from 0: all of them)."""
        for pos, chunks in list(self.held.items()):
            kept = [chunk for chunk in chunks if chunk.seq < from_seq]
            self.in_flight_bytes -= sum(chunk.size for chunk in chunks if chunk.seq >= from_seq)
            if kept:
                self.held[pos] = kept
            else:
                del self.held[pos]

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
            if self.exhausted[pos]:
                if stage.inline and self.fifos[pos]:
                    # bypassed, but behind chunks still waiting here: it leaves after them
                    chunk.verdict = _PASS_UNCHANGED
                    self.fifos[pos].append(chunk)
                    return
                if self.held and pos in self.held:  # it takes what the bypassed element holds along
                    self._apply(chunk, pos, _PASS_UNCHANGED)
                    return
            elif self._send(stage, pos, chunk) or self.state is ENDED:
                return
            pos += 1
        self._leave(chunk)

    def _tap(self, data: Payload) -> None:
        """A read on a lane where no stage waits and nothing is in flight: to every element that
        still wants it, then out, with none of the chunk bookkeeping a wait would need."""
        seq = self.flow.next_seq()
        exhausted = self.exhausted
        for pos, stage in enumerate(self.stages):
            if not exhausted[pos]:
                self._account(stage, pos, len(data))
                self.ports[stage.element].send_data(self.flow.id, seq, self.direction, data, False, None, None, pos)
                if self.state is ENDED:
                    return
        self.emit(data)

    def _account(self, stage: Stage, pos: int, size: int) -> None:
        """The stage's element is about to see `size` more bytes: its byte limit, its first event."""
        self.seen[pos] += size
        if stage.byte_limit and self.seen[pos] >= stage.byte_limit:
            self.exhaust(pos)
        if stage.element not in self.flow.touched:
            self.flow.use(stage.element)

    def _send(self, stage: Stage, pos: int, chunk: _Chunk) -> bool:
        """Sends the chunk to the stage's element; True when the stage holds it for the verdict."""
        if stage.peers:
            return self._send_group(stage, pos, chunk)
        self._account(stage, pos, len(chunk.data))
        if stage.inline:
            self.fifos[pos].append(chunk)
            self.ports[stage.element].send_data(self.flow.id, chunk.seq, self.direction, chunk.data, chunk.eos,
                                                chunk.metadata, self, pos)
            return True
        self.ports[stage.element].send_data(self.flow.id, chunk.seq, self.direction, chunk.data, chunk.eos,
                                            chunk.metadata, None, pos)
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
        self.passthrough = not self.held and all(self.exhausted)

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
                self._drop_held(0)  # nothing is left to decide them: bytes no element approved are not written
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
        """Pauses the source at high_water bytes read but not yet written, resumes below half of it.

        Held bytes count, but a lane whose only buffered bytes are held keeps reading: the
        elements holding them wait for the bytes that would decide them (the sessions bound
        what each may hold by its max_held_bytes)."""
        buffered = self.pending.size + self.in_flight_bytes
        high_water = self.limits.high_water
        if buffered >= high_water and self.in_flight:
            if self.reading:
                self._set_reading(False)
        elif not self.reading and (2 * buffered < high_water or not self.in_flight):
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
            Effect.END: Lane._end, Effect.HOLD: Lane._hold}
assert set(_EFFECTS) == set(Effect), "every Effect needs its handler in the lane"
