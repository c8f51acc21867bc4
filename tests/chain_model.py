"""A recorder for proxy/chain (socket side, element ports and peer in one) and a reference model of what the chain should do.

The recorder is a plain class: every call becomes a small frozen dataclass in `calls`, so
scripted tests compare lists and a failing assert shows the whole difference. Calls that
wait for a verdict (a target was given) also become `Ask`s, which a test answers with
`Harness.verdict` or, in the property tests, in whatever order hypothesis picks.

The model (`model_lane`) is deliberately written differently from chain.py: no FIFOs and no
callbacks, it recomputes from scratch, from the chunks a lane dispatched and the verdicts
delivered so far, where every chunk is now: received by which stages (with which bytes and
metadata), stuck at a stage, kept by an element (HOLD), dropped, ended by a terminal
verdict, or out on the wire; and which replies the verdicts it applied sent back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from proxy.chain import Action, ChainPlan, Direction, Flow, Lane, LaneLimits, LaneState, Outcome, Stage, VerdictTarget

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


class RecordingPort:
    """Element `element`'s port (chain.ElementPort): every call is recorded by the Recorder."""

    def __init__(self, recorder: Recorder, element: int) -> None:
        self.recorder = recorder
        self.element = element

    def track(self, connection: object) -> None:
        self.recorder.track(self.element)

    def send_open(self, connection: object, metadata: Mapping[str, str], target: VerdictTarget | None,
                  pos: int) -> None:
        self.recorder.send_open(self.element, metadata, target, pos)

    def send_data(self, connection_id: str, seq: int, direction: Direction, data: bytes, end_of_stream: bool,
                  metadata: Mapping[str, str] | None, target: VerdictTarget | None, pos: int) -> None:
        self.recorder.send_data(self.element, seq, direction, data, end_of_stream, metadata, target, pos)

    def send_close(self, connection: object, outcome: Outcome) -> None:
        self.recorder.send_close(self.element, outcome)


