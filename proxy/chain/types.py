"""The chain's vocabulary: directions, actions, outcomes, the plan, and the two sides a flow talks to.

Values of the enums equal the proto's (tests/test_enums.py pins every one), so they go
on the wire unchanged. A flow talks to two sides and to nothing else: its sockets
(`SocketSide`, connection.py) and its elements (`ElementPort`, one per element,
sessions/session.py), each seeing the connection as a `Peer`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

# A chunk's bytes: a read, or a memoryview slice of one (cutting a big read copies nothing).
Payload = bytes | memoryview


class Direction(enum.IntEnum):
    """Values equal the proto's DIRECTION_* so they go on the wire unchanged."""

    REQUEST = 1
    RESPONSE = 2


class Action(enum.IntEnum):
    """Values equal the proto's ACTION_*; FAIL is internal: a fail-closed element failure."""

    PASS = 1
    DROP = 2
    CLOSE = 3
    RESET = 4
    HOLD = 5
    FAIL = 100


class Outcome(enum.IntEnum):
    """How a connection ended; values equal the proto's CLOSE_REASON_*. NOT_REDIRECTED is
    internal: such a connection never reaches an element."""

    COMPLETED = 1
    CLOSED_BY_ELEMENT = 2
    RESET_BY_ELEMENT = 3
    PEER_RESET = 4
    UPSTREAM_UNREACHABLE = 5
    FAILURE = 6
    IDLE_TIMEOUT = 7
    MAX_DURATION = 8
    PROXY_STOPPING = 9
    NOT_REDIRECTED = 100

    @property
    def graceful(self) -> bool:
        """Graceful outcomes end with FIN after everything approved is written; the rest with RST,
        so a cut stream is never mistaken for a complete one."""
        return self in (Outcome.COMPLETED, Outcome.CLOSED_BY_ELEMENT, Outcome.IDLE_TIMEOUT, Outcome.NOT_REDIRECTED)


@dataclass(frozen=True, slots=True)
class Stage:
    """One element's place in one direction of the chain."""

    element: int
    inline: bool = True
    byte_limit: int = 0
    # A parallel stage (consecutive inline read-only elements, see Description.read_only in the
    # proto): these elements are asked at once with `element`, in chain order after it (group.py).
    peers: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ChainPlan:
    """The stages each direction visits, computed once per chain and shared by its connections."""

    request: tuple[Stage, ...] = ()
    response: tuple[Stage, ...] = ()
    open: tuple[Stage, ...] = ()
    names: tuple[str, ...] = ()

    def name(self, element: int) -> str:
        """For log lines: which element ended a connection."""
        return self.names[element] if element < len(self.names) else f"#{element}"


@dataclass(frozen=True, slots=True)
class LaneLimits:
    """How much one direction may hold: chunks in the chain, bytes before reading pauses."""

    chunk_size: int = 65536
    window: int = 8
    high_water: int = 1 << 20


class VerdictTarget(Protocol):
    """Whoever waits for a verdict: `pos` and `seq` say which event it answers; `reply` goes back to
    the event's sender, `done` bypasses the element from then on (proto Verdict)."""

    def on_verdict(self, pos: int, seq: int, action: int, data: bytes | None,
                   metadata: Mapping[str, str] | None, reply: bytes | None = None, done: bool = False) -> None: ...


class HoldingTarget(VerdictTarget, Protocol):
    """A lane, as the session of an element that holds its chunks sees it."""

    def holder_lost(self, pos: int, action: int) -> None:
        """The element at `pos` can no longer decide what it holds: `action` (its failure policy) does."""


class FlowView(Protocol):
    """What a session needs of a flow when it announces the connection to a new session."""

    touched: set[int]
    open_metadata: dict[str, str]

    def on_resumed_verdict(self, element: int, action: int, done: bool = False) -> None: ...

    def on_late_verdict(self, element: int, action: int) -> None: ...


class Peer(Protocol):
    """The connection as its elements are told about it."""

    id: str
    request_bytes: int
    response_bytes: int

    @property
    def flow(self) -> FlowView: ...

    def open_event(self, metadata: Mapping[str, str], resumed: bool) -> Any:
        """The element.v1 OpenEvent that announces the connection (built where the addresses are)."""


class ElementPort(Protocol):
    """One element's session, as a flow uses it; `target`/`pos` route the verdict back (None: do
    not wait for it)."""

    def track(self, connection: Peer) -> None:
        """The connection is about to send the element its first event: from now on it uses the
        element (a new session of the element is told about it, and it gets the Close)."""

    def send_open(self, connection: Peer, metadata: Mapping[str, str], target: VerdictTarget | None,
                  pos: int) -> None: ...

    def send_data(self, connection_id: str, seq: int, direction: Direction, data: Payload, end_of_stream: bool,
                  metadata: Mapping[str, str] | None, target: HoldingTarget | None, pos: int) -> None: ...

    def send_close(self, connection: Peer, outcome: Outcome) -> None: ...


class SocketSide(Protocol):
    """The connection's sockets, as a flow uses them."""

    def writer(self, direction: Direction) -> Callable[[Payload], None]:
        """What writes this direction's bytes out; asked once per lane, so a chunk's way out
        skips a dispatch on its direction (the whole per-read cost of an empty chain)."""

    def write_eof(self, direction: Direction) -> None: ...

    def set_reading(self, direction: Direction, reading: bool) -> None: ...

    def dial(self) -> None: ...

    def finish(self, outcome: Outcome, detail: str) -> None: ...
