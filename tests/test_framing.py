"""elements/sdk/framing.py without I/O: scripted chunk sequences, then hypothesis with the real
chain (proxy/chain) playing the proxy and a framed element's Stream answering every chunk, so
what arrives is checked against the messages themselves however TCP cuts them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elements.api import element_pb2 as pb
from elements.sdk import Action, Chunk, Connection, Direction, Dispatcher, Drop, Element, Lines, Message, Pass, Reset, \
    Verdict, process
from elements.sdk.framing import Stream
from proxy.chain import ChainPlan, LaneLimits, Stage
from tests.chain_model import REQ, Harness, Write
from tests.procs import REPO

Judge = Callable[[Message[None]], Verdict | None]


def chunks(stream: Stream, judge: Judge, *pieces: bytes, eos_last: bool = False) -> list[Verdict]:
    out = []
    for i, piece in enumerate(pieces):
        eos = eos_last and i == len(pieces) - 1
        found = stream.scan(piece, eos)
        out.append(stream.settle([judge(m) if isinstance(m, Message) else Reset() for m in found], eos))
    return out


def no_x(message: Message[None]) -> Verdict | None:
    """Removes lines with an x, shouts lines that start with a."""
    if b"x" in message.data:
        return Drop()
    return Pass(message.data.upper()) if message.data.startswith(b"a") else None


def test_a_partial_line_is_held_then_decided_with_the_chunk_that_ends_it() -> None:
    stream = Stream(Lines(), Direction.REQUEST)
    first, second, third = chunks(stream, no_x, b"hel", b"lo", b"\nok\n")
    assert first.action == second.action == Action.HOLD
    assert third == Pass()  # every byte held and this chunk pass as they are: nothing to send back


def test_a_rewrite_replaces_the_held_chunks_too() -> None:
    stream = Stream(Lines(), Direction.REQUEST)
    held, decided = chunks(stream, no_x, b"ok\nab", b"c\nmore\n")
    assert held.action == Action.HOLD
    assert decided == Pass(b"ok\nABC\nmore\n")


def test_removed_messages_leave_nothing_and_unframed_bytes_at_end_of_stream_go() -> None:
    stream = Stream(Lines(), Direction.REQUEST)
    assert chunks(stream, no_x, b"x1\nok\nx2", b"\nun", b"finished", eos_last=True) == [
        Verdict(Action.HOLD), Verdict(Action.HOLD), Pass(b"ok\n")]


def test_held_growth_is_bounded_the_decided_part_goes_and_the_unfinished_message_is_kept() -> None:
    stream = Stream(Lines(), Direction.REQUEST, hold_limit=8)
    verdicts = chunks(stream, no_x, b"one\ntw", b"o\nthr", b"ee\nfo", b"ur\n")
    assert verdicts[0].action == Action.HOLD  # 6 bytes: under the limit
    assert verdicts[1] == Pass(b"one\ntwo\n")  # 11 bytes would be held: the decided part goes, "thr" stays here
    assert verdicts[2].action == Action.HOLD  # "thr" kept here and "ee\nfo" held: 8 bytes
    assert verdicts[3] == Pass(b"three\nfour\n")  # what was kept goes back in front


def test_a_message_judged_on_its_head_streams_its_rest_through_unheld() -> None:
    class Headed:
        """Messages: a 2-byte length, then that many bytes; the head is the length."""

        def __init__(self) -> None:
            self.left, self.header = 0, b""

        def step(self, data: bytes, start: int) -> tuple[int, object]:
            from elements.sdk import Event
            if self.left:
                take = min(self.left, len(data) - start)
                self.left -= take
                return start + take, (Event.END if not self.left else None)
            need = 2 - len(self.header)
            self.header += data[start:start + need]
            if len(self.header) < 2:
                return len(data), None
            self.left, self.header = int(self.header), b""
            return start + need, Event.HEAD

        found = None
        problem = ""

    stream = Stream(Headed(), Direction.REQUEST)  # type: ignore[arg-type]
    judge: Judge = lambda m: Drop() if m.data == b"10" else None  # noqa: E731
    verdicts = chunks(stream, judge, b"03abc1", b"0012345", b"6789", b"02ok")
    assert verdicts == [Verdict(Action.HOLD), Pass(b"03abc"), Pass(b""), Pass()]


def test_done_stops_framing_at_that_message_and_says_so() -> None:
    stream = Stream(Lines(), Direction.REQUEST)
    judge: Judge = lambda m: Pass(done=True) if m.data == b"STARTTLS\n" else Drop()  # noqa: E731
    assert chunks(stream, judge, b"a\nSTARTTLS\n\x16\x03binary", b"more") == [
        Pass(b"STARTTLS\n\x16\x03binary", done=True), Pass()]


def test_a_framing_error_resets_by_default_and_pass_lets_the_rest_through_unframed() -> None:
    stream = Stream(Lines(longest=4), Direction.REQUEST)
    assert chunks(stream, no_x, b"ok\n123456") == [Reset()]
    stream = Stream(Lines(longest=4), Direction.REQUEST)
    found = stream.scan(b"ok\n123456", False)
    assert stream.settle([None, Pass()], False) == Pass(done=True) and len(found) == 2


# ---- hypothesis: the real chain plays the proxy -----------------------------------------------

lines = st.lists(st.one_of(st.just(b"x\n"), st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"") + b"\n")),
                 max_size=12)


def expected(stream: bytes) -> bytes:
    """What no_x lets through: the complete lines, filtered; an unfinished last line never arrives."""
    out = []
    for line in stream.split(b"\n")[:-1]:
        verdict = no_x(Message(Direction.REQUEST, line + b"\n", True, None))
        if verdict is None:
            out.append(line + b"\n")
        elif verdict.action == Action.PASS:
            out.append(verdict.data or b"")
    return b"".join(out)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=lines, tail=st.binary(max_size=5).map(lambda b: b.replace(b"\n", b"")), data=st.data(),
       limit=st.sampled_from([4, 16, 1 << 20]))
def test_through_the_chain_any_cut_delivers_the_filtered_lines(messages: list[bytes], tail: bytes,
                                                               data: st.DataObject, limit: int) -> None:
    sent = b"".join(messages) + tail
    cuts = sorted(data.draw(st.sets(st.integers(1, max(len(sent) - 1, 1)), max_size=8), label="cuts"))
    reads = [sent[a:b] for a, b in zip([0, *cuts], [*cuts, len(sent)]) if sent[a:b]]
    h = Harness(ChainPlan(request=(Stage(0),)), LaneLimits(chunk_size=data.draw(st.integers(1, 16)), window=4))
    h.flow.start()
    stream = Stream(Lines(), Direction.REQUEST, hold_limit=limit)

    def answer() -> None:
        while h.out.asks:
            ask = h.out.asks[0]
            h.verdict(0, ask.seq, *_wire(stream, ask.data, ask.eos))

    for read in reads:
        h.feed(REQ, read)
        answer()
    h.eof(REQ)
    answer()
    got = b"".join(c.data for c in h.out.calls if isinstance(c, Write))
    assert got == expected(sent)


def _wire(stream: Stream, data: bytes, eos: bool) -> tuple[int, bytes | None]:
    found = stream.scan(data, eos)
    verdict = stream.settle([no_x(m) if isinstance(m, Message) else Reset() for m in found], eos)
    return verdict.action, verdict.data


# ---- the Dispatcher: framed directions, done, resumed connections (no gRPC) ---------------------

def data_event(seq: int, data: bytes, eos: bool = False, direction: int = pb.DIRECTION_REQUEST) -> pb.Event:
    return pb.Event(data=pb.DataEvent(connection_id="c", sequence=seq, direction=direction, data=data,
                                      end_of_stream=eos))


def answers(element: Element, events: list[pb.Event]) -> list[pb.Verdict]:
    async def run() -> list[pb.Verdict]:
        dispatcher = Dispatcher(element, answer=True)
        dispatcher.feed(events)
        await dispatcher.drain()
        return list(dispatcher.take().verdicts)
    return asyncio.run(run())


class Framed(Element):
    directions = (Direction.REQUEST, Direction.RESPONSE)
    framing = {Direction.REQUEST: Lines}

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def on_message(self, conn: Connection, message: Message[None]) -> Verdict | None:
        self.seen.append(message.data)
        return Pass(done=True) if message.data == b"enough\n" else None

    def on_data(self, conn: Connection, chunk: Chunk) -> Verdict | None:
        self.seen.append(b"response " + chunk.data)
        return None


def test_a_framed_direction_goes_to_on_message_and_after_done_chunks_pass_unseen() -> None:
    element = Framed()
    got = answers(element, [data_event(1, b"one\nenou"), data_event(2, b"gh\nthen"), data_event(3, b"more"),
                            data_event(4, b"r", direction=pb.DIRECTION_RESPONSE)])
    assert [(v.action, v.done) for v in got] == [(pb.ACTION_HOLD, False), (pb.ACTION_PASS, True),
                                                  (pb.ACTION_PASS, False), (pb.ACTION_PASS, False)]
    assert element.seen == [b"one\n", b"enough\n", b"response r"]  # "then", "more": passed unseen


def test_async_on_message_is_awaited_in_order() -> None:
    class Slow(Element):
        directions = (Direction.REQUEST,)
        framing = {Direction.REQUEST: Lines}

        async def on_message(self, conn: Connection, message: Message[None]) -> Verdict | None:
            await asyncio.sleep(0.001)
            return Drop() if message.data == b"b\n" else None

    got = answers(Slow(), [data_event(1, b"a\nb\nc"), data_event(2, b"\n")])
    assert [(v.action, v.data) for v in got] == [(pb.ACTION_HOLD, b""), (pb.ACTION_PASS, b"a\nc\n")]


def test_a_resumed_connection_with_bytes_written_is_a_framing_error() -> None:
    opened = pb.Event(open=pb.OpenEvent(connection_id="c", resumed=True, request_bytes=10))
    assert [v.action for v in answers(Framed(), [opened, data_event(1, b"x\n")])] == [pb.ACTION_RESET]
    fresh = pb.Event(open=pb.OpenEvent(connection_id="c", resumed=True))  # nothing written yet: framed from here
    assert [v.action for v in answers(Framed(), [fresh, data_event(1, b"x\n")])] == [pb.ACTION_PASS]


def test_the_framing_example_of_docs_elements_md_runs_as_written() -> None:
    """The complete example in docs/elements.md: DELETE lines are removed and answered, others pass."""
    text = (REPO / "docs" / "elements.md").read_text()
    source = text.split('"""no_delete:', 1)[1].split("```", 1)[0]
    namespace: dict[str, object] = {"__name__": "no_delete"}
    exec('"""no_delete:' + source, namespace)  # noqa: S102 (our own documentation)
    element = namespace["NoDelete"]()  # type: ignore[operator]
    request = pb.ProcessRequest(chunks=[pb.ProcessChunk(text="GET a\ndel"), pb.ProcessChunk(text="ete a\nGET b\n")])
    got = asyncio.run(process(element, request))  # type: ignore[arg-type]
    assert [c.verdict.action for c in got.chunks] == [pb.ACTION_HOLD, pb.ACTION_PASS]
    assert got.chunks[1].data == b"GET a\nGET b\n"
    assert got.chunks[1].verdict.reply == b"ERR DELETE is not allowed here\n"