class Ports:
    """As many element ports as a plan names, made on first use."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.made: dict[int, RecordingPort] = {}

    def __getitem__(self, element: int) -> RecordingPort:
        if element not in self.made:
            self.made[element] = RecordingPort(self.recorder, element)
        return self.made[element]


class Recorder:
    """The flow's socket side, its element ports (`ports`) and its peer, recording every call. It
    calls back into the Flow only through `on_ask`, which a property test sets to answer some
    events at once, from inside send_open/send_data (what a session does when it is down and
    its policy is fail-open)."""

    id = "c"
    request_bytes = 0
    response_bytes = 0

    def __init__(self) -> None:
        self.ports = Ports(self)
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
        self.flow = flow_for(plan, limits, self.out)
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
                metadata: Mapping[str, str] | None = None, reply: bytes | None = None,
                done: bool = False) -> list[Call]:
        ask = self.ask(element, seq)
        self.out.asks.remove(ask)
        ask.target.on_verdict(ask.pos, seq, action, data, metadata, reply, done)
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
    """A Lane that records how it cut its input and when an element's `done` took effect. White
    box on purpose: how reads are cut into chunks is the lane's own business (TCP has no
    boundaries), and when a verdict is applied depends on the order verdicts arrive in, so the
    model takes both as given and checks everything downstream of them."""

    __slots__ = ("units", "eof_out", "stopped", "sent", "done_after")

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.units: list[Unit] = []
        self.eof_out = False
        self.stopped = False  # an element closed the connection after it opened: input stopped
        self.sent = [0] * len(self.stages)  # chunks sent to each stage so far
        self.done_after: dict[int, int] = {}  # stage -> chunks it had been sent when its `done` took effect

    def _send(self, stage: Stage, pos: int, chunk: object) -> bool:
        self.sent[pos] += 1
        return super()._send(stage, pos, chunk)  # type: ignore[arg-type]

    def exhaust(self, pos: int) -> None:
        stage = self.stages[pos]
        if not (stage.byte_limit and self.seen[pos] >= stage.byte_limit):  # that one the model computes itself
            self.done_after.setdefault(pos, self.sent[pos])
        super().exhaust(pos)

    def stop_input(self, drop_from_seq: int | None) -> None:
        self.stopped = True
        super().stop_input(drop_from_seq)

    def _dispatch(self, data: bytes, eos: bool) -> None:
        self.units.append(Unit(self.flow.seq + 1, bytes(data), eos))
        super()._dispatch(data, eos)

    def _tap(self, data: bytes) -> None:  # a chunk of a lane where no stage waits: sent, then out at once
        self.units.append(Unit(self.flow.seq + 1, bytes(data), False))
        for pos, exhausted in enumerate(self.exhausted):
            self.sent[pos] += not exhausted
        super()._tap(data)

    def feed(self, data: bytes) -> None:
        accepted = self.state is LaneState.READING
        units, pending = len(self.units), len(self.pending)
        super().feed(data)
        if accepted and len(self.units) == units and len(self.pending) <= pending:
            self.units.append(Unit(None, bytes(data), False))

    def feed_eof(self) -> None:
        accepted = self.state is LaneState.READING
        units, written = len(self.units), self.eof_out
        super().feed_eof()
        if accepted and len(self.units) == units and self.eof_out and not written:
            self.units.append(Unit(None, b"", True))

    def _write_eof(self) -> None:
        if self.state is not LaneState.DONE and self.state is not LaneState.ENDED:
            self.eof_out = True
        super()._write_eof()


def flow_for(plan: ChainPlan, limits: LaneLimits, out: Recorder) -> Flow:
    """A Flow whose sockets, elements and peer are all the recorder."""
    flow = Flow(plan, limits, out, out.ports, out)  # type: ignore[arg-type]
    out.flow = flow
    return flow


@dataclass(frozen=True)
class Reply:
    """A verdict's reply to the sender of a chunk of `direction`: written, or not (that side was
    half-closed already)."""

    direction: Direction
    data: bytes
    written: bool


class SpyFlow(Flow):
    """A Flow that records every reply its verdicts send back, and which Write calls they became,
    so a test can tell a lane's own bytes from replies on the same socket."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.replies: list[Reply] = []
        self.reply_writes: set[int] = set()  # indexes into the recorder's calls

    def reply(self, direction: Direction, data: bytes) -> None:
        calls: list[Call] = self.sockets.calls  # type: ignore[attr-defined]
        before = len(calls)
        super().reply(direction, data)
        written = len(calls) > before
        if written:
            self.reply_writes.add(before)
        self.replies.append(Reply(direction, bytes(data), written))


def spy_flow(plan: ChainPlan, limits: LaneLimits, out: Recorder) -> SpyFlow:
    flow = SpyFlow(plan, limits, out, out.ports, out)
    out.flow = flow
    flow.request = SpyLane(flow, REQ, plan.request, limits)
    flow.response = SpyLane(flow, RESP, plan.response, limits)
    return flow


# ---- the reference model -------------------------------------------------------------------

# action, replacement bytes, metadata, reply, done
Decision = tuple[int, bytes | None, Mapping[str, str] | None, bytes | None, bool]
TERMINAL = (Action.CLOSE, Action.RESET, Action.FAIL)


@dataclass
class Kept:
    """A chunk an element holds (HOLD): its bytes and metadata as the element left them."""

    seq: int
    data: bytes
    metadata: dict[str, str]
    size: int  # bytes read that it accounts for


@dataclass
class LaneModel:
    # per stage position: (seq, bytes, eos, metadata) in the order the stage must receive them
    receipts: list[list[tuple[int | None, bytes, bool, dict[str, str]]]]
    # chunks that left the chain onto the wire, in order: (seq, bytes, eos)
    outputs: list[tuple[int | None, bytes, bool]]
    # chunks still inside the chain (stuck at an inline stage): seq -> bytes read it accounts for
    in_flight: dict[int | None, int]
    # chunks ended by a terminal verdict, in sequence order: (seq, action); for a CLOSE, the seq
    # is the first chunk its element held, as they went with it
    terminals: list[tuple[int | None, int]]
    # per stage position: what its element holds
    kept: dict[int, list[Kept]]
    # the replies of the verdicts applied, in no particular order across stages
    replies: list[bytes]
    # the verdicts applied with `done` (PASS or DROP): (stage position, seq)
    done: list[tuple[int, int]]

    @property
    def kept_bytes(self) -> int:
        return sum(k.size for held in self.kept.values() for k in held)


