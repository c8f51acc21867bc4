"""probe: an element whose chunks tell it what to do, so tests can script the SDK's edge cases.

    python -m tests.elements_for_tests.probe --port P [--sync] [--observe]

A chunk `sleep <seconds>` sleeps that long (async hooks only), `boom` raises,
anything else passes upper-cased with metadata `seen=<sequence>`. An Open to port
666 is reset. Each close is logged as `closed <id> <reason> <request_bytes> <response_bytes>`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Self

from elements.sdk import Chunk, CloseReason, Connection, Element, Mode, Pass, Reset, Verdict, run

log = logging.getLogger("probe")


def judge(conn: Connection, chunk: Chunk) -> Verdict:
    if chunk.data == b"boom":
        raise RuntimeError(f"boom on {conn.id}")
    return Pass(chunk.data.upper(), metadata={"seen": str(chunk.sequence)})


class Probe(Element):
    """Async on_data; the subclass below is the same with a plain function."""

    name = "probe"
    wants_open = True
    request_bytes_limit = 100
    response_bytes_limit = 200

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--sync", action="store_true", help="use plain-function hooks")
        parser.add_argument("--observe", action="store_true", help="run in observe mode")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        element = SyncProbe() if args.sync else cls()
        if args.observe:
            element.mode = Mode.OBSERVE
        return element

    def on_open(self, conn: Connection) -> Verdict | None:
        return Reset() if conn.original_destination.port == 666 else None

    async def on_data(self, conn: Connection, chunk: Chunk) -> Verdict | None:
        if chunk.data.startswith(b"sleep "):
            await asyncio.sleep(float(chunk.data[6:]))
        return judge(conn, chunk)

    def on_close(self, conn: Connection, reason: CloseReason, request_bytes: int, response_bytes: int) -> None:
        log.info("closed %s %s %d %d", conn.id, reason.name, request_bytes, response_bytes)


class SyncProbe(Probe):
    """The same probe with a plain-function on_data (inline, no task per event)."""

    def on_data(self, conn: Connection, chunk: Chunk) -> Verdict | None:  # type: ignore[override]
        return judge(conn, chunk)


if __name__ == "__main__":
    run(Probe)
