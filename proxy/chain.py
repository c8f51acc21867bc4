"""What happens to a chunk: the pure decisions of one proxied connection.

No sockets and no gRPC live here. A `Flow` takes events (bytes read, EOF read, a
verdict arrived, a peer reset) and calls its `FlowOutput` (send this event to
element i, write these bytes, half-close, end the connection). connection.py adapts
it to asyncio transports and session.py to the element streams, so every rule about
ordering, pipelining, half-close, close and reset is here and is tested without I/O.

Ordering needs no reorder buffer: each inline stage keeps the chunks it holds in a
FIFO and releases them strictly in send order, so chunks leave the last stage in
the order they were read, whatever order verdicts arrive in.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

# A chunk's bytes: a read, or a memoryview slice of one (cutting a big read copies nothing).
Payload = bytes | memoryview


class Direction(enum.IntEnum):
    """Values equal the proto's DIRECTION_* so they go on the wire unchanged."""

    REQUEST = 1
    RESPONSE = 2


class Action(enum.IntEnum):
    """Values equal the proto's ACTION_*; FAIL is internal: a fail-closed element failure."""

    PASS = 1
    DROP = 2
    CLOSE = 3
    RESET = 4
    FAIL = 100


class Outcome(enum.IntEnum):
    """How a connection ended; values equal the proto's CLOSE_REASON_*. NOT_REDIRECTED is
    internal: such a connection never reaches an element."""

    COMPLETED = 1
    CLOSED_BY_ELEMENT = 2
    RESET_BY_ELEMENT = 3
    PEER_RESET = 4
    UPSTREAM_UNREACHABLE = 5
    FAILURE = 6
    IDLE_TIMEOUT = 7
    MAX_DURATION = 8
    PROXY_STOPPING = 9
    NOT_REDIRECTED = 100

    @property
    def graceful(self) -> bool:
        """Graceful outcomes end with FIN after everything approved is written; the rest with RST,
        so a cut stream is never mistaken for a complete one."""
        return self in (Outcome.COMPLETED, Outcome.CLOSED_BY_ELEMENT, Outcome.IDLE_TIMEOUT, Outcome.NOT_REDIRECTED)


@dataclass(frozen=True, slots=True)
class Stage:
    """One element's place in one direction of the chain."""

    element: int
    inline: bool = True
    byte_limit: int = 0


@dataclass(frozen=True, slots=True)
class ChainPlan:
    """The stages each direction visits, computed once per chain and shared by its connections."""

    request: tuple[Stage, ...] = ()
    response: tuple[Stage, ...] = ()
    open: tuple[Stage, ...] = ()
    names: tuple[str, ...] = ()

    def name(self, element: int) -> str:
        """For log lines: which element ended a connection."""
        return self.names[element] if element < len(self.names) else f"#{element}"


@dataclass(frozen=True, slots=True)
class LaneLimits:
    """How much one direction may hold: chunks in the chain, bytes before reading pauses."""

    chunk_size: int = 65536
    window: int = 8
    high_water: int = 1 << 20


class VerdictTarget(Protocol):
    def on_verdict(self, pos: int, seq: int, action: int, data: bytes | None,
                   metadata: Mapping[str, str] | None) -> None: ...


class FlowOutput(Protocol):
    """What a Flow asks of the world; `target`/`pos` route the verdict back (None: do not wait)."""

    def send_open(self, element: int, metadata: Mapping[str, str], target: VerdictTarget | None, pos: int) -> None: ...

    def send_data(self, element: int, seq: int, direction: Direction, data: Payload, end_of_stream: bool,
                  metadata: Mapping[str, str] | None, target: VerdictTarget | None, pos: int) -> None: ...

    def send_close(self, element: int, outcome: Outcome) -> None: ...

    def track(self, element: int) -> None:
        """The connection is about to send element its first event: from now on it uses that element
        (a new session of the element is told about it, and it gets the Close)."""

    def writer(self, direction: Direction) -> Callable[[Payload], None]:
        """What writes this direction's bytes out; asked once per lane, so a chunk's way out
        skips a dispatch on its direction (the whole per-read cost of an empty chain)."""

    def write_eof(self, direction: Direction) -> None: ...

    def set_reading(self, direction: Direction, reading: bool) -> None: ...

    def dial(self) -> None: ...

    def finish(self, outcome: Outcome, detail: str) -> None: ...


