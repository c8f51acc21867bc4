"""Messages instead of chunks: one direction of one connection, framed, with no I/O.

TCP cuts a protocol's messages anywhere, and the proxy asks about chunks. A `Framer` (one
per protocol, fed the direction's bytes in order) says where each message's head ends and
where the message ends; a `Stream` (one per connection and direction) turns that into the
messages an element judges and, from their verdicts, the one verdict the chunk needs:

- a message whose head is not complete at the end of the chunk: HOLD (the proxy keeps the
  chunk; the chunk that completes the head decides both, and no byte is sent twice);
- every message passed unchanged: PASS; a message rewritten or removed: PASS with the
  bytes of everything the verdict decides (held chunks too), the message's in its place;
- a message judged on its head (a framer ends a head before a large payload): its verdict
  holds for the rest of it, which streams through (or is removed) as it arrives, unheld.

Memory: the stream keeps the held chunks (references, not copies) and its edits. A chunk
that completes a held message but ends inside the next one would be held again, with all
before it: so once what is held passes `hold_limit`, the decided part goes (PASS with its
bytes) and the stream itself keeps the bytes of the unfinished message, which its next
verdict puts back in front (a replacement). The framer bounds heads, so that is at most a
head plus a chunk. An incomplete message at end of stream is dropped: its end never came,
so it was never judged. `done` on a message's verdict takes effect at that message's end.
Everything here is pure, so tests/test_framing.py drives it chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from elements.sdk.element import Action, Direction, Event, Framer, FramingError, Hold, Message, Pass, Verdict

Judged = Message[Any] | FramingError
_ENDING = (Action.CLOSE, Action.RESET)
_PASS = Pass()
HOLD_LIMIT = 256 * 1024  # below the proxy's default max_held_bytes (1 MiB), with room for a chunk


@dataclass(slots=True)
class _Found:
    """What `scan` handed out, by stream offsets: where it starts and where it ends (None: later).
    A framing error starts where the framer gave up and runs to the end of the stream."""

    start: int
    stop: int | None
    broken: bool = False


class _Said:
    """What the verdicts on one chunk's messages say together: their replies, in order, and metadata."""

    __slots__ = ("replies", "merged")

    def __init__(self) -> None:
        self.replies: list[bytes] = []
        self.merged: dict[str, str] = {}

    def take(self, verdict: Verdict | None) -> Verdict:
        verdict = verdict or _PASS
        if verdict.action == Action.HOLD:
            raise TypeError("on_message returned Hold(): the SDK holds partial messages itself")
        self.replies.append(verdict.reply or b"")
        self.merged.update(verdict.metadata or {})
        return verdict

    @property
    def reply(self) -> bytes | None:
        return b"".join(self.replies) or None

    @property
    def metadata(self) -> dict[str, str] | None:
        return self.merged or None


