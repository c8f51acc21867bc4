"""lines: a framed element for tests; requests are lines, and a line with --remove in it is removed.

    python -m tests.elements_for_tests.lines --port P [--remove TEXT] [--reply TEXT]

It holds partial lines at the proxy (HOLD) and rewrites what it removes in one replacement,
so a test sees the SDK's framing and the proxy's HOLD together; `--reply` answers each
removed line to the client.
"""

from __future__ import annotations

import argparse
from typing import Self

from elements.sdk import Connection, Direction, Drop, Element, Lines, Message, Verdict, run


class LineFilter(Element):
    name = "lines"
    directions = (Direction.REQUEST,)
    framing = {Direction.REQUEST: Lines}

    def __init__(self, remove: bytes, reply: bytes | None) -> None:
        self.remove = remove
        self.reply = reply

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--remove", type=str.encode, default=b"secret")
        parser.add_argument("--reply", type=str.encode, default=None)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        return cls(args.remove, args.reply)

    def on_message(self, conn: Connection, message: Message[None]) -> Verdict | None:
        return Drop(reply=self.reply) if self.remove in message.data else None


if __name__ == "__main__":
    run(LineFilter)
