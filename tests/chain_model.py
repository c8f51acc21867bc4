"""A recording FlowOutput for proxy/chain.py and a reference model of what the chain should do.

The recorder is a plain class: every call becomes a small frozen dataclass in `calls`, so
scripted tests compare lists and a failing assert shows the whole difference. Calls that
wait for a verdict (a target was given) also become `Ask`s, which a test answers with
`Harness.verdict` or, in the property tests, in whatever order hypothesis picks.

The model (`model_lane`) is deliberately written differently from chain.py: no FIFOs and no
callbacks, it recomputes from scratch, from the chunks a lane dispatched and the verdicts
delivered so far, where every chunk is now: received by which stages (with which bytes and
metadata), stuck at a stage, dropped, ended by a terminal verdict, or out on the wire.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from proxy.chain import Action, ChainPlan, Direction, Flow, Lane, LaneLimits, Outcome, Stage, VerdictTarget

REQ = Direction.REQUEST
RESP = Direction.RESPONSE


# ---- what a Flow asked of the world -------------------------------------------------------

@dataclass(frozen=True)
class Open:
    element: int
    metadata: Mapping[str, str] = field(default_factory=dict)
    wait: bool = True


@dataclass(frozen=True)
class Data:
    element: int
    seq: int
    direction: Direction
    data: bytes
    eos: bool = False
    wait: bool = True


@dataclass(frozen=True)
class Close:
    element: int
    outcome: Outcome


@dataclass(frozen=True)
class Write:
    direction: Direction
    data: bytes


@dataclass(frozen=True)
class Eof:
    direction: Direction


@dataclass(frozen=True)
class Reading:
    direction: Direction
    on: bool


@dataclass(frozen=True)
class Dial:
    pass


@dataclass(frozen=True)
class Finish:
    outcome: Outcome


Call = Open | Data | Close | Write | Eof | Reading | Dial | Finish


@dataclass(eq=False)
class Ask:
    """An event sent with a target: the element owes a verdict for it."""

    element: int
    seq: int
    direction: Direction | None  # None: the Open event
    pos: int
    target: VerdictTarget
    data: bytes = b""
    eos: bool = False


class Recorder:
    """A FlowOutput that records. It calls back into the Flow only through `on_ask`, which a
    property test sets to answer some events at once, from inside send_open/send_data (what an
    adapter does when an element's session is down and its policy is fail-open)."""

    def __init__(self) -> None:
        self.on_ask: Callable[[Ask], None] | None = None
        self.calls: list[Call] = []
        self.asks: list[Ask] = []
        self.data_metadata: dict[tuple[int, int], dict[str, str]] = {}
        self.reading = {REQ: True, RESP: True}
        self.finished: list[Finish] = []
        self.details: list[str] = []
        self.after_finish: list[Call] = []
        self.tracked: list[int] = []

    def _record(self, call: Call) -> None:
        if self.finished:
            self.after_finish.append(call)
        self.calls.append(call)

    def send_open(self, element: int, metadata: Mapping[str, str], target: VerdictTarget | None, pos: int) -> None:
        self._record(Open(element, dict(metadata), target is not None))
        if target is not None:
            self._ask(Ask(element, 0, None, pos, target))

    def send_data(self, element: int, seq: int, direction: Direction, data: bytes, end_of_stream: bool,
                  metadata: Mapping[str, str] | None, target: VerdictTarget | None, pos: int) -> None:
        self._record(Data(element, seq, direction, bytes(data), end_of_stream, target is not None))
        self.data_metadata[(element, seq)] = dict(metadata or {})
        if target is not None:
            self._ask(Ask(element, seq, direction, pos, target, bytes(data), end_of_stream))

    def _ask(self, ask: Ask) -> None:
        self.asks.append(ask)
        if self.on_ask is not None:
            self.on_ask(ask)

    def send_close(self, element: int, outcome: Outcome) -> None:
        self._record(Close(element, outcome))

    def track(self, element: int) -> None:
        self.tracked.append(element)

    def writer(self, direction: Direction) -> Callable[[bytes], None]:
        return lambda data: self.write(direction, data)

    def write(self, direction: Direction, data: bytes) -> None:
        self._record(Write(direction, bytes(data)))

    def write_eof(self, direction: Direction) -> None:
        self._record(Eof(direction))

    def set_reading(self, direction: Direction, reading: bool) -> None:
        self.reading[direction] = reading
        self._record(Reading(direction, reading))

    def dial(self) -> None:
        self._record(Dial())

    def finish(self, outcome: Outcome, detail: str) -> None:
        self._record(Finish(outcome))
        self.finished.append(Finish(outcome))
        self.details.append(detail)


class Harness:
    """A Flow, its recorder, and helpers to answer asks and read the calls made since last time."""

    def __init__(self, plan: ChainPlan, limits: LaneLimits = LaneLimits()) -> None:
        self.out = Recorder()
        self.flow = Flow(plan, limits, self.out)
        self._taken = 0

    def take(self) -> list[Call]:
        new = self.out.calls[self._taken:]
        self._taken = len(self.out.calls)
        return new

    def ask(self, element: int, seq: int) -> Ask:
        found = [a for a in self.out.asks if a.element == element and a.seq == seq]
        assert len(found) == 1, f"no single ask for element {element} seq {seq}: {self.out.asks}"
        return found[0]

    def verdict(self, element: int, seq: int, action: int = Action.PASS, data: bytes | None = None,
                metadata: Mapping[str, str] | None = None) -> list[Call]:
        ask = self.ask(element, seq)
        self.out.asks.remove(ask)
        ask.target.on_verdict(ask.pos, seq, action, data, metadata)
        return self.take()

    def feed(self, direction: Direction, data: bytes) -> list[Call]:
        self.flow.lane(direction).feed(data)
        return self.take()

    def eof(self, direction: Direction) -> list[Call]:
        self.flow.lane(direction).feed_eof()
        return self.take()


# ---- seeing what a lane dispatched ---------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """A piece of a lane's input as the lane cut it: a chunk with a sequence number, or bytes
    (or an EOF) written straight through because every stage was bypassed (seq None)."""

    seq: int | None
    data: bytes
    eos: bool


class SpyLane(Lane):
    """A Lane that records how it cut its input. White box on purpose: how reads are cut into
    chunks is the lane's own business (TCP has no boundaries), so the model takes the cut as
    given and checks everything downstream of it."""

    __slots__ = ("units",)

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.units: list[Unit] = []

    def _dispatch(self, data: bytes, eos: bool) -> None:
        self.units.append(Unit(self.flow.seq + 1, bytes(data), eos))
        super()._dispatch(data, eos)

    def feed(self, data: bytes) -> None:
        accepted = self.input_open and not self.flow.ended
        units, pending = len(self.units), len(self.pending)
        super().feed(data)
        if accepted and len(self.units) == units and len(self.pending) <= pending:
            self.units.append(Unit(None, bytes(data), False))

    def feed_eof(self) -> None:
        accepted = self.input_open and not self.flow.ended
        units, written = len(self.units), self.eof_written
        super().feed_eof()
        if accepted and len(self.units) == units and self.eof_written and not written:
            self.units.append(Unit(None, b"", True))


def spy_flow(plan: ChainPlan, limits: LaneLimits, out: Recorder) -> Flow:
    flow = Flow(plan, limits, out)
    flow.request = SpyLane(flow, REQ, plan.request, limits, out)
    flow.response = SpyLane(flow, RESP, plan.response, limits, out)
    return flow


# ---- the reference model -------------------------------------------------------------------

Decision = tuple[int, bytes | None, Mapping[str, str] | None]
TERMINAL = (Action.CLOSE, Action.RESET, Action.FAIL)


@dataclass
class LaneModel:
    # per stage position: (seq, bytes, eos, metadata) in the order the stage must receive them
    receipts: list[list[tuple[int | None, bytes, bool, dict[str, str]]]]
    # chunks that left the chain onto the wire, in order: (seq, bytes, eos)
    outputs: list[tuple[int | None, bytes, bool]]
    # chunks still inside the chain (stuck at an inline stage): seq -> original size
    in_flight: dict[int | None, int]
    # chunks ended by a terminal verdict, in sequence order: (seq, action)
    terminals: list[tuple[int | None, int]]


def model_lane(units: list[Unit], stages: tuple[Stage, ...],
               decisions: Mapping[tuple[int, int], Decision]) -> LaneModel:
    """Where each unit of one lane is, given the verdicts delivered so far.

    Rules, from the proto and DESIGN.md: a stage that has seen `byte_limit` bytes is bypassed;
    an inline stage holds a chunk until its verdict; a stage releases chunks in sequence order,
    so a chunk never gets past a stage where an earlier chunk still waits (it is still sent to
    that stage, pipelining); an observe stage never holds. PASS replaces the bytes (when given)
    and merges metadata; DROP removes the chunk, except that an end_of_stream chunk goes on
    empty; a terminal verdict removes the chunk (the caller decides what it does to the flow).
    """
    n = len(stages)
    seen = [0] * n
    receipts: list[list[tuple[int | None, bytes, bool, dict[str, str]]]] = [[] for _ in stages]
    outputs: list[tuple[int | None, bytes, bool]] = []
    in_flight: dict[int | None, int] = {}
    terminals: list[tuple[int | None, int]] = []
    block = n  # lowest stage where an earlier chunk is still held
    for unit in units:
        data, metadata, pos = unit.data, {}, 0
        stuck: int | None = None
        gone = False
        while pos < n:
            stage = stages[pos]
            if stage.byte_limit and seen[pos] >= stage.byte_limit:
                if stage.inline and pos == block:
                    stuck = pos
                    break
                pos += 1
                continue
            receipts[pos].append((unit.seq, data, unit.eos, dict(metadata)))
            seen[pos] += len(data)
            if not stage.inline:
                pos += 1
                continue
            decision = decisions.get((pos, unit.seq)) if unit.seq is not None else None
            if pos == block or decision is None:
                stuck = pos
                break
            action, replacement, verdict_metadata = decision
            if action == Action.PASS:
                if replacement is not None:
                    data = replacement
                if verdict_metadata:
                    metadata = {**metadata, **verdict_metadata}
            elif action == Action.DROP:
                if not unit.eos:
                    gone = True
                    break
                data = b""
            else:
                terminals.append((unit.seq, action))
                gone = True
                break
            pos += 1
        if stuck is not None:
            block = min(block, stuck)
            in_flight[unit.seq] = len(unit.data)
        elif not gone:
            outputs.append((unit.seq, data, unit.eos))
    return LaneModel(receipts, outputs, in_flight, terminals)
