"""A small real gRPC client for element tests: event builders and one Session exchange."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

import grpc

from elements.api import element_pb2 as pb
from elements.api import element_pb2_grpc as pb_grpc

REQUEST, RESPONSE = pb.DIRECTION_REQUEST, pb.DIRECTION_RESPONSE


def open_event(cid: str, ip: str = "192.0.2.1", port: int = 80) -> pb.Event:
    return pb.Event(open=pb.OpenEvent(connection_id=cid, client=pb.Address(ip="198.51.100.7", port=40000),
                                      original_destination=pb.Address(ip=ip, port=port),
                                      listener=pb.Address(ip="127.0.0.1", port=15001)))


def data_event(cid: str, seq: int, data: bytes, direction: int = REQUEST, eos: bool = False) -> pb.Event:
    return pb.Event(data=pb.DataEvent(connection_id=cid, sequence=seq, direction=direction, data=data,
                                      end_of_stream=eos))


def close_event(cid: str, request_bytes: int = 0, response_bytes: int = 0) -> pb.Event:
    return pb.Event(close=pb.CloseEvent(connection_id=cid, reason=pb.CLOSE_REASON_COMPLETED,
                                        request_bytes=request_bytes, response_bytes=response_bytes))


class Arrival:
    """One SessionResponse and when it arrived, in seconds after the first batch was written."""

    def __init__(self, at: float, response: pb.SessionResponse) -> None:
        self.at = at
        self.response = response


async def exchange_async(port: int, batches: Iterable[Iterable[pb.Event]],
                         on_arrival: Callable[[Arrival], None] | None = None,
                         metadata: tuple[tuple[str, str], ...] | None = None) -> list[Arrival]:
    """Writes every batch on one Session (opened with `metadata`), half-closes, and reads until the
    element ends the stream."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = pb_grpc.ElementStub(channel).Session(metadata=metadata)
        start = time.monotonic()
        for batch in batches:
            await call.write(pb.SessionRequest(events=list(batch)))
        await call.done_writing()
        arrivals = []
        async for response in call:
            arrivals.append(Arrival(time.monotonic() - start, response))
            if on_arrival:
                on_arrival(arrivals[-1])
        assert await call.code() == grpc.StatusCode.OK
        return arrivals


def exchange(port: int, *batches: Iterable[pb.Event]) -> list[Arrival]:
    return asyncio.run(exchange_async(port, batches))


def verdicts(arrivals: list[Arrival]) -> list[pb.Verdict]:
    return [verdict for arrival in arrivals for verdict in arrival.response.verdicts]


def by_key(arrivals: list[Arrival]) -> dict[tuple[str, int], pb.Verdict]:
    return {(v.connection_id, v.sequence): v for v in verdicts(arrivals)}
