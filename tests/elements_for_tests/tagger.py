"""tagger: appends `<TAG>` to every chunk it passes, so a test can read the path bytes took.

    python -m tests.elements_for_tests.tagger --port P --tag 1
"""

from __future__ import annotations

import argparse
from typing import Self

from elements.sdk import Chunk, Connection, Element, Pass, Verdict, run


class Tagger(Element):
    name = "tagger"

    def __init__(self, tag: bytes) -> None:
        self.tag = tag

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--tag", required=True, help="text appended to every non-empty chunk")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        return cls(f"<{args.tag}>".encode())

    def on_data(self, conn: Connection, chunk: Chunk) -> Verdict | None:
        return Pass(chunk.data + self.tag) if chunk.data else None


if __name__ == "__main__":
    run(Tagger)
