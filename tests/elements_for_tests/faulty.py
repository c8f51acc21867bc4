"""faulty: an element written against the raw gRPC servicer, so it can misbehave in ways the SDK never would.

    python -m tests.elements_for_tests.faulty --port P [--tag T] [--delay S] [--control FILE] [--open-delay S]
    python -m tests.elements_for_tests.faulty --port P --observe-stall S

With --observe-stall it is instead an observe-mode tap that sleeps S seconds after every
message it reads, so gRPC flow control stops the proxy's writes and the proxy's queue for
it fills up (nothing else about it applies then).

Inline, request direction only; Open events only with --open-delay (each answered PASS after
that many seconds). A chunk is answered PASS with `<T>`
appended (so a test can tell processed bytes from bytes that passed unprocessed),
after sleeping the current delay: `--delay`, or the number in `--control FILE` when
that file exists (re-read for every chunk). While the delay is above zero the
grpc.health.v1 status (service "") is NOT_SERVING, else SERVING, so a test can make
the element slow and sick, then fast and healthy, without restarting it.

A chunk that starts with a command is answered badly instead:

    !unknown      the right verdict, preceded by verdicts for an unknown connection and an
                  unknown sequence, and followed by a duplicate RESET for the same sequence
    !huge N       PASS replacing the chunk with N bytes
    !action N     a verdict whose action is the raw enum value N (0, 99, ...)
    !hold         never answered
    !hangup       ends the Session (status OK) right after answering the events before it in its batch
    !abort        ends the Session with status INTERNAL, same way
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from elements.api import element_pb2 as pb
from elements.api import element_pb2_grpc as pb_grpc

log = logging.getLogger("faulty")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class Knobs:
    def __init__(self, tag: bytes, delay: float, control: Path | None, open_delay: float = -1.0,
                 observe_stall: float = 0.0) -> None:
        self.tag = tag
        self.open_delay = open_delay
        self.observe_stall = observe_stall
        self._delay = delay
        self.control = control

    def delay(self) -> float:
        if self.control is not None:
            try:
                return float(self.control.read_text().strip() or 0)
            except (FileNotFoundError, ValueError):
                return self._delay
        return self._delay


class Health(health_pb2_grpc.HealthServicer):
    def __init__(self, knobs: Knobs) -> None:
        self.knobs = knobs

    async def Check(self, request, context):
        serving = self.knobs.delay() <= 0
        log.info("health check: %s", "SERVING" if serving else "NOT_SERVING")
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING)


class End(Exception):
    """Raised inside a batch to end the session: `abort` says how."""

    def __init__(self, abort: bool) -> None:
        self.abort = abort


class Faulty(pb_grpc.ElementServicer):
    def __init__(self, knobs: Knobs) -> None:
        self.knobs = knobs

    async def Describe(self, request, context):
        if self.knobs.observe_stall:
            return pb.Description(name="stalling-tap", directions=[pb.DIRECTION_REQUEST, pb.DIRECTION_RESPONSE],
                                  mode=pb.MODE_OBSERVE)
        return pb.Description(name="faulty", directions=[pb.DIRECTION_REQUEST], mode=pb.MODE_INLINE,
                              wants_open=self.knobs.open_delay >= 0)

    async def Session(self, request_iterator, context):
        if self.knobs.observe_stall:
            async for _ in request_iterator:
                await asyncio.sleep(self.knobs.observe_stall)
            return
        outbox: asyncio.Queue[pb.SessionResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def writer() -> None:
            while (response := await outbox.get()) is not None:
                await context.write(response)

        async def slow(verdict: pb.Verdict, delay: float) -> None:
            await asyncio.sleep(delay)
            outbox.put_nowait(pb.SessionResponse(verdicts=[verdict]))

        writing = asyncio.create_task(writer())
        ending: End | None = None
        try:
            async for request in request_iterator:
                now: list[pb.Verdict] = []
                try:
                    for event in request.events:
                        if event.WhichOneof("event") == "open":
                            verdicts = [pb.Verdict(connection_id=event.open.connection_id, sequence=0,
                                                   action=pb.ACTION_PASS)]
                            delay = self.knobs.open_delay
                        elif event.WhichOneof("event") == "data":
                            verdicts, delay = self.judge(event.data)
                        else:
                            continue
                        if delay > 0:
                            for verdict in verdicts:
                                task = asyncio.create_task(slow(verdict, delay))
                                tasks.add(task)
                                task.add_done_callback(tasks.discard)
                        else:
                            now += verdicts
                except End as end:
                    ending = end
                if now:
                    outbox.put_nowait(pb.SessionResponse(verdicts=now))
                if ending is not None:
                    break
            outbox.put_nowait(None)
            await writing
            if ending is not None:
                log.info("ending the session on purpose (%s)", "abort" if ending.abort else "hangup")
                if ending.abort:
                    await context.abort(grpc.StatusCode.INTERNAL, "faulty: abort on purpose")
        finally:
            writing.cancel()
            for task in tasks:
                task.cancel()

    def judge(self, data: pb.DataEvent) -> tuple[list[pb.Verdict], float]:
        cid, seq, chunk = data.connection_id, data.sequence, data.data
        if chunk.startswith(b"!unknown"):
            return [pb.Verdict(connection_id="no-such-connection", sequence=seq, action=pb.ACTION_RESET),
                    pb.Verdict(connection_id=cid, sequence=seq + 1_000_000, action=pb.ACTION_RESET),
                    pb.Verdict(connection_id=cid, sequence=seq, action=pb.ACTION_PASS, data=chunk + self.knobs.tag),
                    pb.Verdict(connection_id=cid, sequence=seq, action=pb.ACTION_RESET)], 0
        if chunk.startswith(b"!huge "):
            return [pb.Verdict(connection_id=cid, sequence=seq, action=pb.ACTION_PASS,
                               data=b"H" * int(chunk.split()[1]))], 0
        if chunk.startswith(b"!action "):
            return [pb.Verdict(connection_id=cid, sequence=seq, action=int(chunk.split()[1]))], 0
        if chunk.startswith(b"!hold"):
            return [], 0
        if chunk.startswith(b"!hangup"):
            raise End(abort=False)
        if chunk.startswith(b"!abort"):
            raise End(abort=True)
        verdict = pb.Verdict(connection_id=cid, sequence=seq, action=pb.ACTION_PASS)
        if chunk:
            verdict.data = chunk + self.knobs.tag
        return [verdict], self.knobs.delay()


async def serve(port: int, knobs: Knobs) -> None:
    server = grpc.aio.server(options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    pb_grpc.add_ElementServicer_to_server(Faulty(knobs), server)
    health_pb2_grpc.add_HealthServicer_to_server(Health(knobs), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    log.info("faulty serving on 127.0.0.1:%d", port)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tag", default="f")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to sleep before answering a chunk")
    parser.add_argument("--control", type=Path, help="file holding the delay; overrides --delay while it exists")
    parser.add_argument("--open-delay", type=float, default=-1.0, help="want Open events, answer them after S s")
    parser.add_argument("--observe-stall", type=float, default=0.0, help="be an observe-mode tap that sleeps S s "
                                                                          "after every message")
    args = parser.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args.port, Knobs(f"<{args.tag}>".encode(), args.delay, args.control, args.open_delay,
                                       args.observe_stall)))


if __name__ == "__main__":
    main()