class _Chunk:
    __slots__ = ("seq", "data", "eos", "size", "metadata", "verdict")

    def __init__(self, seq: int, data: Payload, eos: bool) -> None:
        self.seq = seq
        self.data = data
        self.eos = eos
        self.size = len(data)
        self.metadata: dict[str, str] | None = None
        self.verdict: tuple[int, bytes | None, Mapping[str, str] | None] | None = None


_PASS_UNCHANGED = (Action.PASS, None, None)


class Pending:
    """Bytes read but not yet dispatched, kept as the reads themselves.

    A read larger than chunk_size is cut into memoryview slices, not copied; only reads
    smaller than a chunk are joined (coalescing). Under bulk this was three copies of
    every byte when the queue was one bytearray.
    """

    __slots__ = ("pieces", "size")

    def __init__(self) -> None:
        self.pieces: deque[Payload] = deque()
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.pieces)

    def append(self, data: bytes) -> None:
        self.pieces.append(data)
        self.size += len(data)

    def clear(self) -> None:
        self.pieces.clear()
        self.size = 0

    def take(self, limit: int) -> Payload:
        """Up to `limit` bytes from the front."""
        pieces = self.pieces
        first = pieces.popleft()
        if len(first) >= limit or not pieces:
            if len(first) > limit:
                view = memoryview(first)
                pieces.appendleft(view[limit:])
                first = view[:limit]
            self.size -= len(first)
            return first
        taken, room = [first], limit - len(first)
        while pieces and room:
            piece = pieces.popleft()
            if len(piece) > room:
                view = memoryview(piece)
                pieces.appendleft(view[room:])
                piece = view[:room]
            taken.append(piece)
            room -= len(piece)
        self.size -= limit - room
        return b"".join(taken)


