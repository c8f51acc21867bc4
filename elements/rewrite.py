"""rewrite: replaces bytes in one direction, also when a match is split across chunks.

    python -m elements.rewrite --port 50053 --direction request --from 'Host: a' --to 'Host: b'

`--from A --to B` (UTF-8 text) may repeat: the nth `--from` goes with the nth `--to`.
All pairs are applied in one left-to-right pass (at one position the longest `--from`
wins), so a single pair gives exactly `stream.replace(A, B)` over the whole stream,
however TCP split it. `--direction` is request (default) or response.

When a chunk ends with bytes that could begin a match (a proper prefix of a `--from`),
those bytes are held back: the chunk passes without them (possibly empty) and they
are prepended to the next chunk of that direction. So held-back bytes wait for the
next chunk; at end of stream everything is flushed. A protocol whose sender waits for
an answer after a held-back tail stalls until the next chunk: choose `--from`
patterns that do not end messages, or accept that.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from typing import Self

from elements.sdk import Chunk, Connection, Direction, Element, Pass, Verdict, run


class Rewriter:
    """The replacement, chunk by chunk, with no I/O, so it can be tested on its own."""

    def __init__(self, pairs: Mapping[bytes, bytes]) -> None:
        if not pairs or b"" in pairs:
            raise ValueError("--from: needs at least one non-empty pattern")
        self.table = dict(pairs)
        self.regex = re.compile(b"|".join(re.escape(p) for p in sorted(self.table, key=len, reverse=True)))
        self.prefixes = frozenset(p[:k] for p in self.table for k in range(1, len(p)))
        self.longest = max(map(len, self.table))

    def feed(self, held: bytes, data: bytes, final: bool) -> tuple[bytes, bytes]:
        """Rewrites `held + data`; returns (bytes to send, bytes to hold for the next chunk).

        Matches are final only when they start before the first position from
        which the rest could still grow into a match; from there on, bytes wait.
        """
        buf = held + data if held else data
        partial = [] if final else [i for i in range(max(0, len(buf) - self.longest + 1), len(buf))
                                    if buf[i:] in self.prefixes]
        out: list[bytes] = []
        pos = 0
        for match in self.regex.finditer(buf):
            if match.start() >= _first_at_or_after(partial, pos, len(buf)):
                break
            out += (buf[pos:match.start()], self.table[match.group()])
            pos = match.end()
        hold = _first_at_or_after(partial, pos, len(buf))
        out.append(buf[pos:hold])
        return b"".join(out), buf[hold:]


def _first_at_or_after(positions: list[int], start: int, default: int) -> int:
    return next((i for i in positions if i >= start), default)


class Rewrite(Element):
    """Inline, one direction: rewrites bytes, holding back possible match beginnings."""

    name = "rewrite"

    def __init__(self, pairs: Mapping[bytes, bytes], direction: Direction = Direction.REQUEST) -> None:
        self.rewriter = Rewriter(pairs)
        self.direction = direction
        self.directions = (direction,)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--from", dest="sources", type=str.encode, action="append", default=[], required=True,
                            metavar="TEXT", help="text to replace (repeatable, pairs with --to in order)")
        parser.add_argument("--to", dest="targets", type=str.encode, action="append", default=[], required=True,
                            metavar="TEXT", help="replacement text (repeatable)")
        parser.add_argument("--direction", choices=["request", "response"], default="request")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        if len(args.sources) != len(args.targets):
            raise ValueError(f"--from given {len(args.sources)} times but --to {len(args.targets)} times; "
                             f"they pair up in order")
        if len(set(args.sources)) != len(args.sources):
            raise ValueError(f"--from {args.sources!r}: each pattern may appear once")
        return cls(dict(zip(args.sources, args.targets)), Direction[args.direction.upper()])

    def on_data(self, conn: Connection, chunk: Chunk) -> Verdict | None:
        if chunk.direction != self.direction:
            return None
        out, conn.state["held"] = self.rewriter.feed(conn.state.get("held", b""), chunk.data, chunk.end_of_stream)
        return None if out is chunk.data else Pass(out)


if __name__ == "__main__":
    run(Rewrite)
