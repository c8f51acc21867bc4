"""proxy/chain.py without I/O: scripted event lists with exact expected calls, then hypothesis
against the reference model in tests/chain_model.py."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from proxy.chain import Action, ChainPlan, Direction, Flow, LaneLimits, Outcome, Resumed, Stage, VerdictTarget
from tests.chain_model import (
    REQ, RESP, Ask, Close, Data, Decision, Dial, Eof, Finish, Harness, LaneModel, Open, Reading, Recorder, SpyLane,
    Write, flow_for, model_lane, spy_flow,
)

PASS, DROP, CLOSE, RESET, FAIL, HOLD = Action.PASS, Action.DROP, Action.CLOSE, Action.RESET, Action.FAIL, Action.HOLD

THREE = ChainPlan(request=(Stage(0), Stage(1), Stage(2)), response=(Stage(2), Stage(1), Stage(0)))


def started(plan: ChainPlan, limits: LaneLimits = LaneLimits()) -> Harness:
    h = Harness(plan, limits)
    h.flow.start()
    assert h.take() == [Dial()]
    return h


def through(h: Harness, seq: int, elements: list[int], direction: Direction = REQ, data: bytes = b"",
            eos: bool = False) -> None:
    """Answers PASS for chunk `seq` at each of `elements` but the last, checking it moves on unchanged."""
    for here, after in zip(elements, elements[1:]):
        assert h.verdict(here, seq) == [Data(after, seq, direction, data, eos)]


# ---- empty chain, order, completion ---------------------------------------------------------

def test_empty_chain_writes_bytes_straight_through_and_eof_becomes_write_eof() -> None:
    h = started(ChainPlan())
    assert h.feed(REQ, b"hello") == [Write(REQ, b"hello")]
    assert h.feed(RESP, b"world") == [Write(RESP, b"world")]
    assert h.eof(REQ) == [Eof(REQ)]
    assert h.feed(RESP, b"more") == [Write(RESP, b"more")]
    assert h.eof(RESP) == [Eof(RESP), Finish(Outcome.COMPLETED)]
    assert h.feed(REQ, b"late") == [] and h.eof(RESP) == []


def test_request_visits_elements_in_order_and_response_in_reverse() -> None:
    h = started(THREE)
    assert h.feed(REQ, b"GET") == [Data(0, 1, REQ, b"GET")]
    assert h.verdict(0, 1) == [Data(1, 1, REQ, b"GET")]
    assert h.verdict(1, 1) == [Data(2, 1, REQ, b"GET")]
    assert h.verdict(2, 1) == [Write(REQ, b"GET")]
    assert h.feed(RESP, b"200") == [Data(2, 2, RESP, b"200")]
    assert h.verdict(2, 2) == [Data(1, 2, RESP, b"200")]
    assert h.verdict(1, 2) == [Data(0, 2, RESP, b"200")]
    assert h.verdict(0, 2) == [Write(RESP, b"200")]


def test_sequence_numbers_are_shared_by_both_directions() -> None:
    h = started(THREE)
    assert h.feed(REQ, b"a") == [Data(0, 1, REQ, b"a")]
    assert h.feed(RESP, b"b") == [Data(2, 2, RESP, b"b")]
    assert h.feed(REQ, b"c") == [Data(0, 3, REQ, b"c")]


def test_completion_writes_both_eofs_then_closes_every_element_once() -> None:
    h = started(THREE)
    assert h.feed(REQ, b"q") == [Data(0, 1, REQ, b"q")]
    through(h, 1, [0, 1, 2], data=b"q")
    assert h.verdict(2, 1) == [Write(REQ, b"q")]
    assert h.eof(REQ) == [Data(0, 2, REQ, b"", eos=True)]
    through(h, 2, [0, 1, 2], eos=True)
    assert h.verdict(2, 2) == [Eof(REQ)]  # half-close: the response direction keeps running
    assert h.feed(RESP, b"r") == [Data(2, 3, RESP, b"r")]
    through(h, 3, [2, 1, 0], RESP, b"r")
    assert h.verdict(0, 3) == [Write(RESP, b"r")]
    assert h.eof(RESP) == [Data(2, 4, RESP, b"", eos=True)]
    through(h, 4, [2, 1, 0], RESP, eos=True)
    assert h.verdict(0, 4) == [Eof(RESP), Close(0, Outcome.COMPLETED), Close(1, Outcome.COMPLETED),
                               Close(2, Outcome.COMPLETED), Finish(Outcome.COMPLETED)]
    assert h.out.finished == [Finish(Outcome.COMPLETED)]


def test_close_goes_only_to_elements_that_saw_the_connection() -> None:
    plan = ChainPlan(request=(Stage(0),), response=(Stage(1, inline=False),), open=(Stage(2, inline=False),))
    h = Harness(plan)
    h.flow.start()
    assert h.take() == [Open(2, {}, wait=False), Dial()]
    assert h.eof(RESP) == [Data(1, 1, RESP, b"", eos=True, wait=False), Eof(RESP)]
    assert h.feed(REQ, b"x") == [Data(0, 2, REQ, b"x")]
    assert h.verdict(0, 2) == [Write(REQ, b"x")]
    assert h.eof(REQ) == [Data(0, 3, REQ, b"", eos=True)]
    assert h.verdict(0, 3) == [Eof(REQ), Close(0, Outcome.COMPLETED), Close(1, Outcome.COMPLETED),
                               Close(2, Outcome.COMPLETED), Finish(Outcome.COMPLETED)]
    h = started(ChainPlan(request=(Stage(0),), response=(Stage(1),)))
    assert h.eof(RESP) == [Data(1, 1, RESP, b"", eos=True)]
    assert h.verdict(1, 1) == [Eof(RESP)]
    h.flow.end(Outcome.PEER_RESET, "client reset")  # element 0 never saw this connection
    assert h.take() == [Close(1, Outcome.PEER_RESET), Finish(Outcome.PEER_RESET)]


# ---- verdicts on data ----------------------------------------------------------------------

def test_pass_with_replacement_hands_new_bytes_to_the_next_element_and_the_wire() -> None:
    h = started(THREE)
    h.feed(REQ, b"abc")
    assert h.verdict(0, 1, PASS, b"XYZW") == [Data(1, 1, REQ, b"XYZW")]
    assert h.verdict(1, 1, PASS, b"") == [Data(2, 1, REQ, b"")]
    assert h.verdict(2, 1, PASS, b"final") == [Write(REQ, b"final")]
    h.feed(REQ, b"def")
    through(h, 2, [0, 1, 2], data=b"def")
    assert h.verdict(2, 2, PASS, b"") == []  # replaced by nothing: nothing to write


def test_verdict_metadata_travels_with_the_chunk_to_later_elements() -> None:
    h = started(THREE)
    h.feed(REQ, b"m")
    assert h.out.data_metadata[(0, 1)] == {}
    h.verdict(0, 1, PASS, None, {"a": "0"})
    assert h.out.data_metadata[(1, 1)] == {"a": "0"}
    h.verdict(1, 1, PASS, None, {"a": "1", "b": "1"})
    assert h.out.data_metadata[(2, 1)] == {"a": "1", "b": "1"}
    h.feed(REQ, b"n")  # metadata belongs to its chunk, not to the connection
    assert h.out.data_metadata[(0, 2)] == {}


def test_drop_discards_only_that_chunk_and_later_chunks_still_flow() -> None:
    h = started(THREE)
    assert h.feed(REQ, b"one") == [Data(0, 1, REQ, b"one")]
    assert h.feed(REQ, b"two") == [Data(0, 2, REQ, b"two")]
    assert h.verdict(0, 2) == []  # waits behind seq 1
    assert h.verdict(0, 1, DROP) == [Data(1, 2, REQ, b"two")]  # element 1 never sees "one"
    through(h, 2, [1, 2], data=b"two")
    assert h.verdict(2, 2) == [Write(REQ, b"two")]
    assert h.feed(REQ, b"three") == [Data(0, 3, REQ, b"three")]
    through(h, 3, [0, 1, 2], data=b"three")
    assert h.verdict(2, 3, DROP) == []
    assert h.feed(REQ, b"four") == [Data(0, 4, REQ, b"four")]


def test_drop_of_an_end_of_stream_chunk_discards_its_bytes_but_still_writes_eof() -> None:
    h = started(ChainPlan(request=(Stage(0), Stage(1))), LaneLimits(window=1))
    assert h.feed(REQ, b"a") == [Data(0, 1, REQ, b"a")]
    assert h.feed(REQ, b"b") == []  # window full: coalesced
    assert h.eof(REQ) == []
    through(h, 1, [0, 1], data=b"a")
    assert h.verdict(1, 1) == [Write(REQ, b"a"), Data(0, 2, REQ, b"b", eos=True)]
    assert h.verdict(0, 2, DROP) == [Data(1, 2, REQ, b"", eos=True)]
    assert h.verdict(1, 2) == [Eof(REQ)]


def test_drop_of_an_end_of_stream_chunk_at_the_last_element_writes_eof() -> None:
    h = started(ChainPlan(request=(Stage(0),)))
    h.eof(REQ)
    assert h.verdict(0, 1, DROP) == [Eof(REQ)]


def test_out_of_order_verdicts_are_still_written_in_order() -> None:
    h = started(ChainPlan(request=(Stage(0), Stage(1))))
    h.feed(REQ, b"1")
    h.feed(REQ, b"2")
    h.feed(REQ, b"3")
    assert h.verdict(0, 3) == []
    assert h.verdict(0, 2) == []
    assert h.verdict(0, 1) == [Data(1, 1, REQ, b"1"), Data(1, 2, REQ, b"2"), Data(1, 3, REQ, b"3")]
    assert h.verdict(1, 2, PASS, b"two") == []
    assert h.verdict(1, 1) == [Write(REQ, b"1"), Write(REQ, b"two")]
    assert h.verdict(1, 3) == [Write(REQ, b"3")]


def test_verdicts_of_different_directions_do_not_wait_for_each_other() -> None:
    h = started(THREE)
    h.feed(REQ, b"q")
    h.feed(RESP, b"r")
    assert h.verdict(2, 2) == [Data(1, 2, RESP, b"r")]
    through(h, 2, [1, 0], RESP, b"r")
    assert h.verdict(0, 2) == [Write(RESP, b"r")]


# ---- close and reset -----------------------------------------------------------------------

def test_close_writes_what_came_before_drops_the_rest_drains_the_other_lane_and_fins_both() -> None:
    h = started(THREE)
    h.feed(REQ, b"a")  # seq 1: will be at element 2 when element 1 closes
    through(h, 1, [0, 1, 2], data=b"a")
    h.feed(REQ, b"b")  # seq 2: the chunk element 1 closes on
    through(h, 2, [0, 1], data=b"b")
    assert h.feed(REQ, b"c") == [Data(0, 3, REQ, b"c")]  # seq 3: read after it, at element 0
    assert h.feed(RESP, b"r") == [Data(2, 4, RESP, b"r")]  # seq 4: the other lane, at element 2
    assert h.verdict(1, 2, CLOSE) == [Reading(REQ, False), Reading(RESP, False)]
    assert h.feed(REQ, b"ignored") == [] and h.feed(RESP, b"ignored") == []
    assert h.verdict(0, 3) == []  # the dropped chunk's verdict changes nothing
    assert h.verdict(2, 1) == [Write(REQ, b"a"), Eof(REQ)]
    assert h.verdict(2, 4) == [Data(1, 4, RESP, b"r")]
    assert h.verdict(1, 4) == [Data(0, 4, RESP, b"r")]
    assert h.verdict(0, 4) == [Write(RESP, b"r"), Eof(RESP),
                               Close(0, Outcome.CLOSED_BY_ELEMENT), Close(1, Outcome.CLOSED_BY_ELEMENT),
                               Close(2, Outcome.CLOSED_BY_ELEMENT), Finish(Outcome.CLOSED_BY_ELEMENT)]
    assert h.out.finished == [Finish(Outcome.CLOSED_BY_ELEMENT)]


def test_close_with_nothing_in_flight_fins_both_sides_at_once() -> None:
    h = started(ChainPlan(request=(Stage(0),), response=(Stage(0),)))
    h.feed(REQ, b"QUIT")
    assert h.verdict(0, 1, CLOSE) == [Reading(REQ, False), Eof(REQ), Reading(RESP, False), Eof(RESP),
                                      Close(0, Outcome.CLOSED_BY_ELEMENT), Finish(Outcome.CLOSED_BY_ELEMENT)]


def test_close_drops_coalesced_bytes_read_after_the_closing_chunk() -> None:
    h = started(ChainPlan(request=(Stage(0),)), LaneLimits(window=1))
    h.feed(REQ, b"a")
    h.feed(REQ, b"pending")
    h.eof(REQ)
    assert h.verdict(0, 1, CLOSE) == [Reading(REQ, False), Eof(REQ), Reading(RESP, False), Eof(RESP),
                                      Close(0, Outcome.CLOSED_BY_ELEMENT), Finish(Outcome.CLOSED_BY_ELEMENT)]


def test_close_after_the_other_side_already_half_closed() -> None:
    h = started(ChainPlan(request=(Stage(0),), response=(Stage(0),)))
    h.eof(RESP)
    assert h.verdict(0, 1) == [Eof(RESP)]
    h.feed(REQ, b"x")
    h.feed(REQ, b"y")
    assert h.verdict(0, 3, CLOSE) == []  # stored: seq 2 is still ahead of it
    assert h.verdict(0, 2) == [Write(REQ, b"x"), Reading(REQ, False), Eof(REQ),
                               Close(0, Outcome.CLOSED_BY_ELEMENT), Finish(Outcome.CLOSED_BY_ELEMENT)]


def test_reset_ends_at_once_and_nothing_more_is_written() -> None:
    h = started(THREE)
    h.feed(REQ, b"a")
    through(h, 1, [0, 1, 2], data=b"a")
    h.feed(REQ, b"b")
    h.feed(RESP, b"r")
    h.take()
    assert h.verdict(0, 2, RESET) == [Close(0, Outcome.RESET_BY_ELEMENT), Close(1, Outcome.RESET_BY_ELEMENT),
                                      Close(2, Outcome.RESET_BY_ELEMENT), Finish(Outcome.RESET_BY_ELEMENT)]
    assert h.verdict(2, 1) == [] and h.verdict(2, 3) == []
    assert h.feed(REQ, b"c") == [] and h.eof(REQ) == [] and h.eof(RESP) == []
    h.flow.end(Outcome.PEER_RESET, "late")
    assert h.take() == [] and h.out.finished == [Finish(Outcome.RESET_BY_ELEMENT)]


def test_reset_stored_out_of_order_takes_effect_when_its_turn_comes() -> None:
    h = started(ChainPlan(request=(Stage(0),)))
    h.feed(REQ, b"a")
    h.feed(REQ, b"b")
    assert h.verdict(0, 2, RESET) == []
    assert h.verdict(0, 1) == [Write(REQ, b"a"), Close(0, Outcome.RESET_BY_ELEMENT),
                               Finish(Outcome.RESET_BY_ELEMENT)]


@pytest.mark.parametrize("action", [FAIL, 0, 99])
def test_failure_of_a_fail_closed_element_ends_the_connection_as_failure(action: int) -> None:
    h = started(THREE)
    h.feed(REQ, b"a")
    assert h.verdict(0, 1, action) == [Close(0, Outcome.FAILURE), Finish(Outcome.FAILURE)]
    assert h.feed(REQ, b"b") == []


def test_peer_reset_ends_the_flow_once() -> None:
    h = started(THREE)
    h.feed(REQ, b"a")
    h.take()
    h.flow.end(Outcome.PEER_RESET, "upstream RST")
    h.flow.end(Outcome.PEER_RESET, "again")
    assert h.take() == [Close(0, Outcome.PEER_RESET), Finish(Outcome.PEER_RESET)]
    assert h.verdict(0, 1) == []


# ---- the Open phase --------------------------------------------------------------------------

OPEN3 = ChainPlan(request=(Stage(0),), open=(Stage(0), Stage(1, inline=False), Stage(2)))


def test_open_asks_inline_stages_in_order_each_after_the_previous_passed_then_dials() -> None:
    h = Harness(OPEN3)
    h.flow.start()
    assert h.take() == [Open(0, {})]
    assert h.verdict(0, 0, PASS, None, {"user": "alice"}) == [Open(1, {"user": "alice"}, wait=False),
                                                               Open(2, {"user": "alice"})]
    assert h.verdict(2, 0, DROP, None, {"user": "bob", "x": "1"}) == [Dial()]  # DROP on open = PASS
    assert h.feed(REQ, b"a") == [Data(0, 1, REQ, b"a")]  # the Open event was sequence 0


@pytest.mark.parametrize(("action", "outcome"), [(CLOSE, Outcome.CLOSED_BY_ELEMENT),
                                                  (RESET, Outcome.RESET_BY_ELEMENT),
                                                  (FAIL, Outcome.FAILURE)])
def test_open_rejected_finishes_without_dialing(action: int, outcome: Outcome) -> None:
    h = Harness(OPEN3)
    h.flow.start()
    h.verdict(0, 0)
    assert h.take() == []
    assert h.verdict(2, 0, action) == [Close(0, outcome), Close(1, outcome), Close(2, outcome), Finish(outcome)]
    h = Harness(OPEN3)
    h.flow.start()
    assert h.take() == [Open(0, {})]
    assert h.verdict(0, 0, action) == [Close(0, outcome), Finish(outcome)]


def test_observe_only_open_stages_dial_at_once() -> None:
    h = Harness(ChainPlan(open=(Stage(3, inline=False), Stage(4, inline=False))))
    h.flow.start()
    assert h.take() == [Open(3, {}, wait=False), Open(4, {}, wait=False), Dial()]


def test_a_repeated_data_verdict_changes_nothing() -> None:
    h = started(ChainPlan(request=(Stage(0), Stage(1))))
    h.feed(REQ, b"a")
    h.feed(REQ, b"b")
    ask = h.ask(0, 1)
    assert h.verdict(0, 1) == [Data(1, 1, REQ, b"a")]
    ask.target.on_verdict(ask.pos, 1, PASS, b"again", None)
    ask.target.on_verdict(ask.pos, 1, CLOSE, None, None)
    assert h.take() == []
    assert h.verdict(0, 2) == [Data(1, 2, REQ, b"b")]


def test_a_repeated_open_verdict_changes_nothing() -> None:
    h = Harness(ChainPlan(open=(Stage(0), Stage(1))))
    h.flow.start()
    assert h.take() == [Open(0, {})]
    ask = h.ask(0, 0)
    assert h.verdict(0, 0) == [Open(1, {})]
    ask.target.on_verdict(ask.pos, 0, PASS, None, None)
    assert h.take() == []


# An adapter may end the flow from inside a call: a fail-closed observe element whose session is
# down (send_open/send_data), a socket found dead while writing. Nothing may follow the finish.

class ResetInside(Recorder):
    def __init__(self, when: object) -> None:
        super().__init__()
        self.when = when
        self.flow: Flow | None = None

    def _maybe_reset(self, call: object) -> None:
        if call == self.when and self.flow is not None:
            self.flow.end(Outcome.FAILURE, "ended from inside a call")

    def send_open(self, element: int, metadata: Mapping[str, str], target: VerdictTarget | None,
                  pos: int) -> None:
        super().send_open(element, metadata, target, pos)
        self._maybe_reset(self.calls[-1])

    def send_data(self, element: int, seq: int, direction: Direction, data: bytes, end_of_stream: bool,
                  metadata: Mapping[str, str] | None, target: VerdictTarget | None, pos: int) -> None:
        super().send_data(element, seq, direction, data, end_of_stream, metadata, target, pos)
        self._maybe_reset(self.calls[-1])

    def write(self, direction: Direction, data: bytes) -> None:
        super().write(direction, data)
        self._maybe_reset(self.calls[-1])


def reset_inside(plan: ChainPlan, when: object, limits: LaneLimits = LaneLimits()) -> tuple[Flow, ResetInside]:
    out = ResetInside(when)
    flow = flow_for(plan, limits, out)
    return flow, out


def test_a_reset_from_inside_an_inline_send_ends_cleanly() -> None:
    flow, out = reset_inside(ChainPlan(request=(Stage(0), Stage(1))), Data(0, 1, REQ, b"x"))
    flow.start()
    flow.request.feed(b"x")
    flow.request.feed(b"y")
    assert out.after_finish == [] and out.finished == [Finish(Outcome.FAILURE)]


def test_a_reset_from_inside_an_observe_open_dials_nothing() -> None:
    flow, out = reset_inside(ChainPlan(open=(Stage(0, inline=False), Stage(1, inline=False))),
                             Open(0, {}, wait=False))
    flow.start()
    assert out.calls == [Open(0, {}, wait=False), Close(0, Outcome.FAILURE), Finish(Outcome.FAILURE)]


def test_a_reset_from_inside_an_observe_send_writes_nothing() -> None:
    flow, out = reset_inside(ChainPlan(request=(Stage(0, inline=False), Stage(1, inline=False))),
                             Data(0, 1, REQ, b"x", wait=False))
    flow.start()
    flow.request.feed(b"x")
    assert out.after_finish == []


def test_a_reset_from_inside_write_writes_no_eof() -> None:
    flow, out = reset_inside(ChainPlan(request=(Stage(0),)), Write(REQ, b"last"), LaneLimits(window=1))
    flow.start()
    flow.request.feed(b"first")
    flow.request.feed(b"last")  # window full: coalesced with the EOF that follows
    flow.request.feed_eof()
    for seq in (1, 2):
        [ask] = [a for a in out.asks if a.seq == seq]
        ask.target.on_verdict(ask.pos, ask.seq, PASS, None, None)
    assert Data(0, 2, REQ, b"last", eos=True) in out.calls
    assert out.after_finish == []


# ---- observe stages, byte limits --------------------------------------------------------------

def test_observe_stages_get_events_but_are_never_waited_for() -> None:
    plan = ChainPlan(request=(Stage(0, inline=False), Stage(1), Stage(2, inline=False)),
                     response=(Stage(2, inline=False), Stage(0, inline=False)))
    h = started(plan)
    assert h.feed(REQ, b"a") == [Data(0, 1, REQ, b"a", wait=False), Data(1, 1, REQ, b"a")]
    assert h.verdict(1, 1, PASS, b"A") == [Data(2, 1, REQ, b"A", wait=False), Write(REQ, b"A")]
    assert h.feed(RESP, b"r") == [Data(2, 2, RESP, b"r", wait=False), Data(0, 2, RESP, b"r", wait=False),
                                  Write(RESP, b"r")]
    assert [a.element for a in h.out.asks] == []


def test_byte_limit_bypasses_an_element_once_it_has_seen_enough() -> None:
    h = started(ChainPlan(request=(Stage(0, byte_limit=4), Stage(1))))
    assert h.feed(REQ, b"abc") == [Data(0, 1, REQ, b"abc")]
    through(h, 1, [0, 1], data=b"abc")
    assert h.verdict(1, 1) == [Write(REQ, b"abc")]
    assert h.feed(REQ, b"defg") == [Data(0, 2, REQ, b"defg")]  # 3 < 4: it still sees this whole chunk
    through(h, 2, [0, 1], data=b"defg")
    assert h.verdict(1, 2) == [Write(REQ, b"defg")]
    assert h.feed(REQ, b"h") == [Data(1, 3, REQ, b"h")]  # 7 >= 4: element 0 is bypassed
    assert h.verdict(1, 3) == [Write(REQ, b"h")]
    assert h.eof(REQ) == [Data(1, 4, REQ, b"", eos=True)]


def test_a_chunk_skipping_a_stage_waits_behind_an_earlier_chunk_still_held_there() -> None:
    h = started(ChainPlan(request=(Stage(0, byte_limit=2), Stage(1))))
    assert h.feed(REQ, b"ab") == [Data(0, 1, REQ, b"ab")]
    assert h.feed(REQ, b"c") == []  # bypasses element 0 but must not overtake seq 1
    assert h.verdict(0, 1) == [Data(1, 1, REQ, b"ab"), Data(1, 2, REQ, b"c")]
    assert h.verdict(1, 2) == []
    assert h.verdict(1, 1) == [Write(REQ, b"ab"), Write(REQ, b"c")]


def test_a_chunk_skipping_a_later_stage_keeps_its_place() -> None:
    h = started(ChainPlan(request=(Stage(0), Stage(1, byte_limit=2), Stage(2))))
    h.feed(REQ, b"ab")
    through(h, 1, [0, 1], data=b"ab")  # seq 1 fills element 1's limit, waits there
    h.feed(REQ, b"c")
    assert h.verdict(0, 2) == []  # seq 2 skips element 1, yet queues behind seq 1
    assert h.verdict(1, 1) == [Data(2, 1, REQ, b"ab"), Data(2, 2, REQ, b"c")]
    assert h.verdict(2, 2) == []
    assert h.verdict(2, 1) == [Write(REQ, b"ab"), Write(REQ, b"c")]


def test_a_chunk_skipping_an_idle_stage_goes_on_to_the_next() -> None:
    h = started(ChainPlan(request=(Stage(0), Stage(1, byte_limit=2), Stage(2))))
    h.feed(REQ, b"ab")
    through(h, 1, [0, 1, 2], data=b"ab")
    h.feed(REQ, b"c")
    assert h.verdict(0, 2) == [Data(2, 2, REQ, b"c")]  # element 1 idle and full: skipped
    assert h.verdict(2, 2) == []
    assert h.verdict(2, 1) == [Write(REQ, b"ab"), Write(REQ, b"c")]


def test_once_every_stage_is_bypassed_bytes_flow_without_asking() -> None:
    h = started(ChainPlan(request=(Stage(0, byte_limit=1), Stage(1, inline=False, byte_limit=1))))
    assert h.feed(REQ, b"a") == [Data(0, 1, REQ, b"a")]
    assert h.feed(REQ, b"b") == []  # queued behind seq 1
    assert h.verdict(0, 1) == [Data(1, 1, REQ, b"a", wait=False), Write(REQ, b"a"), Write(REQ, b"b")]
    assert h.feed(REQ, b"c") == [Write(REQ, b"c")]
    assert h.eof(REQ) == [Eof(REQ)]


# ---- window, coalescing, backpressure --------------------------------------------------------

def test_window_full_coalesces_reads_into_chunks_of_at_most_chunk_size() -> None:
    h = started(ChainPlan(request=(Stage(0),)), LaneLimits(chunk_size=4, window=2, high_water=100))
    assert h.feed(REQ, b"a") == [Data(0, 1, REQ, b"a")]
    assert h.feed(REQ, b"b") == [Data(0, 2, REQ, b"b")]
    assert h.feed(REQ, b"c") == [] and h.feed(REQ, b"d") == [] and h.feed(REQ, b"efghij") == []
    assert h.verdict(0, 1) == [Write(REQ, b"a"), Data(0, 3, REQ, b"cdef")]
    assert h.verdict(0, 2) == [Write(REQ, b"b"), Data(0, 4, REQ, b"ghij")]
    assert h.verdict(0, 3) == [Write(REQ, b"cdef")]
    assert h.feed(REQ, b"k") == [Data(0, 5, REQ, b"k")]


def test_a_read_larger_than_chunk_size_is_cut() -> None:
    h = started(ChainPlan(request=(Stage(0),)), LaneLimits(chunk_size=3, window=2, high_water=100))
    assert h.feed(REQ, b"abcdefgh") == [Data(0, 1, REQ, b"abc"), Data(0, 2, REQ, b"def")]
    assert h.verdict(0, 1) == [Write(REQ, b"abc"), Data(0, 3, REQ, b"gh")]


def test_reading_pauses_at_high_water_and_resumes_below_half_of_it() -> None:
    h = started(ChainPlan(request=(Stage(0),)), LaneLimits(chunk_size=4, window=1, high_water=10))
    assert h.feed(REQ, b"1111") == [Data(0, 1, REQ, b"1111")]
    assert h.feed(REQ, b"2222") == []  # 8 buffered
    assert h.feed(REQ, b"33") == [Reading(REQ, False)]  # 10 buffered: pause
    assert h.verdict(0, 1) == [Write(REQ, b"1111"), Data(0, 2, REQ, b"2222")]  # 6: still paused
    assert h.verdict(0, 2) == [Write(REQ, b"2222"), Data(0, 3, REQ, b"33"), Reading(REQ, True)]  # 2 < 5
    assert h.out.reading == {REQ: True, RESP: True}


def test_the_window_bounds_chunks_in_flight_when_eof_arrives() -> None:
    """The window bounds the chunks in the chain; the empty end_of_stream chunk is one of them."""
    h = started(ChainPlan(request=(Stage(0),)), LaneLimits(window=1))
    assert h.feed(REQ, b"a") == [Data(0, 1, REQ, b"a")]
    assert h.eof(REQ) == []
    assert h.verdict(0, 1) == [Write(REQ, b"a"), Data(0, 2, REQ, b"", eos=True)]
    assert h.verdict(0, 2) == [Eof(REQ)]


def test_reading_resumes_once_nothing_is_buffered_even_with_the_smallest_high_water() -> None:
    h = started(ChainPlan(request=(Stage(0),)), LaneLimits(chunk_size=4, window=1, high_water=1))
    assert h.feed(REQ, b"a") == [Data(0, 1, REQ, b"a"), Reading(REQ, False)]
    assert h.verdict(0, 1) == [Write(REQ, b"a"), Reading(REQ, True)]


# ---- hold, reply, done ------------------------------------------------------------------------

ONE = ChainPlan(request=(Stage(0),), response=(Stage(0),))


def test_held_chunks_wait_then_pass_with_the_deciding_one_as_one_chunk() -> None:
    h = started(ChainPlan(request=(Stage(0), Stage(1))))
    assert h.feed(REQ, b"FLU") == [Data(0, 1, REQ, b"FLU")]
    assert h.verdict(0, 1, HOLD, metadata={"a": "1"}) == []
    assert h.feed(REQ, b"SH") == [Data(0, 2, REQ, b"SH")]  # a new chunk, never the held bytes again
    assert h.verdict(0, 2, HOLD) == []
    assert h.feed(REQ, b"ALL") == [Data(0, 3, REQ, b"ALL")]
    assert h.verdict(0, 3, PASS, metadata={"b": "2"}) == [Data(1, 3, REQ, b"FLUSHALL")]
    assert h.out.data_metadata[(1, 3)] == {"a": "1", "b": "2"}
    assert h.verdict(1, 3) == [Write(REQ, b"FLUSHALL")]
    assert h.flow.request.in_flight == 0 and h.flow.request.in_flight_bytes == 0


def test_a_replacement_replaces_every_held_chunk_and_drop_discards_them() -> None:
    h = started(ONE)
    h.feed(REQ, b"a")
    h.verdict(0, 1, HOLD)
    h.feed(REQ, b"b")
    assert h.verdict(0, 2, PASS, b"X") == [Write(REQ, b"X")]
    h.feed(REQ, b"c")
    h.verdict(0, 3, HOLD)
    h.feed(REQ, b"d")
    assert h.verdict(0, 4, DROP) == []
    assert h.feed(REQ, b"e") == [Data(0, 5, REQ, b"e")]
    assert h.verdict(0, 5) == [Write(REQ, b"e")]


def test_hold_then_reset_writes_nothing_held() -> None:
    h = started(ONE)
    h.feed(REQ, b"a")
    h.verdict(0, 1, HOLD)
    h.feed(REQ, b"b")
    assert h.verdict(0, 2, RESET) == [Close(0, Outcome.RESET_BY_ELEMENT), Finish(Outcome.RESET_BY_ELEMENT)]


def test_close_after_hold_discards_the_held_chunks_and_keeps_what_came_before() -> None:
    h = started(ChainPlan(request=(Stage(0), Stage(1))))
    h.feed(REQ, b"ok")
    assert h.verdict(0, 1) == [Data(1, 1, REQ, b"ok")]  # still at element 1
    h.feed(REQ, b"held")
    h.verdict(0, 2, HOLD)
    h.feed(REQ, b"bad")
    assert h.verdict(0, 3, CLOSE) == [Reading(REQ, False), Reading(RESP, False), Eof(RESP)]
    assert h.verdict(1, 1) == [Write(REQ, b"ok"), Eof(REQ), Close(0, Outcome.CLOSED_BY_ELEMENT),
                               Close(1, Outcome.CLOSED_BY_ELEMENT), Finish(Outcome.CLOSED_BY_ELEMENT)]


def test_the_end_of_stream_chunk_decides_what_is_held() -> None:
    h = started(ONE)
    h.feed(REQ, b"partial")
    h.verdict(0, 1, HOLD)
    assert h.eof(REQ) == [Data(0, 2, REQ, b"", eos=True)]
    assert h.verdict(0, 2) == [Write(REQ, b"partial"), Eof(REQ)]
    h = started(ONE)
    h.feed(REQ, b"partial")
    h.verdict(0, 1, HOLD)
    h.eof(REQ)
    assert h.verdict(0, 2, DROP) == [Eof(REQ)]  # the bytes are gone, the half-close travels


def test_hold_on_an_end_of_stream_chunk_ends_the_connection_as_a_failure() -> None:
    """The sessions refuse it (nothing could decide it later); should one slip through, the lane
    does not keep bytes forever."""
    h = started(ONE)
    h.eof(REQ)
    assert h.verdict(0, 1, HOLD) == [Close(0, Outcome.FAILURE), Finish(Outcome.FAILURE)]
    assert "nothing later could decide" in h.out.details[0]


def test_held_chunks_take_no_window_slot_but_count_against_high_water() -> None:
    h = started(ONE, LaneLimits(chunk_size=4, window=1, high_water=8))
    assert h.feed(REQ, b"1111") == [Data(0, 1, REQ, b"1111")]
    assert h.feed(REQ, b"2222") == [Reading(REQ, False)]  # 8 buffered, one in flight: paused
    assert h.verdict(0, 1, HOLD) == [Data(0, 2, REQ, b"2222")]  # the window has room again
    assert h.flow.request.in_flight == 1 and h.flow.request.in_flight_bytes == 8
    assert h.verdict(0, 2, HOLD) == [Reading(REQ, True)]  # only held bytes: read on, or nothing decides them
    assert h.feed(REQ, b"33") == [Data(0, 3, REQ, b"33"), Reading(REQ, False)]
    assert h.verdict(0, 3) == [Write(REQ, b"1111222233"), Reading(REQ, True)]


def test_a_bypassed_element_lets_what_it_holds_go_with_the_next_chunk() -> None:
    h = started(ChainPlan(request=(Stage(0, byte_limit=3), Stage(1))))
    h.feed(REQ, b"abc")  # reaches element 0's byte limit
    h.verdict(0, 1, HOLD)
    assert h.feed(REQ, b"d") == [Data(1, 2, REQ, b"abcd")]
    assert h.verdict(1, 2) == [Write(REQ, b"abcd")]


def test_held_bytes_are_discarded_when_a_close_elsewhere_drains_the_lane() -> None:
    h = started(ChainPlan(request=(Stage(0),), response=(Stage(1),)))
    h.feed(REQ, b"held")
    h.verdict(0, 1, HOLD)
    h.feed(RESP, b"bye")
    assert h.verdict(1, 2, CLOSE) == [Reading(RESP, False), Eof(RESP), Reading(REQ, False), Eof(REQ),
                                      Close(0, Outcome.CLOSED_BY_ELEMENT), Close(1, Outcome.CLOSED_BY_ELEMENT),
                                      Finish(Outcome.CLOSED_BY_ELEMENT)]


@pytest.mark.parametrize(("action", "after"), [(PASS, [Write(REQ, b"ab")]),
                                                (FAIL, [Close(0, Outcome.FAILURE), Finish(Outcome.FAILURE)])])
def test_a_lost_holder_leaves_its_chunks_to_the_failure_policy(action: Action, after: list[object]) -> None:
    h = started(ONE)
    h.feed(REQ, b"a")
    h.verdict(0, 1, HOLD)
    h.feed(REQ, b"b")
    h.verdict(0, 2, HOLD)
    h.flow.request.holder_lost(0, action)
    assert h.take() == after
    h.flow.request.holder_lost(0, action)  # nothing held any more: nothing happens
    assert h.take() == []


def test_a_reply_goes_back_to_the_sender_at_once_and_not_through_the_other_lane() -> None:
    h = started(THREE)
    h.feed(RESP, b"r")  # in the response lane's chain when the reply is written
    h.feed(REQ, b"GET /admin")
    assert h.verdict(0, 2, DROP, reply=b"403") == [Write(RESP, b"403")]
    through(h, 1, [2, 1, 0], RESP, b"r")
    assert h.verdict(0, 1) == [Write(RESP, b"r")]
    h.feed(RESP, b"push")
    assert h.verdict(2, 3, PASS, reply=b"ack") == [Write(REQ, b"ack"), Data(1, 3, RESP, b"push")]


def test_a_reply_with_close_goes_out_before_the_fin() -> None:
    h = started(ONE)
    h.feed(REQ, b"QUIT")
    assert h.verdict(0, 1, CLOSE, reply=b"bye") == [Write(RESP, b"bye"), Reading(REQ, False), Eof(REQ),
                                                    Reading(RESP, False), Eof(RESP),
                                                    Close(0, Outcome.CLOSED_BY_ELEMENT),
                                                    Finish(Outcome.CLOSED_BY_ELEMENT)]


def test_a_reply_is_ignored_with_reset_and_after_that_side_was_half_closed() -> None:
    h = started(ONE)
    h.eof(RESP)
    assert h.verdict(0, 1) == [Eof(RESP)]
    h.feed(REQ, b"x")
    assert h.verdict(0, 2, PASS, reply=b"too late") == [Write(REQ, b"x")]
    h.feed(REQ, b"y")
    assert h.verdict(0, 3, RESET, reply=b"never") == [Close(0, Outcome.RESET_BY_ELEMENT),
                                                      Finish(Outcome.RESET_BY_ELEMENT)]


def test_an_open_verdict_reply_reaches_the_client_before_the_dial_or_the_fin() -> None:
    h = Harness(ChainPlan(open=(Stage(0),)))
    h.flow.start()
    assert h.take() == [Open(0, {})]
    assert h.verdict(0, 0, PASS, reply=b"+banner") == [Write(RESP, b"+banner"), Dial()]
    h = Harness(ChainPlan(open=(Stage(0),)))
    h.flow.start()
    assert h.take() == [Open(0, {})]
    assert h.verdict(0, 0, CLOSE, reply=b"-denied") == [Write(RESP, b"-denied"), Close(0, Outcome.CLOSED_BY_ELEMENT),
                                                        Finish(Outcome.CLOSED_BY_ELEMENT)]


def test_done_bypasses_the_element_for_that_direction_only_and_the_fast_path_returns() -> None:
    h = started(ONE)
    h.feed(REQ, b"HELLO")
    assert h.verdict(0, 1, PASS, done=True) == [Write(REQ, b"HELLO")]
    assert h.feed(REQ, b"rest") == [Write(REQ, b"rest")]  # no element left to ask: straight out
    assert h.flow.request.passthrough
    assert h.feed(RESP, b"r") == [Data(0, 2, RESP, b"r")]  # the other direction still asks
    assert h.eof(REQ) == [Eof(REQ)]


def test_done_then_end_of_stream_chunks_already_sent_are_answered_then_eof_goes_straight() -> None:
    h = started(ChainPlan(request=(Stage(0), Stage(1))))
    h.feed(REQ, b"a")
    h.feed(REQ, b"b")  # sent to element 0 before its done arrives
    assert h.verdict(0, 1, PASS, done=True) == [Data(1, 1, REQ, b"a")]
    assert h.eof(REQ) == []  # behind seq 2, still waiting at element 0
    assert h.verdict(0, 2) == [Data(1, 2, REQ, b"b"), Data(1, 3, REQ, b"", eos=True)]
    h.verdict(1, 1)
    h.verdict(1, 2)
    assert h.verdict(1, 3) == [Eof(REQ)]


def test_done_on_an_open_verdict_bypasses_the_element_in_both_directions() -> None:
    plan = ChainPlan(request=(Stage(0), Stage(1)), response=(Stage(1), Stage(0)), open=(Stage(0),))
    h = Harness(plan)
    h.flow.start()
    assert h.take() == [Open(0, {})]
    assert h.verdict(0, 0, PASS, done=True) == [Dial()]
    assert h.feed(REQ, b"q") == [Data(1, 1, REQ, b"q")]
    assert h.feed(RESP, b"r") == [Data(1, 2, RESP, b"r")]


# ---- hypothesis against the reference model -------------------------------------------------
#
# The test plays every element: it feeds random reads, answers pending verdicts in random
# order (in order per element and direction, or any order), and after every step compares
# what the Flow did with tests/chain_model.py, which recomputes from scratch where each chunk
# must be. The lane's own cut of the input into chunks is taken as given (SpyLane) and checked
# separately: the pieces add up to what was read, none is larger than chunk_size. So is the
# moment an element's `done` took effect (it depends on when its verdict was applied), which
# must follow a verdict with `done`. Every reply is a token naming its element and chunk, so
# the replies can be told apart from a lane's own bytes on the same socket.

# CHAIN_EXAMPLES=20000 for a long hunt; the default keeps the file near 15 s.
EXAMPLES = int(os.environ.get("CHAIN_EXAMPLES", "500"))

REPLACE = "replace"
GENTLE_ACTIONS = [PASS, PASS, PASS, REPLACE, REPLACE, DROP, DROP, HOLD, HOLD]
HARSH_ACTIONS = [PASS, PASS, PASS, REPLACE, REPLACE, DROP, DROP, HOLD, HOLD, CLOSE, CLOSE, RESET, FAIL]
# mostly HOLD: elements that keep many chunks before deciding them
HOLDING_ACTIONS = [HOLD, HOLD, HOLD, HOLD, HOLD, PASS, REPLACE, DROP, RESET]
ENDS = {CLOSE: Outcome.CLOSED_BY_ELEMENT, RESET: Outcome.RESET_BY_ELEMENT, FAIL: Outcome.FAILURE}


@dataclass(frozen=True)
class Scenario:
    plan: ChainPlan
    limits: LaneLimits
    reads: dict[Direction, list[bytes]]
    eof: dict[Direction, bool]
    in_order: bool
    answer_at_once: bool  # some verdicts come back from inside send_data (re-entrancy)


byte_limits = st.one_of(st.just(0), st.just(0), st.integers(1, 16))


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    n = draw(st.integers(0, 3))
    request, response, opening = [], [], []
    for element in range(n):
        if draw(st.booleans()) or n == 1:
            request.append(Stage(element, draw(st.booleans()), draw(byte_limits)))
        if draw(st.booleans()) or n == 1:
            response.append(Stage(element, draw(st.booleans()), draw(byte_limits)))
        if draw(st.integers(0, 3)) == 0:
            opening.append(Stage(element, draw(st.booleans())))
    plan = ChainPlan(request=tuple(request), response=tuple(reversed(response)), open=tuple(opening))
    limits = LaneLimits(chunk_size=draw(st.integers(1, 8)), window=draw(st.integers(1, 4)),
                        high_water=draw(st.integers(1, 40)))
    reads = {d: draw(st.lists(st.binary(min_size=1, max_size=10), max_size=6)) for d in (REQ, RESP)}
    eof = {d: draw(st.integers(0, 9)) > 0 for d in (REQ, RESP)}
    return Scenario(plan, limits, reads, eof, draw(st.booleans()), draw(st.integers(0, 3)) == 0)


class Run:
    """One connection driven by hypothesis, checked against the model after every step."""

    def __init__(self, scenario: Scenario, data: st.DataObject, actions: list[object]) -> None:
        self.s = scenario
        self.data = data
        self.actions = actions
        self.out = Recorder()
        self.flow = spy_flow(scenario.plan, scenario.limits, self.out)
        self.todo = {d: list(scenario.reads[d]) for d in (REQ, RESP)}
        self.fed = {d: bytearray() for d in (REQ, RESP)}
        self.eof_fed = {d: False for d in (REQ, RESP)}
        self.decisions: dict[Direction, dict[tuple[int, int], Decision]] = {REQ: {}, RESP: {}}
        self.open_decisions: dict[int, tuple[int, dict[str, str] | None, bytes | None, bool]] = {}
        self.ends_delivered: set[int] = set()  # terminal actions delivered before the flow finished
        if scenario.answer_at_once:
            self.out.on_ask = self.answer_at_once

    def answer_at_once(self, ask: Ask) -> None:
        if self.s.in_order and any(a.element == ask.element and a.direction == ask.direction
                                   for a in self.out.asks[:-1]):
            return
        if self.data.draw(st.booleans(), label="answer at once"):
            self.deliver(ask)

    def stages(self, d: Direction) -> tuple[Stage, ...]:
        return self.s.plan.request if d == REQ else self.s.plan.response

    # -- driving --

    def go(self) -> None:
        self.flow.start()
        self.check()
        while options := self.options():
            kind, arg = options[self.data.draw(st.integers(0, len(options) - 1), label="step")]
            if kind == "feed":
                piece = self.todo[arg].pop(0)
                self.fed[arg] += piece
                self.flow.lane(arg).feed(piece)
            elif kind == "eof":
                self.eof_fed[arg] = True
                self.flow.lane(arg).feed_eof()
            else:
                self.deliver(arg)
            self.check()

    def options(self) -> list[tuple[str, object]]:
        options: list[tuple[str, object]] = []
        if Dial() in self.out.calls and not self.out.finished:
            for d in (REQ, RESP):
                if not self.out.reading[d] or self.eof_fed[d]:
                    continue
                if self.todo[d]:
                    options.append(("feed", d))
                elif self.s.eof[d]:
                    options.append(("eof", d))
        heads: set[tuple[int, Direction | None]] = set()
        for ask in self.out.asks:
            key = (ask.element, ask.direction)
            if self.s.in_order and key in heads:
                continue
            heads.add(key)
            options.append(("verdict", ask))
        return options

    def deliver(self, ask: Ask) -> None:
        self.out.asks.remove(ask)
        draw = self.data.draw
        action = draw(st.sampled_from(self.actions), label="action")
        if ask.direction is None and action == REPLACE or action == HOLD and (ask.direction is None or ask.eos):
            action = PASS  # the sessions refuse HOLD on an Open and at end of stream
        replacement = draw(st.binary(max_size=6), label="replacement") if action == REPLACE else None
        action = PASS if action == REPLACE else action
        metadata = draw(st.sampled_from([None, {"k": str(ask.element)},
                                          {"k": str(ask.element), f"e{ask.element}": str(ask.seq)}]),
                        label="metadata")
        reply = b"<reply %d.%d>" % (ask.element, ask.seq) if draw(st.integers(0, 3), label="reply") == 0 else None
        done = action != HOLD and draw(st.integers(0, 5), label="done") == 0
        if not self.out.finished:
            if ask.direction is None:
                self.open_decisions[ask.pos] = (action, metadata, reply, done)
            else:
                self.decisions[ask.direction][(ask.pos, ask.seq)] = (action, replacement, metadata, reply, done)
            if action in ENDS:
                self.ends_delivered.add(action)
        ask.target.on_verdict(ask.pos, ask.seq, action, replacement, metadata, reply, done)

    # -- checking --

    @property
    def disturbed(self) -> bool:
        return bool(self.ends_delivered)

    def model(self, d: Direction) -> LaneModel:
        lane = self.flow.lane(d)
        return model_lane(lane.units, self.stages(d), self.decisions[d], lane.done_after)

    def writes(self, d: Direction) -> list[bytes]:
        """The lane's own writes to the socket of direction `d`: every Write but the replies."""
        return [c.data for i, c in enumerate(self.out.calls)
                if isinstance(c, Write) and c.direction == d and i not in self.flow.reply_writes]

    def open_replies(self) -> list[bytes]:
        """The replies of the Open verdicts applied: those of the inline Open stages answered in turn."""
        replies = []
        for pos, stage in enumerate(self.s.plan.open):
            if not stage.inline:
                continue
            if pos not in self.open_decisions:
                break
            action, _, reply, _ = self.open_decisions[pos]
            if reply and action not in (RESET, FAIL):
                replies.append(reply)
            if action not in (PASS, DROP):
                break
        return replies

    def check_replies(self, models: dict[Direction, LaneModel]) -> None:
        """A reply goes back to its chunk's sender unless that side got its EOF already; in an
        undisturbed run, exactly the replies of the verdicts applied are sent."""
        calls = self.out.calls
        written = {calls[i] for i in self.flow.reply_writes}
        back = {REQ: RESP, RESP: REQ}
        for reply in self.flow.replies:
            assert reply.written == (Write(back[reply.direction], reply.data) in written), reply
        for at in self.flow.reply_writes:  # before the EOF of the side it went to
            assert Eof(calls[at].direction) not in calls[:at]  # type: ignore[union-attr]
        if not self.disturbed:
            for d in (REQ, RESP):
                sent = sorted(r.data for r in self.flow.replies if r.direction == d)
                assert sent == sorted(models[d].replies + (self.open_replies() if d == REQ else [])), (d, sent)

    def cutoff(self, m: LaneModel) -> int | None:
        closes = [seq for seq, action in m.terminals if action == CLOSE]
        return closes[0] if closes else None

    def expected_writes(self, m: LaneModel) -> tuple[list[bytes], bool]:
        cut = self.cutoff(m)
        kept = [(seq, data, eos) for seq, data, eos in m.outputs if cut is None or seq is None or seq < cut]
        return [data for _, data, _ in kept if data], any(eos for _, _, eos in kept)

    def check(self) -> None:
        out, limits = self.out, self.s.limits
        assert out.after_finish == [], f"calls after finish: {out.after_finish}"
        assert len(out.finished) <= 1
        self.check_open()
        seqs: list[int] = []
        models = {d: self.model(d) for d in (REQ, RESP)}
        for d in (REQ, RESP):
            lane = self.flow.lane(d)
            stages = self.stages(d)
            units = lane.units
            chunk_seqs = [u.seq for u in units if u.seq is not None]
            seqs += chunk_seqs
            assert chunk_seqs == sorted(set(chunk_seqs))
            assert all(len(u.data) <= limits.chunk_size for u in units if u.seq is not None)
            assert all(u.data or u.eos for u in units), "an empty chunk without end_of_stream"
            assert [i for i, u in enumerate(units) if u.eos] in ([], [len(units) - 1]), "end_of_stream not last"
            cut = b"".join(u.data for u in units) + bytes(lane.pending)
            if lane.stopped:  # bytes read after the closing chunk are thrown away
                assert bytes(self.fed[d]).startswith(cut)
            else:
                assert cut == bytes(self.fed[d])
            m = models[d]
            actual: list[list[tuple[int, bytes, bool, dict[str, str]]]] = []
            for stage in stages:
                calls = [c for c in out.calls
                         if isinstance(c, Data) and c.direction == d and c.element == stage.element]
                assert all(c.wait == stage.inline for c in calls)
                assert [c.seq for c in calls] == sorted(set(c.seq for c in calls)), "not in sequence order"
                assert set(c.seq for c in calls) <= set(chunk_seqs)
                actual.append([(c.seq, c.data, c.eos, out.data_metadata[(c.element, c.seq)]) for c in calls])
            writes = self.writes(d)
            eofs = sum(1 for c in out.calls if c == Eof(d))
            self.check_done(lane, m)
            assert eofs <= 1
            want_writes, want_eof = self.expected_writes(m)
            assert 0 <= lane.in_flight <= limits.window
            if not self.disturbed:
                assert actual == m.receipts
                assert writes == want_writes
                assert eofs == want_eof
                assert lane.in_flight == len(m.in_flight)
                assert len(m.in_flight) <= limits.window
                assert {pos: [c.seq for c in chunks] for pos, chunks in lane.held.items()} == \
                    {pos: [k.seq for k in kept] for pos, kept in m.kept.items() if kept}
                waiting = {a.seq for a in out.asks if a.direction == d}
                assert len(waiting) <= limits.window
                if not out.finished and not self.eof_fed[d]:
                    # held bytes count, but only held bytes never stop reading: more must come to decide them
                    buffered = len(lane.pending) + sum(m.in_flight.values()) + m.kept_bytes
                    assert lane.in_flight_bytes == sum(m.in_flight.values()) + m.kept_bytes
                    if out.reading[d]:
                        assert buffered < limits.high_water or not m.in_flight, f"reading with {buffered} buffered"
                    else:
                        assert buffered >= limits.high_water // 2 and m.in_flight, f"paused with {buffered} buffered"
            else:
                for got, model in zip(actual, m.receipts):
                    assert got == model[:len(got)]
                assert writes == want_writes[:len(writes)]
        assert len(seqs) == len(set(seqs)), "a sequence number used twice"
        self.check_replies(models)
        if out.finished:
            outcome = out.finished[0].outcome
            closes = [c for c in out.calls if isinstance(c, Close)]
            touched = {c.element for c in out.calls if isinstance(c, (Open, Data))}
            assert sorted(c.element for c in closes) == sorted(touched)
            assert all(c.outcome == outcome for c in closes)
            assert out.calls.index(out.finished[0]) == len(out.calls) - 1
            if outcome in (Outcome.COMPLETED, Outcome.CLOSED_BY_ELEMENT) and Dial() in out.calls:
                assert Eof(REQ) in out.calls and Eof(RESP) in out.calls
        else:
            assert not any(isinstance(c, Close) for c in out.calls)
            assert not (Eof(REQ) in out.calls and Eof(RESP) in out.calls), "both sides done, flow not finished"

    def check_done(self, lane: SpyLane, m: LaneModel) -> None:
        """`done` took effect at a stage only after a verdict with `done` there (or on its element's
        Open), after the chunk it answered was sent; and every such verdict applied had its effect."""
        stages = lane.stages
        open_done = {stage.element for pos, stage in enumerate(self.s.plan.open)
                     if pos in self.open_decisions and self.open_decisions[pos][3]
                     and self.open_decisions[pos][0] in (PASS, DROP)}
        receipts = {pos: [r[0] for r in m.receipts[pos]] for pos in range(len(stages))}
        for pos, after in lane.done_after.items():
            firsts = [seq for at, seq in m.done if at == pos]
            assert stages[pos].element in open_done or firsts, f"stage {pos} bypassed without done"
            if firsts and stages[pos].element not in open_done:
                assert receipts[pos].index(firsts[0]) < after
        for pos, _ in m.done if not self.disturbed else ():  # a close or reset drops chunks the model does not know
            limit = stages[pos].byte_limit
            if not (limit and sum(len(r[1]) for r in m.receipts[pos]) >= limit):  # else bypassed already
                assert pos in lane.done_after, f"done at stage {pos} had no effect"

    def check_open(self) -> None:
        expected: list[Open] = []
        metadata: dict[str, str] = {}
        dial = True
        for pos, stage in enumerate(self.s.plan.open):
            expected.append(Open(stage.element, dict(metadata), stage.inline))
            if not stage.inline:
                continue
            if pos not in self.open_decisions:
                dial = False
                break
            action, more, _, _ = self.open_decisions[pos]
            if action not in (PASS, DROP):
                dial = False
                break
            if more:
                metadata = {**metadata, **more}
        assert [c for c in self.out.calls if isinstance(c, Open)] == expected
        assert self.out.calls.count(Dial()) == int(dial)

    def check_end(self) -> None:
        out = self.out
        outcome = out.finished[0].outcome if out.finished else None
        event(f"outcome: {outcome.name if outcome else 'open'}")
        rejected = [a for a in self.open_decisions.values() if a[0] in ENDS]
        for d in (REQ, RESP):
            event(f"{d.name.lower()}: {'held' if self.model(d).kept else 'nothing held'} at the end")
        event(f"replies: {sum(r.written for r in self.flow.replies)}")
        if rejected:
            assert outcome == ENDS[rejected[0][0]] and Dial() not in out.calls
            assert not any(isinstance(c, Data) for c in out.calls)
            return
        models = {d: self.model(d) for d in (REQ, RESP)}
        cuts = {d: self.cutoff(m) for d, m in models.items()}
        for d, other in ((REQ, RESP), (RESP, REQ)):
            if cuts[d] is not None and any(u.seq and u.seq > cuts[d] for u in self.flow.lane(other).units):
                event("closed while the other lane carried later chunks")
        resets = {action for d, m in models.items() for seq, action in m.terminals
                  if action in (RESET, FAIL) and (cuts[d] is None or seq is None or seq < cuts[d])}
        if resets:
            assert outcome in {ENDS[a] for a in resets} | {ENDS[a] for a in self.ends_delivered if a != CLOSE}
        if outcome in (Outcome.RESET_BY_ELEMENT, Outcome.FAILURE):
            assert {ENDS[a] for a in self.ends_delivered if a != CLOSE} >= {outcome}
            return
        assert out.asks == [] or self.disturbed
        for d, m in models.items():
            want_writes, want_eof = self.expected_writes(m)
            assert self.writes(d) == want_writes
            if cuts[REQ] is None and cuts[RESP] is None:
                assert self.todo[d] == [], "reading paused for good"
                assert not m.in_flight and self.flow.lane(d).in_flight == 0
                assert (Eof(d) in out.calls) == want_eof == self.s.eof[d]
        if cuts[REQ] is not None or cuts[RESP] is not None:
            assert outcome == Outcome.CLOSED_BY_ELEMENT
            for d, m in models.items():  # everything before the closing chunk drained, in both lanes
                assert [s for s in m.in_flight if cuts[d] is None or s is None or s < cuts[d]] == []
            assert out.calls.count(Eof(REQ)) == 1 and out.calls.count(Eof(RESP)) == 1
        elif self.s.eof[REQ] and self.s.eof[RESP]:
            assert outcome == Outcome.COMPLETED
        else:
            assert outcome is None


