"""passthrough: an inline element that passes every chunk of both directions unchanged.

    python -m elements.passthrough --port 50051

The smallest element there is: a template for new ones, and the baseline that
tests and benchmarks use to measure what one inline element costs the proxy.
"""

from __future__ import annotations

from elements.sdk import Chunk, Connection, Element, Verdict, run


class Passthrough(Element):
    """Inline, both directions, no Open events; every chunk gets ACTION_PASS."""

    name = "passthrough"

    def on_data(self, conn: Connection, chunk: Chunk) -> Verdict | None:
        return None


if __name__ == "__main__":
    run(Passthrough)
