"""The hand-encoded SessionRequest (proxy/sessions/wire.py) is what the generated classes read, and the
pending-bytes queue (chain.Pending) cuts reads into chunks without losing or reordering a byte."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from elements.api import element_pb2 as pb
from proxy.chain import Pending
from proxy.sessions.wire import (
    close_event,
    data_event,
    encoded_size,
    message_event,
    session_request,
)

texts = st.text(max_size=12)
data_events = st.tuples(
    texts.filter(bool),                                  # connection id
    st.integers(min_value=0, max_value=2**64 - 1),       # sequence (uint64)
    st.sampled_from([0, 1, 2]),                          # direction
    st.binary(max_size=300),
    st.booleans(),                                       # end_of_stream
    st.none() | st.dictionaries(texts, texts, max_size=3),
    st.booleans(),                                       # pass the data as a memoryview slice
)


def _expected(connection_id: str, sequence: int, direction: int, data: bytes, eos: bool,
              metadata: dict[str, str] | None) -> pb.Event:
    return pb.Event(data=pb.DataEvent(connection_id=connection_id, sequence=sequence, direction=direction,
                                      data=data, end_of_stream=eos, metadata=metadata))


@settings(max_examples=300, deadline=None)
@given(st.lists(data_events, max_size=6))
def test_encoded_data_events_parse_as_the_generated_classes_build_them(events: list) -> None:
    encoded, expected = [], []
    for connection_id, sequence, direction, data, eos, metadata, as_view in events:
        payload = memoryview(b"<" + data + b">")[1:-1] if as_view else data
        encoded.append(data_event(connection_id, sequence, direction, payload, eos, metadata))
        expected.append(_expected(connection_id, sequence, direction, data, eos, metadata))
    raw = session_request(encoded)
    assert pb.SessionRequest.FromString(raw) == pb.SessionRequest(events=expected)
    assert len(raw) == sum(encoded_size(event) for event in encoded)


def test_without_metadata_the_bytes_equal_the_generated_serialization() -> None:
    events = [_expected("7f3a-1", 1, 1, b"GET /", False, None), _expected("7f3a-1", 300, 2, b"", True, None),
              _expected("c", 2**40, 2, b"x" * 70_000, False, None)]
    encoded = [data_event(e.data.connection_id, e.data.sequence, e.data.direction, e.data.data,
                          e.data.end_of_stream, None) for e in events]
    assert session_request(encoded) == pb.SessionRequest(events=events).SerializeToString()


@settings(max_examples=200, deadline=None)
@given(texts.filter(bool), st.sampled_from(list(pb.CloseReason.values())),
       st.integers(min_value=0, max_value=2**64 - 1), st.integers(min_value=0, max_value=2**64 - 1))
def test_encoded_close_events_parse_as_the_generated_classes_build_them(
        connection_id: str, reason: int, request_bytes: int, response_bytes: int) -> None:
    expected = pb.Event(close=pb.CloseEvent(connection_id=connection_id, reason=reason,
                                            request_bytes=request_bytes, response_bytes=response_bytes))
    raw = session_request([close_event(connection_id, reason, request_bytes, response_bytes)])
    assert raw == pb.SessionRequest(events=[expected]).SerializeToString()


def test_open_data_and_close_events_travel_in_the_same_request_in_order() -> None:
    open_event = pb.Event(open=pb.OpenEvent(connection_id="c1", client=pb.Address(ip="10.0.0.1", port=5)))
    closed = pb.Event(close=pb.CloseEvent(connection_id="c1", reason=pb.CLOSE_REASON_COMPLETED, request_bytes=3))
    raw = session_request([message_event(open_event), data_event("c1", 1, 1, b"abc", True, None),
                           close_event("c1", pb.CLOSE_REASON_COMPLETED, 3, 0)])
    assert list(pb.SessionRequest.FromString(raw).events) == [
        open_event, _expected("c1", 1, 1, b"abc", True, None), closed]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=40), max_size=12), st.lists(st.integers(1, 50), min_size=1))
def test_pending_hands_out_every_byte_in_order_in_full_chunks(reads: list[bytes], limits: list[int]) -> None:
    pending = Pending()
    for read in reads:
        pending.append(read)
    assert bytes(pending) == b"".join(reads)
    taken = []
    for i in range(10_000):
        if not pending:
            break
        limit = limits[i % len(limits)]
        before = len(pending)
        piece = pending.take(limit)
        assert len(piece) == min(limit, before), "a chunk is as full as the queue allows"
        assert len(pending) == before - len(piece)
        taken.append(bytes(piece))
    assert b"".join(taken) == b"".join(reads)


def test_a_read_larger_than_a_chunk_is_cut_without_copying() -> None:
    read = bytes(range(256)) * 10
    pending = Pending()
    pending.append(read)
    first = pending.take(1000)
    assert isinstance(first, memoryview) and first.obj is read
    assert bytes(first) + bytes(pending.take(5000)) == read