class Lane:
    """One direction of a connection: bytes read on one socket, through the stages, to the other."""

    __slots__ = ("flow", "direction", "stages", "limits", "out", "emit", "fifos", "seen", "pending", "pending_eof",
                 "in_flight", "in_flight_bytes", "input_open", "eof_dispatched", "eof_written",
                 "drain_then_eof", "reading", "passthrough", "pumping")

    def __init__(self, flow: Flow, direction: Direction, stages: tuple[Stage, ...], limits: LaneLimits,
                 out: FlowOutput) -> None:
        self.flow = flow
        self.direction = direction
        self.stages = stages
        self.limits = limits
        self.out = out
        self.emit = out.writer(direction)
        self.fifos: list[deque[_Chunk]] = [deque() for _ in stages]
        self.seen = [0] * len(stages)
        self.pending = Pending()
        self.pending_eof = False
        self.in_flight = 0
        self.in_flight_bytes = 0
        self.input_open = True
        self.eof_dispatched = False
        self.eof_written = False
        self.drain_then_eof = False
        self.reading = True
        self.passthrough = not stages
        self.pumping = False

    def feed(self, data: bytes) -> None:
        """Bytes read from this direction's source."""
        if not self.input_open or self.flow.ended:
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
        if not self.input_open or self.flow.ended:
            return
        self.input_open = False
        if self.in_flight == 0 and self.passthrough:
            self._write_eof()
            return
        self.pending_eof = True
        self._pump()

    def stop_input(self, drop_from_seq: int | None) -> None:
        """An element closed the connection: read nothing more, drop chunks from drop_from_seq on,
        let the rest finish the chain, then half-close (see ACTION_CLOSE in the proto)."""
        self.input_open = False
        self.pending_eof = False
        self.drain_then_eof = True
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
        if self.flow.ended:
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
        while fifo and fifo[0].verdict is not None and not self.flow.ended:
            chunk = fifo.popleft()
            verdict = chunk.verdict
            chunk.verdict = None
            self._apply(chunk, pos, verdict)

    def _apply(self, chunk: _Chunk, pos: int, verdict: tuple[int, bytes | None, Mapping[str, str] | None]) -> None:
        action, data, metadata = verdict
        if action == Action.PASS:
            if data is not None:
                chunk.data = data
            if metadata:
                chunk.metadata = {**chunk.metadata, **metadata} if chunk.metadata else dict(metadata)
            self._advance(chunk, pos + 1)
        elif action == Action.DROP:
            if chunk.eos:
                chunk.data = b""
                self._advance(chunk, pos + 1)
            else:
                self._forget(chunk)
                self._pump()
        elif action == Action.CLOSE:
            self._forget(chunk)
            self.flow.close_by_element(self, chunk.seq, self.stages[pos].element)
        elif action == Action.RESET:
            self.flow.reset(Outcome.RESET_BY_ELEMENT, f"element {self._name(pos)} reset it")
        else:
            self.flow.reset(Outcome.FAILURE, f"element {self._name(pos)} failed (fail-closed)")

    def _name(self, pos: int) -> str:
        return self.flow.plan.name(self.stages[pos].element)

    def _dispatch(self, data: Payload, eos: bool) -> None:
        chunk = _Chunk(self.flow.next_seq(), data, eos)
        self.in_flight += 1
        self.in_flight_bytes += chunk.size
        if eos:
            self.eof_dispatched = True
        self._advance(chunk, 0)

    def _advance(self, chunk: _Chunk, pos: int) -> None:
        """Moves the chunk through stages from `pos` until one must answer, or out to the wire."""
        stages = self.stages
        while pos < len(stages):
            stage = stages[pos]
            fifo = self.fifos[pos]
            if stage.byte_limit and self.seen[pos] >= stage.byte_limit:
                if stage.inline and fifo:
                    chunk.verdict = _PASS_UNCHANGED
                    fifo.append(chunk)
                    return
                pos += 1
                continue
            self.seen[pos] += len(chunk.data)
            if stage.byte_limit and self.seen[pos] >= stage.byte_limit:
                self._check_passthrough()
            if stage.element not in self.flow.touched:
                self.flow.use(stage.element)
            if stage.inline:
                fifo.append(chunk)
                self.out.send_data(stage.element, chunk.seq, self.direction, chunk.data, chunk.eos,
                                   chunk.metadata, self, pos)
                return
            self.out.send_data(stage.element, chunk.seq, self.direction, chunk.data, chunk.eos,
                               chunk.metadata, None, pos)
            if self.flow.ended:
                return
            pos += 1
        self._forget(chunk)
        if chunk.data:
            self.emit(chunk.data)
        if chunk.eos and not self.flow.ended:
            self._write_eof()
        self._pump()

    def _check_passthrough(self) -> None:
        self.passthrough = all(stage.byte_limit and seen >= stage.byte_limit
                               for stage, seen in zip(self.stages, self.seen))

    def _forget(self, chunk: _Chunk) -> None:
        self.in_flight -= 1
        self.in_flight_bytes -= chunk.size

    def _pump(self) -> None:
        """Dispatches coalesced bytes while the window has room; pauses or resumes the source.

        Chunks that leave the chain at once call back into _pump; the flag turns that
        recursion into this loop's next turn, so stack depth stays flat.
        """
        if self.flow.ended or self.pumping:
            return
        limits = self.limits
        pending = self.pending  # tested by .size: len() would be a Python call each time
        self.pumping = True
        try:
            while pending.size and self.in_flight < limits.window and not self.flow.ended:
                piece = pending.take(limits.chunk_size)
                self._dispatch(piece, self.pending_eof and not pending.size)
            if (self.pending_eof and not pending.size and not self.eof_dispatched
                    and self.in_flight < limits.window and not self.flow.ended):
                self._dispatch(b"", True)
        finally:
            self.pumping = False
        if self.flow.ended:
            return
        if self.drain_then_eof and not pending.size and self.in_flight == 0 and not self.eof_written:
            self._write_eof()
            return
        if self.input_open:
            buffered = pending.size + self.in_flight_bytes  # read, not yet written: what backpressure bounds
            if buffered >= limits.high_water:
                if self.reading:
                    self._set_reading(False)
            elif not self.reading and 2 * buffered < limits.high_water:
                self._set_reading(True)

    def _set_reading(self, reading: bool) -> None:
        if reading != self.reading:
            self.reading = reading
            self.out.set_reading(self.direction, reading)

    def _write_eof(self) -> None:
        if self.eof_written:
            return
        self.eof_written = True
        self.out.write_eof(self.direction)
        self.flow.lane_done()


