"""What becomes of the verdicts of an element nobody waits for: the operator's detect and shadow modes.

An element in `detect` or `shadow` mode (config.ElementConfig.mode) describes itself as inline
and answers every event, but the proxy plans it like an observe-mode element: its events go on
the one no-wait path (session.py queues them, never holds a chunk for them) and traffic never
waits for it. Its verdicts still arrive, and come here:

- detect: a CLOSE or RESET ends the connection when it arrives (the flow's late verdict: bytes
  already written stay written); PASS, DROP and replacement bytes are ignored. Counted as late
  enforcement, with the delay from the event's send to the verdict.
- shadow: nothing is enforced; every verdict that would have changed the traffic is counted
  (would_drop, would_close, would_reset, would_replace) and the first one of each connection
  is logged at info, so a rule can be rolled out against real traffic safely.

Pure bookkeeping: no I/O beyond one log line; the flow decides what a late CLOSE or RESET does.
"""

from __future__ import annotations

import logging
from typing import Any
from proxy.chain import Action, Peer
from proxy.operations.stats import ElementStats

log = logging.getLogger("proxy.session")

# The mode's word for each verdict that would change the traffic (PASS with replacement bytes is "replace").
_WOULD = {Action.DROP: "drop", Action.CLOSE: "close", Action.RESET: "reset"}
_SAID = {"drop": "dropped a chunk of", "close": "closed", "reset": "reset", "replace": "replaced bytes of"}
_ENFORCED = frozenset((Action.CLOSE, Action.RESET))
# Sent-at times kept for a verdict still to come; past this many (an element that answers nothing)
# the oldest are forgotten and their late verdicts counted as stray, so the proxy does not grow.
WATCHED_MAX = 65536


class LateVerdicts:
    """One element session's detect or shadow bookkeeping: which events it may still answer, and
    what its answers do."""

    __slots__ = ("mode", "element", "name", "stats", "sent", "said")

    def __init__(self, mode: str, element: int, name: str, stats: ElementStats) -> None:
        self.mode = mode
        self.element = element
        self.name = name
        self.stats = stats
        self.sent: dict[tuple[str, int], float] = {}
        # connections whose would-be verdict was logged: kept past their end (a verdict may come
        # after it), the oldest forgotten past WATCHED_MAX
        self.said: dict[str, None] = {}

    def expect(self, key: tuple[str, int], now: float) -> None:
        """An event was sent: its verdict may come."""
        _bounded(self.sent)[key] = now

    def take(self, key: tuple[str, int], peer: Peer | None, action: int, data: bytes | None, now: float) -> bool:
        """A verdict for `key`; False when none was expected (a stray, for the session to count).
        `peer` is None when the connection ended before the verdict came: nothing is left to
        enforce, but what a shadow element would have done still counts."""
        sent_at = self.sent.pop(key, None)
        if sent_at is None:
            return False
        if self.mode == "shadow":
            self._would(key[0], action, data)
        elif action in _ENFORCED and peer is not None:
            self.stats.late_verdict(_WOULD[Action(action)], now - sent_at)
            peer.flow.on_late_verdict(self.element, action)
        return True

    def _would(self, connection_id: str, action: int, data: bytes | None) -> None:
        word = _WOULD.get(Action(action)) if action in _WOULD else "replace" if data is not None else None
        if word is None:
            return
        self.stats.would[word] += 1
        if connection_id not in self.said:
            _bounded(self.said)[connection_id] = None
            log.info("element %s (shadow) would have %s connection %s", self.name, _SAID[word], connection_id)


def _bounded(kept: dict[Any, Any]) -> dict[Any, Any]:
    """`kept`, with room for one more: past WATCHED_MAX the oldest entry goes."""
    if len(kept) >= WATCHED_MAX:
        del kept[next(iter(kept))]
    return kept