@pytest.mark.parametrize("actions", [GENTLE_ACTIONS, HARSH_ACTIONS, HOLDING_ACTIONS],
                         ids=["pass-replace-drop-hold", "close-reset-failure", "holding-across-many-chunks"])
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios(), data=st.data())
def test_the_chain_matches_the_model(actions: list[object], scenario: Scenario, data: st.DataObject) -> None:
    run = Run(scenario, data, actions)
    run.go()
    run.check_end()


# ---- a connection announced to a new session (resumed Open) ----------------------------------

def test_an_element_is_tracked_once_when_the_connection_first_sends_it_an_event() -> None:
    h = started(THREE)
    assert h.out.tracked == []
    h.feed(REQ, b"a")
    through(h, 1, [0, 1, 2], data=b"a")
    h.verdict(2, 1)
    h.feed(REQ, b"b")
    assert h.out.tracked == [0, 1, 2]


@pytest.mark.parametrize("action", [PASS, DROP])
def test_a_resumed_open_answered_pass_or_drop_keeps_the_connection(action: Action) -> None:
    h = started(THREE)
    assert h.feed(REQ, b"a") == [Data(0, 1, REQ, b"a")]
    Resumed(h.flow).on_verdict(1, 0, action, None, None)
    assert h.take() == []
    through(h, 1, [0, 1, 2], data=b"a")
    assert h.verdict(2, 1) == [Write(REQ, b"a")]


