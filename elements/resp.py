"""Redis's request framing, as the server itself reads it: a pure `Framer` of RESP commands.

A guard is only as good as its agreement with the server about where each command starts
and what it is. So this mirrors Redis 7's networking.c byte for byte where the server
accepts a request (processMultibulkBuffer, processInlineBuffer, sdssplitargs, string2ll),
and breaks (Event.BROKEN) wherever the server would answer a protocol error or would wait
for bytes that can never make a command (a NUL before an inline command's newline); being
stricter than the server there is safe, since no command after a protocol error runs.

- A request starting with `*` is an array: `*<count>\\r` and one more byte (the server does
  not look at it), then per argument `$<length>\\r` and one more byte, the bytes, and two
  more (not looked at either). Numbers are string2ll's: `0` or `-?[1-9][0-9]*`, under 21
  characters. A count of 0 or less is an empty command (the server skips it, no reply);
  over 2^31-1 breaks, as does a length under 0 or over 512 MiB (proto-max-bulk-len).
- Anything else is an inline command: a line to `\\n` (one `\\r` before it dropped), split
  as sdssplitargs splits: blanks, "double quotes" with \\xHH and \\n-style escapes, 'single
  quotes'. An unbalanced quote breaks; so does a line over 64 KiB (PROTO_INLINE_MAX_SIZE).
- RESP3 changes the server's replies, not requests: a RESP3 client sends these same arrays.

The head of an array ends before the first argument that would take it past `head_bytes`
(64 KiB): the guard judges the command by its name and first arguments while a large value
streams through. Heads of inline commands are whole lines. Found: a `Command`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from elements.sdk import Event

INLINE_MAX = 64 * 1024          # PROTO_INLINE_MAX_SIZE
BULK_MAX = 512 * 1024 * 1024    # proto-max-bulk-len's default
COUNT_MAX = 2**31 - 1           # INT_MAX
NUMBER_MAX = 20                 # string2ll refuses LONG_STR_SIZE (21) characters or more
HEAD_BYTES = 64 * 1024
_NUMBER = re.compile(rb"0|-?[1-9][0-9]*")
_BLANKS = b" \t\n\v\f\r"        # isspace() in the C locale
_ENDS_TOKEN = b" \n\r\t"        # what ends an unquoted token in sdssplitargs (and NUL, never in a line)
_QUOTES = b"\"'"
_STOPS = _ENDS_TOKEN + _QUOTES + b"\0"  # what an unquoted run of a token stops at
_AFTER_QUOTE = _BLANKS + b"\0"          # what may follow a closing quote (\0: the end)
_ESCAPES = {ord("n"): 0x0A, ord("r"): 0x0D, ord("t"): 0x09, ord("b"): 0x08, ord("a"): 0x07}
_HEX = b"0123456789abcdefABCDEF"


@dataclass(frozen=True, slots=True)
class Command:
    """A command as the server will see it: `args` (all of them when `complete`), how many it has,
    and whether it came inline."""

    args: tuple[bytes, ...]
    count: int
    inline: bool = False

    @property
    def complete(self) -> bool:
        return len(self.args) == self.count


class _State(enum.Enum):
    START = "start"        # between commands
    INLINE = "inline"      # inside an inline command's line
    COUNT = "count"        # inside `*<count>\r?`
    LENGTH = "length"      # inside `$<length>\r?`
    PAYLOAD = "payload"    # inside an argument's bytes and the two after them


class Resp:
    """One direction (client to server) of one connection, fed in order. See the module docstring."""

    __slots__ = ("head_bytes", "state", "line", "after_cr", "left", "remaining", "arg", "args", "count", "taken",
                 "in_head", "found", "problem")

    def __init__(self, head_bytes: int = HEAD_BYTES) -> None:
        self.head_bytes = head_bytes
        self.state = _State.START
        self.line = bytearray()       # an inline line, or a number, so far
        self.after_cr = False         # a number line saw its \r: one more byte ends it
        self.left = 0                 # arguments still to come
        self.remaining = 0            # bytes of the current argument (and its two trailing bytes) to come
        self.arg = bytearray()        # the current argument, while the head is kept
        self.args: list[bytes] = []
        self.count = 0
        self.taken = 0                # bytes of this command so far, while the head is kept
        self.in_head = True
        self.found = Command((), 0)
        self.problem = ""

    def step(self, data: bytes, start: int) -> tuple[int, Event | None]:
        pos, end = start, len(data)
        while pos < end:
            state = self.state
            if state is _State.START:
                if data[pos] == 0x2A:  # '*'
                    whole = self._whole(data, pos)
                    if whole is not None:
                        return whole, Event.END
                self._begin(data[pos])
                if self.state is _State.COUNT:
                    pos += 1
                continue
            if state is _State.INLINE:
                return self._inline(data, pos)
            if state is _State.PAYLOAD:
                pos, event = self._payload(data, pos)
            else:
                pos, event = self._number(data, pos)
            if event is not None:
                return pos, event
        return pos, None

    def _whole(self, data: bytes, pos: int) -> int | None:
        """The common case at once: an array command wholly in `data` from `pos`, valid, within
        the head bound; where it ends, with `found` set. None: anything else, which the state
        machine below then reads byte for byte (and accepts or breaks exactly as the server)."""
        end = len(data)
        line = _number_line(data, pos + 1, end)
        if line < 0 or int(data[pos + 1:line]) > COUNT_MAX:
            return None
        count, at, args = int(data[pos + 1:line]), line + 2, []
        for _ in range(count):
            line = _number_line(data, at + 1, end) if data[at:at + 1] == b"$" else -1
            if line < 0:
                return None
            length = int(data[at + 1:line])
            stop = line + 2 + length
            if not 0 <= length <= BULK_MAX or stop + 2 > end or stop + 2 - pos > self.head_bytes:
                return None
            args.append(data[line + 2:stop])
            at = stop + 2
        self.found = Command(tuple(args), max(count, 0))
        return at

    # -- the states --------------------------------------------------------------------------------

    def _begin(self, first: int) -> None:
        self.state = _State.COUNT if first == 0x2A else _State.INLINE  # '*'
        self.line.clear()
        self.after_cr = False
        self.args, self.count, self.taken, self.in_head = [], 0, 1, True

    def _inline(self, data: bytes, pos: int) -> tuple[int, Event | None]:
        newline = data.find(b"\n", pos)
        stop = len(data) if newline < 0 else newline
        if data.find(b"\0", pos, stop) >= 0:
            return self._broken(stop, "a NUL byte in an inline command (the server would wait for its end forever)")
        self.line += data[pos:stop]
        if len(self.line) > INLINE_MAX:
            return self._broken(stop, "too big inline request")
        if newline < 0:
            return stop, None
        line = bytes(self.line[:-1] if self.line.endswith(b"\r") else self.line)
        args = split_args(line)
        if args is None:
            return self._broken(newline + 1, "unbalanced quotes in request")
        self.found = Command(tuple(args), len(args), inline=True)
        self.state = _State.START
        return newline + 1, Event.END

    def _number(self, data: bytes, pos: int) -> tuple[int, Event | None]:
        """`*<count>` or `$<length>` up to its \\r and the one byte the server skips after it."""
        if self.after_cr:
            self.taken += 1
            return self._number_done(pos + 1)
        room = NUMBER_MAX + 2 - len(self.line)  # what this line may still hold, its \r included
        line = data.find(b"\r", pos, pos + room)
        stop = line if line >= 0 else min(len(data), pos + room)
        if data.find(b"\0", pos, stop) >= 0 or line < 0 and stop - pos >= room:
            return self._broken(stop, "invalid multibulk length" if self.state is _State.COUNT
                                else "invalid bulk length")
        self.line += data[pos:stop]
        self.taken += stop - pos
        if line < 0:
            return stop, None
        self.after_cr = True
        self.taken += 1
        return self._number(data, line + 1) if line + 1 < len(data) else (line + 1, None)

    def _number_done(self, pos: int) -> tuple[int, Event | None]:
        text = bytes(self.line)
        self.line.clear()
        self.after_cr = False
        if self.state is _State.COUNT:
            if not _NUMBER.fullmatch(text) or int(text) > COUNT_MAX:
                return self._broken(pos, "invalid multibulk length")
            self.count = self.left = max(int(text), 0)
            if not self.left:
                return self._end(pos)
            self.state = _State.LENGTH
            return pos, None
        if not text.startswith(b"$"):
            return self._broken(pos, f"expected '$', got {text[:1]!r}")
        if not _NUMBER.fullmatch(text[1:]) or not 0 <= int(text[1:]) <= BULK_MAX:
            return self._broken(pos, "invalid bulk length")
        length = int(text[1:])
        self.remaining = length + 2
        self.arg.clear()
        self.state = _State.PAYLOAD
        if self.in_head and self.taken + length + 2 > self.head_bytes:
            self.in_head = False  # this argument and the rest stream through
            self.found = Command(tuple(self.args), self.count)
            return pos, Event.HEAD
        return pos, None

    def _payload(self, data: bytes, pos: int) -> tuple[int, Event | None]:
        take = min(self.remaining, len(data) - pos)
        if self.in_head:
            self.arg += data[pos:pos + max(min(take, self.remaining - 2), 0)]
            self.taken += take
        self.remaining -= take
        pos += take
        if self.remaining:
            return pos, None
        if self.in_head:
            self.args.append(bytes(self.arg))
        self.left -= 1
        if self.left:
            self.state = _State.LENGTH
            return pos, None
        return self._end(pos)

    def _end(self, pos: int) -> tuple[int, Event | None]:
        if self.in_head:
            self.found = Command(tuple(self.args), self.count)
        self.state = _State.START
        return pos, Event.END

    def _broken(self, pos: int, problem: str) -> tuple[int, Event | None]:
        self.problem = f"Protocol error: {problem}"
        return pos, Event.BROKEN


def _number_line(data: bytes, start: int, end: int) -> int:
    """Where the \\r after a string2ll number starting at `start` is, with the byte the server skips
    after it present; -1 when there is no such line there (yet)."""
    line = data.find(b"\r", start, start + NUMBER_MAX + 2)
    return line if 0 <= line < end - 1 and _NUMBER.fullmatch(data, start, line) else -1


def split_args(line: bytes) -> list[bytes] | None:
    """sdssplitargs: the arguments of an inline command, or None for unbalanced quotes. `line`
    holds no NUL (the server never gets that far with one)."""
    args: list[bytes] = []
    pos, end = 0, len(line)
    while True:
        while pos < end and line[pos] in _BLANKS:
            pos += 1
        if pos >= end:
            return args
        token, pos = _token(line, pos)
        if token is None:
            return None
        args.append(token)


def _at(line: bytes, pos: int) -> int:
    """The byte at `pos`, or 0 past the end: the C string's terminating NUL."""
    return line[pos] if pos < len(line) else 0