class Flow:
    """Both directions of one connection plus its Open phase and its end."""

    __slots__ = ("plan", "out", "request", "response", "seq", "touched", "open_metadata", "ended",
                 "opened", "closing", "open_waiting")

    def __init__(self, plan: ChainPlan, limits: LaneLimits, out: FlowOutput) -> None:
        self.plan = plan
        self.out = out
        self.request = Lane(self, Direction.REQUEST, plan.request, limits, out)
        self.response = Lane(self, Direction.RESPONSE, plan.response, limits, out)
        self.seq = 0
        self.touched: set[int] = set()
        self.open_metadata: dict[str, str] = {}
        self.ended = False
        self.opened = False
        self.closing = False
        self.open_waiting = -1

    def use(self, element: int) -> None:
        """The first event of this connection for `element` is on its way."""
        self.touched.add(element)
        self.out.track(element)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def lane(self, direction: Direction) -> Lane:
        return self.request if direction == Direction.REQUEST else self.response

    def start(self) -> None:
        """Runs the Open phase: inline Open stages answer in chain order before the upstream is dialed.

        Call it once for every connection, Open stages or not: it is what marks the flow opened."""
        self._open_from(0)

    def _open_from(self, pos: int) -> None:
        stages = self.plan.open
        while pos < len(stages):
            stage = stages[pos]
            if stage.element not in self.touched:
                self.use(stage.element)
            if stage.inline:
                self.open_waiting = pos
                self.out.send_open(stage.element, self.open_metadata, self, pos)
                return
            self.out.send_open(stage.element, self.open_metadata, None, pos)
            if self.ended:
                return
            pos += 1
        self.opened = True
        self.out.dial()

    def on_verdict(self, pos: int, seq: int, action: int, data: bytes | None,
                   metadata: Mapping[str, str] | None) -> None:
        """A verdict on the Open event sent to the stage at `pos` of the Open phase."""
        if self.ended or self.opened or pos != self.open_waiting:
            return
        element = self.plan.name(self.plan.open[pos].element)
        if action in (Action.PASS, Action.DROP):
            if metadata:
                self.open_metadata = {**self.open_metadata, **metadata}
            self._open_from(pos + 1)
        elif action == Action.CLOSE:
            self._end(Outcome.CLOSED_BY_ELEMENT, f"element {element} rejected it on open")
        elif action == Action.RESET:
            self._end(Outcome.RESET_BY_ELEMENT, f"element {element} reset it on open")
        else:
            self._end(Outcome.FAILURE, f"element {element} failed on open (fail-closed)")

    def on_resumed_verdict(self, element: int, action: int) -> None:
        """A verdict on the resumed Open a new session of `element` was sent: CLOSE and RESET end
        the connection as they would mid-stream (nothing of it is waiting on that verdict)."""
        if self.ended or action in (Action.PASS, Action.DROP):
            return
        name = self.plan.name(element)
        if action == Action.CLOSE:
            if not self.opened:
                self._end(Outcome.CLOSED_BY_ELEMENT, f"element {name} closed it on resume")
                return
            self.closing = True
            self.request.stop_input(None)
            if not self.ended:
                self.response.stop_input(None)
        elif action == Action.RESET:
            self.reset(Outcome.RESET_BY_ELEMENT, f"element {name} reset it on resume")
        else:
            self.reset(Outcome.FAILURE, f"element {name} failed on resume (fail-closed)")

    def close_by_element(self, lane: Lane, seq: int, element: int) -> None:
        """ACTION_CLOSE: drop from `seq` on in `lane`, drain both lanes, then FIN both ways."""
        if not self.opened:
            self._end(Outcome.CLOSED_BY_ELEMENT, f"element {self.plan.name(element)} closed it")
            return
        self.closing = True
        other = self.response if lane is self.request else self.request
        lane.stop_input(seq)
        if not self.ended:
            other.stop_input(None)

    def reset(self, outcome: Outcome, detail: str) -> None:
        """Ends the connection at once with RST both ways; nothing pending is written."""
        self._end(outcome, detail)

    def lane_done(self) -> None:
        if self.request.eof_written and self.response.eof_written:
            self._end(Outcome.CLOSED_BY_ELEMENT if self.closing else Outcome.COMPLETED, "")

    def _end(self, outcome: Outcome, detail: str) -> None:
        if self.ended:
            return
        self.ended = True
        for element in sorted(self.touched):
            self.out.send_close(element, outcome)
        self.out.finish(outcome, detail)


class Resumed:
    """Where the verdict on a resumed Open goes: `pos` is the element's index in the chain."""

    __slots__ = ("flow",)

    def __init__(self, flow: Flow) -> None:
        self.flow = flow

    def on_verdict(self, pos: int, seq: int, action: int, data: bytes | None,
                   metadata: Mapping[str, str] | None) -> None:
        self.flow.on_resumed_verdict(pos, action)
