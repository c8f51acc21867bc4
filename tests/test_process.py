"""elements/sdk/process.py, the pure half of the Process RPC: requests into events, verdicts into
the response, bytes into text that leads back to them."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from elements.api import element_pb2 as pb
from elements.sdk.process import BadProcessRequest, close_event, data_events, open_event, render, response


def unrender(text: str) -> bytes:
    """The way back that ProcessResult.text documents."""
    escapes = {"\\\\": b"\\", "\\t": b"\t", "\\n": b"\n", "\\r": b"\r"}
    return b"".join(escapes.get(piece) or (bytes([int(piece[2:], 16)]) if piece.startswith("\\x") else piece.encode())
                    for piece in re.split(r"(\\\\|\\[tnr]|\\x[0-9a-f]{2})", text) if piece)


@given(st.binary(max_size=64) | st.text(max_size=32).map(str.encode))
def test_render_leads_back_to_the_bytes(data: bytes) -> None:
    assert unrender(render(data)) == data


@pytest.mark.parametrize("data, text", [
    (b"howdy world", "howdy world"),
    (b"\xff", "\\xff"),
    (b"\\xff", "\\\\xff"),  # the four characters, told apart from the byte
    (b"a\\b", "a\\\\b"),
    (b"GET /\r\n\t", "GET /\\r\\n\\t"),
    ("héllo ✓".encode(), "héllo ✓"),
    (b"\x00\x1b[0m", "\\x00\\x1b[0m"),
    ("\u200b".encode(), "\\xe2\\x80\\x8b"),  # valid UTF-8 but invisible: its bytes
])
def test_render(data: bytes, text: str) -> None:
    assert render(data) == text


def test_chunks_are_numbered_from_one_and_default_to_request() -> None:
    request = pb.ProcessRequest(chunks=[pb.ProcessChunk(text="FLU"),
                                        pb.ProcessChunk(data=b"\xff", direction=pb.DIRECTION_RESPONSE),
                                        pb.ProcessChunk(text="SHALL", end_of_stream=True)])
    events = data_events(request, open_event(request).connection_id)
    assert [(e.connection_id, e.sequence, e.direction, e.data, e.end_of_stream) for e in events] == [
        ("process", 1, pb.DIRECTION_REQUEST, b"FLU", False),
        ("process", 2, pb.DIRECTION_RESPONSE, b"\xff", False),
        ("process", 3, pb.DIRECTION_REQUEST, b"SHALL", True),
    ]


def test_the_single_chunk_form_keeps_its_defaults() -> None:
    request = pb.ProcessRequest(text="hi", open=pb.OpenEvent(connection_id="c9"))
    (event,) = data_events(request, open_event(request).connection_id)
    assert (event.connection_id, event.sequence, event.direction, event.data) == ("c9", 1, pb.DIRECTION_REQUEST, b"hi")


@pytest.mark.parametrize("request_, message", [
    (pb.ProcessRequest(text="x", chunks=[pb.ProcessChunk(text="y")]), "either `chunks` or `data`/`text`"),
    (pb.ProcessRequest(chunks=[pb.ProcessChunk(text="a", end_of_stream=True), pb.ProcessChunk(text="b")]),
     "chunks[1]: its direction DIRECTION_REQUEST ended with end_of_stream on chunks[0]"),
])
def test_impossible_requests_say_why(request_: pb.ProcessRequest, message: str) -> None:
    with pytest.raises(BadProcessRequest, match=re.escape(message)):
        data_events(request_, "process")


def test_results_and_close_follow_the_verdicts() -> None:
    request = pb.ProcessRequest(chunks=[pb.ProcessChunk(text="hel"), pb.ProcessChunk(text="lo"),
                                        pb.ProcessChunk(text="x", direction=pb.DIRECTION_RESPONSE),
                                        pb.ProcessChunk(text="FLUSH")])
    events = data_events(request, "process")
    verdicts = [pb.Verdict(connection_id="process", sequence=0, action=pb.ACTION_PASS),
                pb.Verdict(connection_id="process", sequence=1, action=pb.ACTION_PASS, data=b""),
                pb.Verdict(connection_id="process", sequence=2, action=pb.ACTION_PASS, data=b"howdy"),
                pb.Verdict(connection_id="process", sequence=3, action=pb.ACTION_PASS),
                pb.Verdict(connection_id="process", sequence=4, action=pb.ACTION_RESET)]
    answer = response(request, events, verdicts)
    assert answer.open_verdict.action == pb.ACTION_PASS
    assert [(r.verdict.sequence, r.data, r.text) for r in answer.chunks] == [
        (1, b"", ""), (2, b"howdy", "howdy"), (3, b"x", "x"), (4, b"", "")]
    assert close_event("process", events, verdicts) == pb.CloseEvent(
        connection_id="process", reason=pb.CLOSE_REASON_RESET_BY_ELEMENT, request_bytes=5, response_bytes=1)