def _token(line: bytes, pos: int) -> tuple[bytes | None, int]:
    """One token from `pos`, and where the next one may start: bytes up to a blank, or up to a
    quoted part, which ends the token and must be followed by a blank or the end."""
    out = bytearray()
    while _at(line, pos) not in _STOPS:
        out.append(line[pos])
        pos += 1
    char = _at(line, pos)
    if char not in _QUOTES:
        return bytes(out), pos + (char != 0)
    pos = _quoted(line, pos + 1, out, char)
    if pos < 0 or _at(line, pos + 1) not in _AFTER_QUOTE:
        return None, pos
    return bytes(out), pos + 1


def _quoted(line: bytes, pos: int, out: bytearray, quote: int) -> int:
    """Inside "..." or '...' from `pos`: the closing quote's position, -1 if none (unbalanced)."""
    escape = _double_escape if quote == 0x22 else _single_escape
    while char := _at(line, pos):
        if char == quote:
            return pos
        taken = escape(line, pos, out) if char == 0x5C else 0
        if not taken:
            out.append(char)
        pos += taken or 1
    return -1


def _double_escape(line: bytes, pos: int, out: bytearray) -> int:
    """A backslash in "...": \\xHH, or the byte after it (\\n \\r \\t \\b \\a mapped); the bytes it
    takes, 0 when it is a plain backslash (the last byte of the line)."""
    if _at(line, pos + 1) == 0x78 and _at(line, pos + 2) in _HEX and _at(line, pos + 3) in _HEX:
        out.append(int(line[pos + 2:pos + 4], 16))
        return 4
    following = _at(line, pos + 1)
    if following:
        out.append(_ESCAPES.get(following, following))
        return 2
    return 0


def _single_escape(line: bytes, pos: int, out: bytearray) -> int:
    """A backslash in '...': only \\' is an escape."""
    if _at(line, pos + 1) == 0x27:
        out.append(0x27)
        return 2
    return 0
