"""rogue: an element written against the raw generated gRPC classes, so it can break the contract
on purpose (issue 12: bad Describes, oversized and bogus verdicts, stalls, restarts).

    python -m tests.elements_for_tests.rogue --port P [--describe JSON] [--behaviour B] [options]

`--describe` is the Description as proto JSON, parsed strictly (an unknown field is an error),
integer enum values allowed: '{"name": "rogue", "directions": [99]}', '{"mode": 77}'.
Default '{"name": "rogue"}'. Open events are answered PASS when the description wants them.

    pass        PASS every Open and Data event (the default)
    bigmeta     PASS, but the Data event whose bytes contain --bigmeta-marker gets one
                metadata value of 10,000,000 bytes
    manymeta    the same with 10,000 metadata entries instead
    unknown-id  every Data verdict is followed by a PASS for a connection nobody has
    wrong-seq   every Data verdict echoes the event's sequence + 1000
    duplicate   every verdict is sent twice, in the same message
    mixed       --percent of the Data events (every (100/percent)th this process receives)
                are answered with action 77, the rest PASS
    replace     PASS, but the Data event whose bytes contain --bigmeta-marker gets its bytes
                replaced by the same number of "X" (with '{"read_only": true}': a broken promise)
    stall       after --stall-after Data events, answers nothing for --stall-seconds, then
                sends everything it held in one message (once per process)
    hold-all    HOLD every Data event, end_of_stream ones too (which no later chunk could decide)

Every event received is logged to stdout, one line each, flushed after every message:

    session start | session end
    event open <cid> resumed=<0|1> req=<n> resp=<n>
    event data <cid> <seq> <request|response|N> <len> eos=<0|1>
    event close <cid> <reason>

It serves grpc.health.v1 (SERVING) and binds without SO_REUSEPORT, so a restart on the same
port fails loudly while an old process still holds it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
from collections.abc import AsyncIterator

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from elements.api import element_pb2 as pb
from elements.api import element_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
BIG_VALUE_BYTES = 10_000_000
MANY_ENTRIES = 10_000
BAD_ACTION = 77
SEQUENCE_OFFSET = 1000
BEHAVIOURS = ("pass", "bigmeta", "manymeta", "unknown-id", "wrong-seq", "duplicate", "mixed", "stall", "hold-all",
              "replace")
DIRECTIONS = {pb.DIRECTION_REQUEST: "request", pb.DIRECTION_RESPONSE: "response"}


def reason_name(reason: int) -> str:
    try:
        return pb.CloseReason.Name(reason).removeprefix("CLOSE_REASON_").lower()
    except ValueError:
        return str(reason)


def describe_open(event: pb.OpenEvent) -> str:
    # resumed / request_bytes / response_bytes are issue 12's additions to OpenEvent: read them
    # leniently, so the rogue also runs against a proto without them (it then reports 0)
    return (f"event open {event.connection_id} resumed={int(getattr(event, 'resumed', False))} "
            f"req={getattr(event, 'request_bytes', 0)} resp={getattr(event, 'response_bytes', 0)}")


def describe_data(event: pb.DataEvent) -> str:
    return (f"event data {event.connection_id} {event.sequence} {DIRECTIONS.get(event.direction, event.direction)} "
            f"{len(event.data)} eos={int(event.end_of_stream)}")


class Rogue(pb_grpc.ElementServicer):
    """Answers per `behaviour`; counters are per process, so every Session shares them."""

    def __init__(self, description: pb.Description, behaviour: str, marker: bytes, percent: float,
                 stall_after: int, stall_seconds: float) -> None:
        self.description = description
        self.behaviour = behaviour
        self.marker = marker
        self.every = max(1, round(100 / percent)) if percent > 0 else 0
        self.stall_after = stall_after
        self.stall_seconds = stall_seconds
        self.data_events = 0
        self.stall = "before"  # before | on | over: one stall per process
        self.nobody = itertools.count(1)

    async def Describe(self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext) -> pb.Description:
        return self.description

    async def Process(self, request: pb.ProcessRequest, context: grpc.aio.ServicerContext) -> pb.ProcessResponse:
        data = request.data.data or request.text.encode()
        return pb.ProcessResponse(verdict=pb.Verdict(connection_id="process", sequence=1, action=pb.ACTION_PASS),
                                  text=data.decode(errors="replace"))

    async def Session(self, request_iterator: AsyncIterator[pb.SessionRequest],
                      context: grpc.aio.ServicerContext) -> None:
        outbox: asyncio.Queue[list[pb.Verdict] | None] = asyncio.Queue()
        held: list[pb.Verdict] = []
        releasing: list[asyncio.Task[None]] = []

        async def write() -> None:
            while (verdicts := await outbox.get()) is not None:
                await context.write(pb.SessionResponse(verdicts=verdicts))

        async def release_after_stall() -> None:
            await asyncio.sleep(self.stall_seconds)
            self.stall = "over"
            emit(f"stall over: sending {len(held)} held verdicts")
            outbox.put_nowait(list(held))
            held.clear()

        writing = asyncio.create_task(write())
        emit("session start")
        try:
            async for request in request_iterator:
                lines, verdicts = [], []
                for event in request.events:
                    kind = event.WhichOneof("event")
                    if kind == "open":
                        lines.append(describe_open(event.open))
                        if self.description.wants_open and self.description.mode != pb.MODE_OBSERVE:
                            verdicts += self.answer(pb.Verdict(connection_id=event.open.connection_id, sequence=0,
                                                               action=pb.ACTION_PASS))
                    elif kind == "data":
                        lines.append(describe_data(event.data))
                        if self.description.mode != pb.MODE_OBSERVE:
                            verdicts += self.judge(event.data)
                    elif kind == "close":
                        lines.append(f"event close {event.close.connection_id} {reason_name(event.close.reason)}")
                if lines:
                    emit("\n".join(lines))
                if self.behaviour == "stall" and self.stalling():
                    if not releasing:
                        emit(f"stalling for {self.stall_seconds} s")
                        releasing.append(asyncio.create_task(release_after_stall()))
                    held += verdicts
                    verdicts = []
                if verdicts:
                    outbox.put_nowait(verdicts)
            outbox.put_nowait(None)
            await writing
        finally:
            emit("session end")
            writing.cancel()
            for task in releasing:
                task.cancel()

    def stalling(self) -> bool:
        """True from the Data event past --stall-after until the held verdicts are released."""
        if self.stall == "before" and self.data_events > self.stall_after:
            self.stall = "on"
        return self.stall == "on"

    def answer(self, verdict: pb.Verdict) -> list[pb.Verdict]:
        return [verdict, verdict] if self.behaviour == "duplicate" else [verdict]

    def judge(self, event: pb.DataEvent) -> list[pb.Verdict]:
        self.data_events += 1
        verdict = pb.Verdict(connection_id=event.connection_id, sequence=event.sequence, action=pb.ACTION_PASS)
        behaviour = self.behaviour
        if behaviour == "bigmeta" and self.marker in event.data:
            verdict.metadata["big"] = "x" * BIG_VALUE_BYTES
        elif behaviour == "replace" and self.marker in event.data:
            verdict.data = b"X" * len(event.data)
        elif behaviour == "manymeta" and self.marker in event.data:
            verdict.metadata.update({f"m{i:05d}": "v" for i in range(MANY_ENTRIES)})
        elif behaviour == "wrong-seq":
            verdict.sequence = event.sequence + SEQUENCE_OFFSET
        elif behaviour == "mixed" and self.every and self.data_events % self.every == 0:
            verdict.action = BAD_ACTION  # type: ignore[assignment]
        elif behaviour == "hold-all":
            verdict.action = pb.ACTION_HOLD
        elif behaviour == "unknown-id":
            return [verdict, pb.Verdict(connection_id=f"rogue-nobody-{next(self.nobody)}", sequence=event.sequence,
                                        action=pb.ACTION_PASS)]
        return self.answer(verdict)


def emit(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def serve(port: int, rogue: Rogue) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    pb_grpc.add_ElementServicer_to_server(rogue, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    emit(f"rogue ({rogue.behaviour}) serving on 127.0.0.1:{port}")
    await server.wait_for_termination()  # until a signal ends the process: nothing to drain here


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--describe", default='{"name": "rogue"}', help="the Description, as proto JSON")
    parser.add_argument("--behaviour", choices=BEHAVIOURS, default="pass")
    parser.add_argument("--bigmeta-marker", default="BIGMETA", help="bytes that mark the chunk bigmeta/manymeta "
                                                                    "answers badly")
    parser.add_argument("--percent", type=float, default=20.0, help="mixed: share of Data events answered badly")
    parser.add_argument("--stall-after", type=int, default=0, help="stall: Data events answered before the stall")
    parser.add_argument("--stall-seconds", type=float, default=5.0, help="stall: how long nothing is answered")
    args = parser.parse_args()
    try:
        description = json_format.Parse(args.describe, pb.Description(), ignore_unknown_fields=False)
    except json_format.ParseError as error:
        parser.error(f"--describe {args.describe!r}: {error}")
    rogue = Rogue(description, args.behaviour, args.bigmeta_marker.encode(), args.percent, args.stall_after,
                  args.stall_seconds)
    asyncio.run(serve(args.port, rogue))


if __name__ == "__main__":
    main()
