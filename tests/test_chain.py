"""proxy/chain.py without I/O: scripted event lists with exact expected calls, then hypothesis
against the reference model in tests/chain_model.py."""

from __future__ import annotations

import pytest

from proxy.chain import Action, ChainPlan, LaneLimits, Outcome, Stage
from tests.chain_model import (
    REQ, RESP, Close, Data, Dial, Eof, Finish, Harness, Open, Reading, Write,
)

PASS, DROP, CLOSE, RESET, FAIL = Action.PASS, Action.DROP, Action.CLOSE, Action.RESET, Action.FAIL

THREE = ChainPlan(request=(Stage(0), Stage(1), Stage(2)), response=(Stage(2), Stage(1), Stage(0)))


def started(plan: ChainPlan, limits: LaneLimits = LaneLimits()) -> Harness:
    h = Harness(plan, limits)
    h.flow.start()
    assert h.take() == [Dial()]
    return h


def through(h: Harness, seq: int, elements: list[int], direction=REQ, data: bytes = b"", eos: bool = False) -> None:
    """Passes chunk `seq` unchanged through `elements` (already sent to the first)."""
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
    h.flow.reset(Outcome.PEER_RESET, "client reset")  # element 0 never saw this connection
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
    h.flow.reset(Outcome.PEER_RESET, "late")
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
    h.flow.reset(Outcome.PEER_RESET, "upstream RST")
    h.flow.reset(Outcome.PEER_RESET, "again")
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
    """The window is a bound on chunks in the chain; the empty end_of_stream chunk is one."""
    h = started(ChainPlan(request=(Stage(0),)), LaneLimits(window=1))
    assert h.feed(REQ, b"a") == [Data(0, 1, REQ, b"a")]
    assert h.eof(REQ) == []
    assert h.verdict(0, 1) == [Write(REQ, b"a"), Data(0, 2, REQ, b"", eos=True)]


test_the_window_bounds_chunks_in_flight_when_eof_arrives = pytest.mark.xfail(
    strict=True, reason="bug: feed_eof dispatches the empty end_of_stream chunk even when the window is full "
                        "(Lane._pump does not check in_flight < window before it)",
)(test_the_window_bounds_chunks_in_flight_when_eof_arrives)
