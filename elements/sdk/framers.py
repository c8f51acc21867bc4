"""Framers that come with the SDK (the `Framer` protocol is in element.py). RESP, Redis's
request framing, is elements/resp.py."""

from __future__ import annotations

from elements.sdk.element import Event


class Lines:
    """Messages are lines, each ending with "\\n" (a "\\r" before it is part of the line). A line
    longer than `longest` bytes breaks the framing, so a message held until its end stays small."""

    __slots__ = ("longest", "length")

    def __init__(self, longest: int = 64 * 1024) -> None:
        self.longest = longest
        self.length = 0  # bytes of the current line seen so far

    def step(self, data: bytes, start: int) -> tuple[int, Event | None]:
        end = data.find(b"\n", start, start + self.longest - self.length + 1)
        if end < 0:
            self.length += len(data) - start
            if self.length > self.longest:
                return len(data), Event.BROKEN
            return len(data), None
        self.length = 0
        return end + 1, Event.END

    @property
    def found(self) -> None:
        """Nothing beyond the line itself (Message.data)."""

    @property
    def problem(self) -> str:
        return f"a line longer than {self.longest} bytes"
