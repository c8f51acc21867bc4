"""The `Process` RPC, for grpcurl: a request becomes the events of one throw-away connection,
the element's verdicts become the response. No I/O here: `sdk.process` feeds the events to a
Dispatcher, as a Session would.

Two forms (proto `ProcessRequest`): `chunks`, a stream whose chunks are numbered 1, 2, ...
and get a result each; or the older single chunk, `data`/`text`. A left-out direction is
DIRECTION_REQUEST in both, so a hand-typed request never trips over DIRECTION_UNSPECIFIED.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from elements.api import element_pb2 as pb

CONNECTION_ID = "process"
# The reason the Close event gives after the first verdict that would end a proxied connection.
_ENDING = {pb.ACTION_CLOSE: pb.CLOSE_REASON_CLOSED_BY_ELEMENT, pb.ACTION_RESET: pb.CLOSE_REASON_RESET_BY_ELEMENT}
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


class BadProcessRequest(ValueError):
    """A request no connection could produce; the message says which field and why."""


def open_event(request: pb.ProcessRequest) -> pb.OpenEvent:
    """The connection's Open event: `request.open`, its id filled in when unset."""
    event = pb.OpenEvent()
    event.CopyFrom(request.open)
    event.connection_id = event.connection_id or request.data.connection_id or CONNECTION_ID
    return event


def data_events(request: pb.ProcessRequest, connection_id: str) -> list[pb.DataEvent]:
    """The chunks as Data events, in order; raises BadProcessRequest for an impossible stream."""
    if not request.chunks:
        return [_single(request, connection_id)]
    if request.HasField("data") or request.text:
        raise BadProcessRequest("give either `chunks` or `data`/`text`, not both")
    events: list[pb.DataEvent] = []
    ended: dict[int, int] = {}  # direction -> the chunk that ended it
    for number, chunk in enumerate(request.chunks, 1):
        direction = chunk.direction or pb.DIRECTION_REQUEST
        if direction in ended:
            raise BadProcessRequest(f"chunks[{number - 1}]: its direction {pb.Direction.Name(direction)} ended "
                                    f"with end_of_stream on chunks[{ended[direction] - 1}]")
        if chunk.end_of_stream:
            ended[direction] = number
        data = chunk.data if chunk.WhichOneof("bytes_given") == "data" else chunk.text.encode()
        events.append(pb.DataEvent(connection_id=connection_id, sequence=number, direction=direction, data=data,
                                   end_of_stream=chunk.end_of_stream, metadata=chunk.metadata))
    return events


def _single(request: pb.ProcessRequest, connection_id: str) -> pb.DataEvent:
    event = pb.DataEvent()
    event.CopyFrom(request.data)
    event.connection_id = connection_id
    event.sequence = event.sequence or 1
    event.direction = event.direction or pb.DIRECTION_REQUEST
    if not event.data:
        event.data = request.text.encode()
    return event


def close_event(connection_id: str, chunks: Sequence[pb.DataEvent], verdicts: Iterable[pb.Verdict]) -> pb.CloseEvent:
    """The Close event a proxy would send after these verdicts: the reason of the first one that
    ends the connection (or COMPLETED), the bytes that passed each way."""
    by_sequence = {verdict.sequence: verdict for verdict in verdicts}
    reason = next((_ENDING[v.action] for _, v in sorted(by_sequence.items()) if v.action in _ENDING),
                  pb.CLOSE_REASON_COMPLETED)
    passed = {pb.DIRECTION_REQUEST: 0, pb.DIRECTION_RESPONSE: 0}
    for chunk in chunks:
        if chunk.direction in passed:
            passed[chunk.direction] += len(_passed(chunk, by_sequence.get(chunk.sequence)))
    return pb.CloseEvent(connection_id=connection_id, reason=reason, request_bytes=passed[pb.DIRECTION_REQUEST],
                         response_bytes=passed[pb.DIRECTION_RESPONSE])


def response(request: pb.ProcessRequest, chunks: Sequence[pb.DataEvent],
             verdicts: Iterable[pb.Verdict]) -> pb.ProcessResponse:
    """The verdicts in the request's form: `chunks` results, or `verdict` and `text`."""
    by_sequence = {verdict.sequence: verdict for verdict in verdicts}
    answer = pb.ProcessResponse()
    if 0 in by_sequence:
        answer.open_verdict.CopyFrom(by_sequence[0])
    if not request.chunks:
        (chunk,) = chunks
        verdict = by_sequence.get(chunk.sequence)
        if verdict is not None:
            answer.verdict.CopyFrom(verdict)
        answer.text = render(_passed(chunk, verdict))
        return answer
    for chunk in chunks:
        verdict = by_sequence.get(chunk.sequence)
        data = _passed(chunk, verdict)
        answer.chunks.add(verdict=verdict, data=data, text=render(data))
    return answer


def _passed(chunk: pb.DataEvent, verdict: pb.Verdict | None) -> bytes:
    """The bytes a PASS lets on: its replacement, or the chunk unchanged; nothing otherwise."""
    if verdict is None or verdict.action != pb.ACTION_PASS:
        return b""
    return verdict.data if verdict.HasField("data") else chunk.data


def render(data: bytes) -> str:
    """Bytes as text with one way back (the rule in the proto's ProcessResult.text): printable
    characters of valid UTF-8 as they are, a backslash doubled, \\t \\n \\r, any other byte \\xHH."""
    out = []
    for char in data.decode("utf-8", errors="surrogateescape"):
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif char.isprintable():  # a byte that is not UTF-8 decodes to a surrogate, never printable
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode("utf-8", errors="surrogateescape"))
    return "".join(out)