def _merged(*metadatas: Mapping[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for metadata in metadatas:
        out.update(metadata or {})
    return out


def model_lane(units: list[Unit], stages: tuple[Stage, ...], decisions: Mapping[tuple[int, int], Decision],
               done_after: Mapping[int, int] | None = None) -> LaneModel:
    """Where each unit of one lane is, given the verdicts delivered so far.

    Rules, from the proto and DESIGN.md: a stage that has seen `byte_limit` bytes is bypassed, as is
    one whose element said done (from its `done_after[pos]`-th receipt on); an inline stage holds
    a chunk until its verdict; a stage releases chunks in sequence order, so a chunk never gets
    past a stage where an earlier chunk still waits (it is still sent to that stage, pipelining);
    an observe stage never holds. PASS replaces the bytes (when given) and merges metadata; DROP
    removes the chunk, except that an end_of_stream chunk goes on empty; HOLD keeps the chunk
    at its stage until that stage's next verdict, which decides the kept chunks with its own:
    PASS carries them on as one chunk under its sequence (their bytes then its own, or the
    replacement), DROP and the terminal verdicts take them along; a chunk bypassing a stage
    carries what it keeps on as PASS would; a terminal verdict removes the chunk (the caller
    decides what it does to the flow). Every verdict applied but RESET and FAIL sends its reply.
    """
    n = len(stages)
    done_after = done_after or {}
    seen = [0] * n
    receipts: list[list[tuple[int | None, bytes, bool, dict[str, str]]]] = [[] for _ in stages]
    outputs: list[tuple[int | None, bytes, bool]] = []
    in_flight: dict[int | None, int] = {}
    terminals: list[tuple[int | None, int]] = []
    kept: dict[int, list[Kept]] = {}
    replies: list[bytes] = []
    done: list[tuple[int, int]] = []
    block = n  # lowest stage where an earlier chunk is still held
    for unit in units:
        data, metadata, pos, size = unit.data, {}, 0, len(unit.data)
        stuck: int | None = None
        gone = False
        while pos < n:
            stage = stages[pos]
            bypassed = (stage.byte_limit and seen[pos] >= stage.byte_limit
                        or pos in done_after and len(receipts[pos]) >= done_after[pos])
            if bypassed:
                if stage.inline and pos == block:
                    stuck = pos
                    break
                if pos in kept:
                    held = kept.pop(pos)
                    data = b"".join([*(k.data for k in held), data])
                    metadata = _merged(*(k.metadata for k in held), metadata)
                    size += sum(k.size for k in held)
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
            action, replacement, verdict_metadata, reply, said_done = decision
            if reply and action not in (Action.RESET, Action.FAIL):
                replies.append(reply)
            if action == Action.HOLD:
                assert unit.seq is not None and not unit.eos, "the test never holds an end of stream"
                kept.setdefault(pos, []).append(Kept(unit.seq, data, _merged(metadata, verdict_metadata), size))
                gone = True
                break
            held = kept.pop(pos, [])
            size += sum(k.size for k in held)
            if said_done and action in (Action.PASS, Action.DROP):
                done.append((pos, unit.seq))  # type: ignore[arg-type]
            if action == Action.PASS:
                if held:
                    data = b"".join([*(k.data for k in held), data]) if replacement is None else replacement
                    metadata = _merged(*(k.metadata for k in held), metadata)
                elif replacement is not None:
                    data = replacement
                if verdict_metadata:
                    metadata = {**metadata, **verdict_metadata}
            elif action == Action.DROP:
                if not unit.eos:
                    gone = True
                    break
                data = b""
            else:
                terminals.append((held[0].seq if held and action == Action.CLOSE else unit.seq, action))
                gone = True
                break
            pos += 1
        if stuck is not None:
            block = min(block, stuck)
            in_flight[unit.seq] = size
        elif not gone:
            outputs.append((unit.seq, data, unit.eos))
    return LaneModel(receipts, outputs, in_flight, terminals, kept, replies, done)
