"""What an element is made of: the class to subclass, the types its hooks see, the verdicts they return.

Protobuf types stay out of this: hooks see `Connection` and `Chunk` and return `Verdict`s;
the enums' values are the proto's (tests/test_enums.py pins them).
"""

from __future__ import annotations

import argparse
import enum
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, NamedTuple, Protocol, Self, TypeVar, cast

from elements.api import element_pb2 as pb


class Direction(enum.IntEnum):
    """Which way a chunk travels (values are the proto's, so they compare equal to them)."""

    REQUEST = pb.DIRECTION_REQUEST
    RESPONSE = pb.DIRECTION_RESPONSE


class Mode(enum.IntEnum):
    """INLINE: the proxy waits for every verdict. OBSERVE: a tap, never waited for."""

    INLINE = pb.MODE_INLINE
    OBSERVE = pb.MODE_OBSERVE


class Action(enum.IntEnum):
    """What the proxy does with the chunk (see the proto for Open and end-of-stream rules)."""

    PASS = pb.ACTION_PASS
    DROP = pb.ACTION_DROP
    CLOSE = pb.ACTION_CLOSE
    RESET = pb.ACTION_RESET
    HOLD = pb.ACTION_HOLD


class CloseReason(enum.IntEnum):
    """Why the proxy ended a connection."""

    UNSPECIFIED = pb.CLOSE_REASON_UNSPECIFIED
    COMPLETED = pb.CLOSE_REASON_COMPLETED
    CLOSED_BY_ELEMENT = pb.CLOSE_REASON_CLOSED_BY_ELEMENT
    RESET_BY_ELEMENT = pb.CLOSE_REASON_RESET_BY_ELEMENT
    PEER_RESET = pb.CLOSE_REASON_PEER_RESET
    UPSTREAM_UNREACHABLE = pb.CLOSE_REASON_UPSTREAM_UNREACHABLE
    FAILURE = pb.CLOSE_REASON_FAILURE
    IDLE_TIMEOUT = pb.CLOSE_REASON_IDLE_TIMEOUT
    MAX_DURATION = pb.CLOSE_REASON_MAX_DURATION
    PROXY_STOPPING = pb.CLOSE_REASON_PROXY_STOPPING


# A dict lookup, not Direction(value): this runs for every chunk.
DIRECTION_OF = {int(d): d for d in Direction}


class Address(NamedTuple):
    """An IP endpoint; unpacks as (ip, port). Empty when the proxy did not say."""

    ip: str = ""
    port: int = 0

    def __str__(self) -> str:
        if not self.ip:
            return "-"
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


@dataclass(slots=True)
class Connection:
    """One proxied connection as an element sees it; lives from its first event to Close.

    `metadata` accumulates the metadata of its Open and Data events; `state` is the
    element's own per-connection scratch space, dropped with the connection.
    `resumed` is set when the proxy announced the connection to this session after it
    had started (an element restart, a reconnect): whatever the element kept about its
    earlier bytes (`request_bytes`/`response_bytes` of them were written) is not here.
    """

    id: str
    client: Address = Address()
    original_destination: Address = Address()
    listener: Address = Address()
    metadata: dict[str, str] = field(default_factory=dict)
    state: dict[Any, Any] = field(default_factory=dict)
    resumed: bool = False
    request_bytes: int = 0
    response_bytes: int = 0


