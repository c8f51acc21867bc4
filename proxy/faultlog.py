"""Warnings about a misbehaving element, at most one line per cause per second.

A stalled element with many connections, or one that answers nonsense to every event,
would otherwise write a line per event (165 lines for a 5 s stall of 20 connections).
The first fault of a cause in a window is logged as it is; the ones after it are
counted, and one line says how many once the window is over, so nothing goes unsaid.
"""

from __future__ import annotations

import asyncio
import logging
import time

WINDOW = 1.0


class FaultLog:
    """Rate-limited warnings of one element; `subject` starts every line ("element firewall")."""

    def __init__(self, log: logging.Logger, subject: str, window: float = WINDOW) -> None:
        self.log = log
        self.subject = subject
        self.window = window
        self._last: dict[str, float] = {}
        self._held: dict[str, tuple[int, str]] = {}

    def warn(self, cause: str, summary: str, message: str, *args: object) -> None:
        """Logs `subject: message % args` unless `cause` was logged within the window; then only
        counts it, to be said as `subject: N more <summary> in the last 1 s`."""
        now = time.monotonic()
        last = self._last.get(cause)
        if last is None or now - last >= self.window:
            self._last[cause] = now
            self.log.warning("%s: " + message, self.subject, *args)
            return
        held = self._held.get(cause)
        if held is None:
            asyncio.get_running_loop().call_later(last + self.window - now, self._flush, cause)
            held = (0, summary)
        self._held[cause] = (held[0] + 1, summary)

    def _flush(self, cause: str) -> None:
        count, summary = self._held.pop(cause, (0, ""))
        if count:
            self._last[cause] = time.monotonic()
            self.log.warning("%s: %d more %s in the last %g s", self.subject, count, summary, self.window)
