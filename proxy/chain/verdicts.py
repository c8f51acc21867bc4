"""Every action and what it does, in one table read by every path that applies a verdict.

A lane applies a verdict to a chunk, a flow to an Open or to a resumed Open, and all
three look the action up here: adding an action is adding a row (and, if it does
something no row does yet, an Effect the lane learns). An action missing from the
table is never a fallthrough: `rule` answers it as a failure that names the action.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from proxy.chain.types import Action, Outcome


class Effect(enum.Enum):
    """What a verdict does to the chunk it answers."""

    FORWARD = "forward"   # on to the next stage (its replacement bytes and metadata with it)
    DISCARD = "discard"   # this chunk is gone; an end of stream still travels, emptied
    CLOSE = "close"       # graceful: nothing from this chunk on, the rest drains, FIN both ways
    END = "end"           # the connection ends now with `outcome` (RST both ways)
    HOLD = "hold"         # kept at its stage until a later verdict of that element decides it with the next


@dataclass(frozen=True, slots=True)
class Rule:
    """One action: its effect on a chunk, whether an Open goes on, and how it ends a connection."""

    on_chunk: Effect
    open_continues: bool
    outcome: Outcome | None = None   # when it ends the connection
    says: str = ""                   # "element X <says>" in its closing line; {at} is "", " on open", " on resume"
    on_open: str = ""                # what it says instead for an Open, when that differs

    def said(self, at: str = "") -> str:
        return self.on_open if at == " on open" and self.on_open else self.says.format(at=at)


RULES: dict[int, Rule] = {
    Action.PASS: Rule(Effect.FORWARD, open_continues=True),
    Action.DROP: Rule(Effect.DISCARD, open_continues=True),
    Action.CLOSE: Rule(Effect.CLOSE, open_continues=False, outcome=Outcome.CLOSED_BY_ELEMENT, says="closed it{at}",
                       on_open="rejected it on open"),
    Action.RESET: Rule(Effect.END, open_continues=False, outcome=Outcome.RESET_BY_ELEMENT, says="reset it{at}"),
    Action.FAIL: Rule(Effect.END, open_continues=False, outcome=Outcome.FAILURE, says="failed{at} (fail-closed)"),
    # Only a Data event that is not end of stream can be held; the sessions refuse HOLD anywhere else, so
    # `outcome` is what a HOLD that slipped through does: nothing later could decide it.
    Action.HOLD: Rule(Effect.HOLD, open_continues=False, outcome=Outcome.FAILURE,
                      says="held an event nothing later could decide{at} (a bug: the sessions refuse it)"),
}


# What an element may answer: every row but the proxy's own FAIL (sessions/validate.py refuses the rest).
WIRE_ACTIONS = tuple(Action(action) for action in RULES if action != Action.FAIL)


def rule(action: int) -> Rule:
    """The row of `action`. The sessions let only known actions through (sessions/validate.py), so
    an unknown one here is a bug: it ends the connection as a failure that names it."""
    found = RULES.get(action)
    if found is None:
        return Rule(Effect.END, open_continues=False, outcome=Outcome.FAILURE,
                    says=f"answered action {action}{{at}}, which the proxy does not know (a bug: reported as a failure)")
    return found
