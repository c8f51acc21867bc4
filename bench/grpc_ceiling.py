"""What the element protocol itself costs on this machine: grpc.aio alone, no proxy, no sockets
to forward, an element that answers PASS at once.

    python bench/grpc_ceiling.py

Why: an inline element puts gRPC round trips on every chunk's path, so these figures bound what
any set-up with an element can reach, whatever the proxy does. It prints

- round trip: one event, one verdict, one at a time (p50/p90): the floor under each element
  hop of a request/response exchange (GET at 1 client crosses the element twice);
- bulk: 64 KiB events one way, verdicts back, a few messages in flight: Gb/s (1 MiB
  messages, 16 events, are what the proxy's writer sends at most: BATCH_BYTES);
- small events: 30-byte events in batches of 1, 6, 12 and 25: events per second.

Requests are encoded as the proxy encodes them (proxy/sessions/wire.py). The server is a child process
on 127.0.0.1 stopped by PID; every run is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import elements  # noqa: E402,F401  (gRPC's defaults, set before grpc loads)
import grpc  # noqa: E402
from elements.api import element_pb2 as pb  # noqa: E402
from elements.api import element_pb2_grpc as pb_grpc  # noqa: E402
from proxy.sessions.wire import data_event, open_session, session_request  # noqa: E402
from tests.procs import free_port, stop_popen  # noqa: E402

OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
SECONDS = 3.0
ROUND_TRIPS = 3000
WARM_UP = 500


class Answering(pb_grpc.ElementServicer):
    """PASS for every event, one response per request message."""

    async def Session(self, requests, context):  # noqa: N802
        async for request in requests:
            response = pb.SessionResponse()
            for event in request.events:
                response.verdicts.add(connection_id=event.data.connection_id, sequence=event.data.sequence,
                                      action=pb.ACTION_PASS)
            await context.write(response)


async def serve(port: int) -> None:
    server = grpc.aio.server(options=OPTIONS)
    pb_grpc.add_ElementServicer_to_server(Answering(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def batch(first_seq: int, count: int, data: bytes) -> bytes:
    """Encoded as the proxy encodes its batches (proxy/sessions/wire.py)."""
    return session_request([data_event("c", first_seq + i, pb.DIRECTION_REQUEST, data, False, None)
                            for i in range(count)])


async def round_trips(channel: grpc.aio.Channel) -> str:
    call = open_session(channel)
    took = []
    for seq in range(ROUND_TRIPS):
        start = time.perf_counter()
        await call.write(batch(seq, 1, b"x" * 30))
        await call.read()
        took.append(time.perf_counter() - start)
    call.cancel()
    took = sorted(took[WARM_UP:])
    return (f"round trip, one event at a time: p50 {statistics.median(took) * 1e6:.0f} us, "
            f"p90 {took[int(len(took) * 0.9)] * 1e6:.0f} us")


async def stream(channel: grpc.aio.Channel, per_message: int, in_flight: int, data: bytes) -> float:
    """Events answered per second with `in_flight` messages of `per_message` events outstanding."""
    call = open_session(channel)
    window = asyncio.Semaphore(in_flight)
    answered = 0

    async def read() -> None:
        nonlocal answered
        while (response := await call.read()) is not grpc.aio.EOF:
            answered += len(response.verdicts)
            window.release()

    reader = asyncio.create_task(read())
    start, seq = time.perf_counter(), 0
    while time.perf_counter() - start < SECONDS:
        await window.acquire()
        await call.write(batch(seq, per_message, data))
        seq += per_message
    rate = answered / (time.perf_counter() - start)
    call.cancel()
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    return rate


async def measure(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as channel:
        await channel.channel_ready()
        print(await round_trips(channel), flush=True)
        for per_message, in_flight in ((1, 8), (4, 8), (16, 4)):
            rate = await stream(channel, per_message, in_flight, b"x" * 65536)
            print(f"bulk, {per_message} x 64 KiB per message, {in_flight} in flight: "
                  f"{rate * 65536 * 8 / 1e9:.2f} Gb/s", flush=True)
        for per_message in (1, 6, 12, 25):
            rate = await stream(channel, per_message, 2, b"x" * 30)
            print(f"small events, {per_message} per message, 2 in flight: {rate:,.0f} events/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        uvloop.run(serve(args.serve))
        return
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
    try:
        uvloop.run(asyncio.wait_for(measure(port), 120))
    finally:
        stop_popen(server)


if __name__ == "__main__":
    main()
