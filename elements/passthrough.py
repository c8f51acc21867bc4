"""passthrough: an inline element that passes every chunk of both directions unchanged.

    python -m elements.passthrough --port 50051

The smallest element there is: a template for new ones, and the baseline that
tests and benchmarks use to measure what one inline element costs the proxy.
`--read-only` says it only judges (Description.read_only), so the proxy may ask it
together with its read-only neighbours: the bench's `ro3` against `pass3`.
"""

from __future__ import annotations

import argparse
from typing import Self

from elements.sdk import Chunk, Connection, Element, Verdict, run


class Passthrough(Element):
    """Inline, both directions, no Open events; every chunk gets ACTION_PASS."""

    name = "passthrough"

    def __init__(self, read_only: bool = False) -> None:
        self.read_only = read_only

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--read-only", action="store_true",
                            help="describe itself read_only: asked at once with its read-only neighbours")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        return cls(args.read_only)

    def on_data(self, conn: Connection, chunk: Chunk) -> Verdict | None:
        return None


if __name__ == "__main__":
    run(Passthrough)
