"""recorder: passes every chunk unchanged and logs every event it gets, so a test can tell from
the replicas' logs which one saw which connection.

    python -m tests.elements_for_tests.recorder --host 127.0.0.2 --port P [--reset-resumed]

Inline, both directions, wants Open. One line per event on stdout:

    event open <cid> resumed=<0|1>
    event data <cid> <seq> <request|response> <len>
    event close <cid> <REASON>

With --reset-resumed a resumed Open (a connection this replica did not see start) is reset,
as the firewall does by default; without it such connections are kept.
"""

from __future__ import annotations

import argparse
from typing import Self

from elements.sdk import Chunk, CloseReason, Connection, Element, Reset, Verdict, run


class Recorder(Element):
    name = "recorder"
    wants_open = True

    def __init__(self, reset_resumed: bool) -> None:
        self.reset_resumed = reset_resumed

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--reset-resumed", action="store_true", help="reset connections announced as resumed")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        return cls(args.reset_resumed)

    def on_open(self, conn: Connection) -> Verdict | None:
        print(f"event open {conn.id} resumed={int(conn.resumed)}", flush=True)
        return Reset() if conn.resumed and self.reset_resumed else None

    def on_data(self, conn: Connection, chunk: Chunk) -> Verdict | None:
        print(f"event data {conn.id} {chunk.sequence} {chunk.direction.name.lower()} {len(chunk.data)}", flush=True)
        return None

    def on_close(self, conn: Connection, reason: CloseReason, request_bytes: int, response_bytes: int) -> None:
        print(f"event close {conn.id} {reason.name}", flush=True)


if __name__ == "__main__":
    run(Recorder)
