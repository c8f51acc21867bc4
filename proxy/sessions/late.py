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

Such a session is opened with `element-proxy-verdicts: changes` (elements.api.VERDICTS_METADATA):
the element may leave out its plain PASS verdicts, which would change nothing here. So no verdict is certain
to come: the sent-at times kept for the delay are only the latest events' (two generations of
GENERATION), and a verdict is taken when its event's time is kept or its connection is live or
ended lately; one for a connection this session never carried, or that ended long ago, is a stray.

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
# Sent-at times of the latest events, and ids of the connections ended lately, are kept in two
# generations of this many each (the older one dropped whole when the younger fills): bounded
# memory and O(1) work per event, whatever the element leaves unanswered.
GENERATION = 16384


class Generations:
    """The latest entries put, at least GENERATION and at most twice that many, with their values."""

    __slots__ = ("young", "old", "old_since")

    def __init__(self) -> None:
        self.young: dict[Any, float] = {}
        self.old: dict[Any, float] = {}
        self.old_since = 0.0  # the earliest value put in the older generation (0: none yet)

    def put(self, key: Any, value: float) -> None:
        young = self.young
        young[key] = value
        if len(young) >= GENERATION:
            self.old, self.young = young, {}
            self.old_since = next(iter(young.values()))

    def pop(self, key: Any) -> float | None:
        value = self.young.pop(key, None)
        return self.old.pop(key, None) if value is None else value

    def __contains__(self, key: Any) -> bool:
        return key in self.young or key in self.old


class LateVerdicts:
    """One element session's detect or shadow bookkeeping: which events it may still answer, and
    what its answers do."""

    __slots__ = ("mode", "element", "name", "stats", "sent", "ended", "said")

    def __init__(self, mode: str, element: int, name: str, stats: ElementStats) -> None:
        self.mode = mode
        self.element = element
        self.name = name
        self.stats = stats
        self.sent = Generations()  # (connection id, sequence) -> when the event was sent
        self.ended = Generations()  # connection id -> when its Close was sent
        # connections whose would-be verdict was logged: kept past their end (a verdict may come
        # after it), for as long as ended ones are
        self.said = Generations()

    def expect(self, key: tuple[str, int], now: float) -> None:
        """An event was sent: its verdict may come."""
        self.sent.put(key, now)

    def end(self, connection_id: str, now: float) -> None:
        """The connection's Close was sent: a verdict for it may still be on its way."""
        self.ended.put(connection_id, now)

    def take(self, key: tuple[str, int], peer: Peer | None, action: int, data: bytes | None, now: float) -> bool:
        """A verdict for `key`; False when this session never carried its connection or forgot it
        (a stray, for the session to count). `peer` is None when the connection ended before the
        verdict came: nothing is left to enforce, but what a shadow element would have done
        still counts."""
        sent_at = self.sent.pop(key)
        if sent_at is None:
            if peer is None and key[0] not in self.ended:
                return False
            # older than every time kept: its delay is at least the oldest one's
            sent_at = self.sent.old_since or now
        if self.mode == "shadow":
            self._would(key[0], action, data, now)
        elif action in _ENFORCED and peer is not None:
            self.stats.late_verdict(_WOULD[Action(action)], now - sent_at)
            peer.flow.on_late_verdict(self.element, action)
        return True

    def _would(self, connection_id: str, action: int, data: bytes | None, now: float) -> None:
        word = _WOULD.get(Action(action)) if action in _WOULD else "replace" if data is not None else None
        if word is None:
            return
        self.stats.would[word] += 1
        if connection_id not in self.said:
            self.said.put(connection_id, now)
            log.info("element %s (shadow) would have %s connection %s", self.name, _SAID[word], connection_id)