@dataclass(slots=True)
class Chunk:
    """Bytes of one direction, as earlier elements left them."""

    sequence: int
    direction: Direction
    data: bytes
    end_of_stream: bool = False
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A hook's answer. Build it with Pass(), Drop(), Close(), Reset() or Hold().

    `reply`: bytes written back to the chunk's sender (proto Verdict.reply); `done`: no more
    chunks of this direction of this connection for this element (proto Verdict.done)."""

    action: Action
    data: bytes | None = None
    metadata: Mapping[str, str] | None = None
    reply: bytes | None = None
    done: bool = False


def Pass(data: bytes | None = None, metadata: Mapping[str, str] | None = None, *,  # noqa: N802
         reply: bytes | None = None, done: bool = False) -> Verdict:
    """Forward the chunk, or `data` in its place when given (may be empty, shorter, longer)."""
    return Verdict(Action.PASS, data, metadata, reply, done)


def Drop(metadata: Mapping[str, str] | None = None, *, reply: bytes | None = None,  # noqa: N802
         done: bool = False) -> Verdict:
    """Discard this chunk only; the connection stays up."""
    return Verdict(Action.DROP, None, metadata, reply, done)


def Close(metadata: Mapping[str, str] | None = None, *, reply: bytes | None = None) -> Verdict:  # noqa: N802
    """End the connection gracefully: FIN both ways after what was read before this chunk (and
    `reply` to its sender before the FIN)."""
    return Verdict(Action.CLOSE, None, metadata, reply)


def Reset(metadata: Mapping[str, str] | None = None) -> Verdict:  # noqa: N802
    """Abort the connection: RST both ways, nothing pending is written."""
    return Verdict(Action.RESET, None, metadata)


def Hold(metadata: Mapping[str, str] | None = None, *, reply: bytes | None = None) -> Verdict:  # noqa: N802
    """Not yet: the proxy keeps this chunk; the verdict on a later chunk of this direction decides
    it with that one (Pass(data) then replaces all of them). Not on an end-of-stream chunk."""
    return Verdict(Action.HOLD, None, metadata, reply)


HookResult = Verdict | None | Awaitable[Verdict | None]


# ---- framing: messages instead of chunks (elements/sdk/framing.py does the work) ----------------

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Event(enum.Enum):
    """What a framer found at the position it stopped at."""

    HEAD = "head"      # the current message's head ends here: judge it, the rest streams through
    END = "end"        # the current message ends here (judge it whole, unless its head was judged)
    BROKEN = "broken"  # the bytes do not follow the protocol: framing this direction stops


class Framer(Protocol[T_co]):
    """A protocol's framing of one direction: a pure state machine fed that direction's bytes in order.

    `step(data, start)` reads from data[start:] and returns (stop, event): with no event, it
    consumed everything (stop == len(data)) and needs more; else `event` happened at `stop`.
    `found` is what it knows of the message the last HEAD or END was about (a command and
    its arguments, say), `problem` why the stream is BROKEN. A framer keeps what it needs
    of the bytes itself and must end a head within a bound of its own, so that a message
    held at the proxy until its head is complete stays small."""

    def step(self, data: bytes, start: int) -> tuple[int, Event | None]: ...

    @property
    def found(self) -> T_co: ...

    @property
    def problem(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Message(Generic[T]):
    """A message for `on_message`: its bytes (all of them when `whole`, else its head, and the rest
    streams through under the same verdict) and what the framer found in them."""

    direction: Direction
    data: bytes
    whole: bool
    info: T


@dataclass(frozen=True, slots=True)
class FramingError:
    """For `on_framing_error`: the direction's bytes stopped following the protocol at this chunk,
    or (`resumed`) the connection was under way before this session began, so where its
    messages start is unknown."""

    direction: Direction
    problem: str
    resumed: bool = False


class Element:
    """Base class of every element: class attributes say what it wants, hooks judge.

    Each hook may be a plain function or `async def`. A hook returning None passes.
    Instances may override the class attributes in `__init__` (say, from options).
    A direction named in `framing` (with what makes its framer, one per connection) goes to
    `on_message` instead of `on_data`: see elements/sdk/framing.py.
    """

    name: str = ""
    wants_open: bool = False
    mode: Mode = Mode.INLINE
    # Only judges, never replaces bytes: the proxy may ask it at once with its read-only
    # neighbours (Description.read_only in the proto); returning bytes is then an invalid verdict.
    read_only: bool = False
    directions: tuple[Direction, ...] = (Direction.REQUEST, Direction.RESPONSE)
    request_bytes_limit: int = 0
    response_bytes_limit: int = 0
    framing: ClassVar[Mapping[Direction, Callable[[], Framer[Any]]]] = {}

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Declares the element's own command-line options (none by default)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        """Builds the element from parsed options; a ValueError becomes a usage error (exit 2)."""
        return cls()

    def on_open(self, conn: Connection) -> HookResult:
        """A connection was accepted (only when `wants_open`); may reject it before dialing.
        Also called with `conn.resumed` for a connection already under way when this session
        began: CLOSE or RESET end it, None keeps it."""
        return None

    def on_data(self, conn: Connection, chunk: Chunk) -> HookResult:
        """Judges one chunk; chunks of one connection arrive in order."""
        return None

    def on_message(self, conn: Connection, message: Message[Any]) -> HookResult:
        """Judges one message of a framed direction, whole or by its head (`message.whole`): Pass(),
        Pass(data) to rewrite it, Drop() to remove it, Close() or Reset() to end the connection
        at the chunk it is in (what came before it in that chunk is not written)."""
        return None

    def on_framing_error(self, conn: Connection, error: FramingError) -> HookResult:
        """A framed direction stopped following its protocol. Pass() lets the rest of the direction
        through unframed, Drop() removes it; by default the connection is reset."""
        return Reset()

    def on_close(self, conn: Connection, reason: CloseReason, request_bytes: int,
                 response_bytes: int) -> None | Awaitable[None]:
        """The connection ended; its Connection is forgotten right after."""
        return None

    def describe(self) -> pb.Description:
        """The proto Description of this element, checked so a bad one fails at start."""
        directions = [int(d) for d in self.directions]
        if not set(directions) <= set(DIRECTION_OF):
            raise ValueError(f"{type(self).__name__}.directions={self.directions!r}: allowed are "
                             f"Direction.REQUEST and Direction.RESPONSE")
        if not set(self.framing) <= set(self.directions):
            raise ValueError(f"{type(self).__name__}.framing frames {sorted(d.name for d in self.framing)}, "
                             f"not all in directions={self.directions!r}: a framed direction must be received")
        # the generated stubs type enum fields as their own classes; on the wire they are ints
        return pb.Description(
            name=self.name or type(self).__name__.lower(), directions=cast("list[pb.Direction]", directions),
            wants_open=self.wants_open, mode=cast("pb.Mode", int(self.mode)), read_only=self.read_only,
            request_bytes_limit=self.request_bytes_limit, response_bytes_limit=self.response_bytes_limit,
        )


