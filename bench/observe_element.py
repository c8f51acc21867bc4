"""observe: an observe-mode element that sees every byte of both directions and judges nothing.

    python -m bench.observe_element --port 50051

The stock `elements.logger` is observe mode too, but asks for 1 byte per direction
and is bypassed after that; this one has no byte limit, so the benchmark measures
what a tap that receives all the data costs the proxy.
"""

from __future__ import annotations

from elements.sdk import Chunk, Connection, Element, Mode, Verdict, run


class Observe(Element):
    """Observe mode, both directions, no Open events, no byte limit."""

    name = "observe"
    mode = Mode.OBSERVE

    def on_data(self, conn: Connection, chunk: Chunk) -> Verdict | None:
        return None


if __name__ == "__main__":
    run(Observe)