class Stream:
    """One direction of one connection: `scan` a chunk for what to judge, `settle` the verdicts."""

    __slots__ = ("framer", "direction", "late", "hold_limit", "offset", "chunk", "held", "kept", "region", "edits",
                 "start", "judged", "removing", "found", "framing", "discarding", "done_at_end", "say_done", "ending")

    def __init__(self, framer: Framer[Any], direction: Direction, late: str = "", hold_limit: int = HOLD_LIMIT) -> None:
        self.framer = framer
        self.direction = direction
        self.late = late                # why framing cannot start at all (a resumed connection), or ""
        self.hold_limit = hold_limit
        self.offset = 0                 # stream offset of the byte after the last chunk scanned
        self.chunk = b""                # the last chunk scanned
        self.held: list[bytes] = []     # the region before the chunk: what this stream kept, then chunks held
        self.kept = 0                   # bytes at the region's front the proxy does not hold (kept here)
        self.region = 0                 # stream offset of the region (its first byte)
        self.edits: list[tuple[int, int, bytes]] = []  # (start, stop, bytes in their place), stream offsets
        self.start: int | None = None   # where the current message began (None: between messages)
        self.judged = False             # its head (or all of it) was handed out
        self.removing = False           # it was judged away: the rest of it is removed as it arrives
        self.found: list[_Found] = []   # what the last scan handed out, in order
        self.framing = True             # False once done or broken: bytes pass (or go) as they are
        self.discarding = False         # not framing, and every byte goes (a framing error dropped)
        self.done_at_end = False        # `done` was said on the current message, which is still being removed
        self.say_done = False           # the next chunk verdict carries done
        self.ending: Verdict | None = None  # CLOSE or RESET given: every later chunk gets it too

    def scan(self, data: bytes, end_of_stream: bool) -> list[Judged]:
        """The messages (and a framing error) of this chunk to judge, in order."""
        base, self.chunk, self.found = self.offset, data, []
        self.offset = base + len(data)
        if self.late:
            self.framing = False
            self.found.append(_Found(base, None, broken=True))
            return [FramingError(self.direction, self.late, resumed=True)]
        if not self.framing or self.ending:
            if self.discarding:
                self.edits.append((base, self.offset, b""))
            return []
        out: list[Judged] = []
        self._frame(data, base, out)
        if end_of_stream and self._unfinished:
            assert self.start is not None
            self.edits.append((self.start, self.offset, b""))  # its end never came: never judged, never written
            self.start = None
        return out

    def settle(self, verdicts: Sequence[Verdict | None], end_of_stream: bool) -> Verdict:
        """The chunk's verdict, from the verdicts on what `scan` handed out (fewer: the rest pass
        unjudged, after a verdict with `done` or one that ends the connection)."""
        if self.ending:
            return self.ending
        said = _Said()
        for found, verdict in zip(self.found, verdicts):
            verdict = said.take(verdict)
            if verdict.action in _ENDING:
                self.ending = Verdict(verdict.action, None, said.metadata, said.reply)
                return self.ending
            self._apply(found, verdict)
            if verdict.done:
                break
        return self._verdict(said.metadata, said.reply, end_of_stream)

    # -- inside ---------------------------------------------------------------------------------

    @property
    def _unfinished(self) -> bool:
        """The current message's head is not complete: nothing can be said about it yet."""
        return self.framing and self.start is not None and not self.judged

    def _frame(self, data: bytes, base: int, out: list[Judged]) -> None:
        """Runs the framer over the chunk, noting what to judge and removing what was judged away."""
        pos = 0
        while pos < len(data) and self.framing:
            if self.start is None:
                self.start, self.judged, self.removing = base + pos, False, False
            stop, event = self.framer.step(data, pos)
            if self.removing:
                self.edits.append((base + pos, base + stop, b""))
            pos = stop
            if event is Event.BROKEN:
                self.framing, self.start = False, None
                self.found.append(_Found(base + pos, None, broken=True))
                out.append(FramingError(self.direction, self.framer.problem))
            elif event is not None:
                self._found(data, base, base + pos, event, out)

    def _verdict(self, metadata: dict[str, str] | None, reply: bytes | None, end_of_stream: bool) -> Verdict:
        """HOLD while a message's head is incomplete (past hold_limit, the decided part goes and the
        rest is kept here); else PASS, with the region's bytes when anything in it changed."""
        if self._unfinished and not end_of_stream:
            assert self.start is not None
            if self.start <= self.region + self.kept or self.offset - self.region <= self.hold_limit:
                self.held.append(self.chunk)
                return Hold(metadata, reply=reply)
            return Pass(self._keep_unfinished(), metadata, reply=reply)
        data = self._output(self.offset) if self.edits or self.kept else None
        self.held, self.kept, self.edits, self.region = [], 0, [], self.offset
        done, self.say_done = self.say_done, False
        return Pass(data, metadata, reply=reply, done=done)

    def _found(self, data: bytes, base: int, at: int, event: Event, out: list[Judged]) -> None:
        """A HEAD or an END at stream offset `at`: hand the message out unless its head was."""
        assert self.start is not None
        if not self.judged:
            self.judged = True
            whole = event is Event.END
            self.found.append(_Found(self.start, at if whole else None))
            out.append(Message(self.direction, self._bytes(data, base, self.start, at), whole, self.framer.found))
        if event is Event.END:
            if self.found and self.found[-1].start == self.start:
                self.found[-1].stop = at
            self.start = None
            if self.done_at_end:
                self.done_at_end = False
                self._stop_framing()

    def _apply(self, found: _Found, verdict: Verdict) -> None:
        """A verdict as edits of the region: DROP removes what it judged, PASS with bytes replaces it;
        the rest of a message still to come is removed as it arrives. On a framing error PASS lets
        the rest of the direction through unframed, DROP removes it."""
        removed = verdict.action == Action.DROP or verdict.data is not None
        if removed:
            stop = found.stop if found.stop is not None else self.offset
            self.edits.append((found.start, stop, verdict.data or b""))
        if found.broken:
            self.discarding = removed
            self.say_done = not removed
        elif found.stop is None:
            self.removing = removed
        if verdict.done and not found.broken:
            if self.removing:
                self.done_at_end = True  # the rest of it must still go
            else:
                self._stop_framing()

    def _stop_framing(self) -> None:
        self.framing = False
        self.say_done = True

    def _bytes(self, data: bytes, base: int, start: int, stop: int) -> bytes:
        """Stream bytes [start, stop), from the held chunks and the current one."""
        if start >= base:
            return data[start - base:stop - base]
        pieces, at = [], self.region
        for chunk in (*self.held, data):
            low, high = max(start, at), min(stop, at + len(chunk))
            if low < high:
                pieces.append(chunk[low - at:high - at])
            at += len(chunk)
        return b"".join(pieces)

    def _keep_unfinished(self) -> bytes:
        """Past hold_limit: the bytes before the unfinished message, edited, go now; its own bytes
        stay here, at the front of the next region (no edit lies inside an unjudged message)."""
        assert self.start is not None
        out = self._output(self.start)
        unfinished = self._bytes(self.chunk, self.offset - len(self.chunk), self.start, self.offset)
        self.held, self.kept, self.region = [unfinished], len(unfinished), self.start
        self.edits = [edit for edit in self.edits if edit[0] >= self.start]
        return out

    def _output(self, stop: int) -> bytes:
        """The region up to stream offset `stop`, with the edits applied."""
        region = b"".join([*self.held, self.chunk]) if self.held else self.chunk
        out: list[bytes] = []
        at = self.region
        for start, end, replacement in sorted(self.edits, key=lambda edit: edit[0]):
            if start >= stop:
                break
            out += (region[at - self.region:max(at, start) - self.region], replacement)
            at = max(at, end)
        out.append(region[at - self.region:stop - self.region])
        return b"".join(out)
