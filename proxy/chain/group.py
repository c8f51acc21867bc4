"""A parallel stage: one chunk asked of several read-only elements at once, their verdicts
combined in chain order.

Read-only elements (Description.read_only) never replace bytes, so asking them together
changes nothing that is written, provided their verdicts combine as a sequence would have
applied them: the first verdict that is not PASS, in chain order, wins, and it can only be
known once every element before it in the stage has passed. The one exception follows the
table too: a DROP of an end-of-stream chunk lets the (emptied) EOF go on, so the members
after it still decide, and only a CLOSE or RESET of theirs overrides the DROP. So a stage waits for exactly
the verdicts a sequential chain would have needed, and no more: an early RESET from its
first element decides at once, a DROP from its third waits for the first two. Its lane sees
one verdict per chunk at the stage's position, as from any other stage.
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.chain.types import Action, HoldingTarget, Stage
from proxy.chain.verdicts import rule

Answer = tuple[int, bytes | None, Mapping[str, str] | None]


class Group:
    """The verdicts owed to one parallel stage of one lane, per chunk; the ports send them here,
    with the member's place in the stage as `pos`."""

    __slots__ = ("lane", "pos", "members", "answers", "ends", "judges")

    def __init__(self, lane: HoldingTarget, pos: int, stage: Stage) -> None:
        self.lane = lane
        self.pos = pos
        self.members = (stage.element, *stage.peers)
        self.answers: dict[int, list[Answer | None]] = {}
        self.ends: set[int] = set()  # chunks that carry end_of_stream
        self.judges: dict[int, int] = {}  # seq -> the element whose verdict ends or closes the connection

    def expect(self, seq: int, eos: bool) -> None:
        """The chunk `seq` is on its way to every member."""
        self.answers[seq] = [None] * len(self.members)
        if eos:
            self.ends.add(seq)

    def judge(self, seq: int) -> int:
        """Which element's verdict on `seq` ended or closed the connection (for its closing line)."""
        return self.judges.pop(seq, self.members[0])

    def on_verdict(self, pos: int, seq: int, action: int, data: bytes | None,
                   metadata: Mapping[str, str] | None, reply: bytes | None = None, done: bool = False) -> None:
        """A member's verdict. `reply` never comes (validate.py refuses it from a read-only element);
        a member's `done` is not followed: the stage keeps asking it with its peers."""
        answers = self.answers.get(seq)
        if answers is None or answers[pos] is not None:
            return  # decided already (a later member's verdict), or a repeat
        answers[pos] = (action, data, metadata)
        decided = _combined(answers, seq in self.ends)
        if decided is None:
            return
        member, combined = decided
        del self.answers[seq]
        self.ends.discard(seq)
        if rule(combined[0]).outcome is not None:
            self.judges[seq] = self.members[member]
        self.lane.on_verdict(self.pos, seq, *combined)


    def holder_lost(self, pos: int, action: int) -> None:
        """Read-only members never hold (validate.py), so the lane at the stage's place holds nothing
        of theirs; passed on so the lane stays the one that decides."""
        self.lane.holder_lost(self.pos, action)


def _combined(answers: list[Answer | None], eos: bool) -> tuple[int, Answer] | None:
    """(deciding member, verdict) once chain order decides, else None: the first member not to
    PASS, once all before it passed; or PASS, with their metadata merged in order, once all did.
    On an end-of-stream chunk a DROP decides only when no later member closes or resets."""
    merged: dict[str, str] = {}
    dropped: tuple[int, Answer] | None = None
    for member, answer in enumerate(answers):
        if answer is None:
            return None
        if answer[0] == Action.PASS:
            merged.update(answer[2] or {})
        elif answer[0] != Action.DROP or not eos:
            return member, answer
        elif dropped is None:
            dropped = (member, answer)
    return dropped or (len(answers) - 1, (Action.PASS, None, merged or None))