def test_a_resumed_open_answered_close_drains_what_was_read_then_fins_both_ways() -> None:
    h = started(THREE)
    assert h.feed(REQ, b"a") == [Data(0, 1, REQ, b"a")]
    Resumed(h.flow).on_verdict(1, 0, CLOSE, None, None)
    assert h.take() == [Reading(REQ, False), Reading(RESP, False), Eof(RESP)]
    assert h.feed(REQ, b"after") == []
    through(h, 1, [0, 1, 2], data=b"a")
    assert h.verdict(2, 1) == [Write(REQ, b"a"), Eof(REQ), *(Close(e, Outcome.CLOSED_BY_ELEMENT) for e in range(3)),
                               Finish(Outcome.CLOSED_BY_ELEMENT)]


@pytest.mark.parametrize(("action", "outcome"), [(RESET, Outcome.RESET_BY_ELEMENT), (FAIL, Outcome.FAILURE)])
def test_a_resumed_open_answered_reset_or_failed_resets_at_once(action: Action, outcome: Outcome) -> None:
    h = started(THREE)
    assert h.feed(REQ, b"a") == [Data(0, 1, REQ, b"a")]
    Resumed(h.flow).on_verdict(2, 0, action, None, None)
    assert h.take() == [Close(0, outcome), Finish(outcome)]
    assert h.flow.ended and h.feed(REQ, b"b") == []


# ---- parallel stages (read-only elements asked at once) ------------------------------------
#
# A parallel stage must write what the same elements one after another would have written.
# Both chains get the same reads and the same verdict per (element, chunk); only the order
# verdicts come back in differs: any order when no verdict ends the connection (then timing
# cannot matter), else chunk by chunk (lowest sequence first, as a sequential chain must
# answer), the members of a parallel stage in a random order.

PARALLEL_ACTIONS = [PASS, PASS, PASS, PASS, DROP, DROP, CLOSE, RESET, FAIL]


def _outcome_of(plan: ChainPlan, reads: list[tuple[Direction, bytes]], eofs: list[Direction],
                table: Mapping[tuple[int, int], int], pick: st.DataObject, lowest_first: bool,
                limits: LaneLimits) -> tuple[dict[Direction, bytes], set[Direction], list[Finish], list[str]]:
    """What one chain wrote per direction, which directions it half-closed, how it ended (the two
    directions are independent, so the order between them is not compared)."""
    h = Harness(plan, limits)
    h.flow.start()
    for direction, data in reads:
        h.flow.lane(direction).feed(data)
    for direction in eofs:
        h.flow.lane(direction).feed_eof()
    for _ in range(1000):
        asks = h.out.asks
        if not asks or h.out.finished:
            break
        if lowest_first:
            low = min(ask.seq for ask in asks)
            choices = [ask for ask in asks if ask.seq == low]
        else:
            choices = list(asks)
        ask = choices[pick.draw(st.integers(0, len(choices) - 1))]
        asks.remove(ask)
        ask.target.on_verdict(ask.pos, ask.seq, table.get((ask.element, ask.seq), PASS), None, None)
    written = {REQ: b"", RESP: b""}
    for call in h.out.calls:
        if isinstance(call, Write):
            written[call.direction] += call.data
    return written, {c.direction for c in h.out.calls if isinstance(c, Eof)}, h.out.finished, h.out.details


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_parallel_stage_writes_what_the_same_elements_in_sequence_write(data: st.DataObject) -> None:
    n = data.draw(st.integers(2, 4), label="elements")
    sequential = ChainPlan(request=tuple(Stage(e) for e in range(n)),
                           response=tuple(Stage(e) for e in reversed(range(n))))
    parallel = ChainPlan(request=(Stage(0, peers=tuple(range(1, n))),),
                         response=(Stage(n - 1, peers=tuple(reversed(range(n - 1)))),))
    reads = data.draw(st.lists(st.tuples(st.sampled_from([REQ, RESP]), st.binary(min_size=1, max_size=6)),
                               max_size=8), label="reads")
    eofs = data.draw(st.lists(st.sampled_from([REQ, RESP]), unique=True), label="eofs")
    seqs = len(reads) + len(eofs) + 1
    harsh = data.draw(st.booleans(), label="verdicts that end the connection")
    actions = PARALLEL_ACTIONS if harsh else [PASS, PASS, DROP]
    table = {(e, s): data.draw(st.sampled_from(actions)) for e in range(n) for s in range(1, seqs + 1)}
    # every read its own chunk, dispatched as it is read: the same sequence numbers in both chains
    # (how a lane cuts and coalesces is the other hypothesis test's business)
    limits = LaneLimits(chunk_size=8, window=16, high_water=1 << 20)
    one = _outcome_of(sequential, reads, eofs, table, data, harsh, limits)
    other = _outcome_of(parallel, reads, eofs, table, data, harsh, limits)
    assert other == one
    event(f"ends: {[f.outcome.name for f in one[2]]}")


def test_a_parallel_stage_waits_only_for_the_verdicts_chain_order_needs() -> None:
    h = started(ChainPlan(request=(Stage(0, peers=(1, 2)),)))
    assert h.feed(REQ, b"a") == [Data(0, 1, REQ, b"a"), Data(1, 1, REQ, b"a"), Data(2, 1, REQ, b"a")]
    assert h.verdict(2, 1, DROP) == []      # element 2 drops, but 0 and 1 might still reset
    assert h.verdict(1, 1, PASS) == []
    assert h.verdict(0, 1, PASS) == []      # chain order: the drop of element 2 decides
    assert h.feed(REQ, b"b")[:1] == [Data(0, 2, REQ, b"b")]
    assert h.verdict(1, 2, RESET) == []     # element 0 has not passed yet
    assert h.verdict(0, 2, PASS) == [Close(0, Outcome.RESET_BY_ELEMENT), Close(1, Outcome.RESET_BY_ELEMENT),
                                     Close(2, Outcome.RESET_BY_ELEMENT), Finish(Outcome.RESET_BY_ELEMENT)]
    assert h.out.details == ["element #1 reset it"], "the element that said RESET is named"
