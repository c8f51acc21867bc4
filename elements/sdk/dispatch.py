"""One Session stream's events turned into hook calls in order, and the verdicts gathered back."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Iterable
from typing import Any

from elements.api import element_pb2 as pb
from elements.sdk.element import DIRECTION_OF, Action, Address, Chunk, CloseReason, Connection, Direction, Element, Verdict
from elements.sdk.framing import FramingError, Judged, Stream

log = logging.getLogger("elements")


class BadEvent(ValueError):
    """An event the protocol does not allow (say, a hand-written one from grpcurl): no hook sees
    it, the element answers ACTION_RESET and logs one line saying what was wrong."""


class _Tracked:
    """A connection plus the events queued behind its running async hook (None when idle), its framed
    directions' streams, and the directions its element said `done` to (their chunks pass unseen)."""

    __slots__ = ("conn", "backlog", "streams", "done")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.backlog: deque[tuple[str, Any]] | None = None
        self.streams: dict[Direction, Stream] | None = None
        self.done: set[Direction] | None = None


_ENDS = (Action.CLOSE, Action.RESET)
# A connection under way before this session began: what came before is unknown.
_RESUMED = ("the connection was under way when this element's session began (resumed): where its "
            "messages start is unknown")


class Dispatcher:
    """Turns events of one Session stream into hook calls, and verdicts into `outbox`.

    Sync hooks run inline, with no task per event (the proxy sends ~100k events/s).
    An async hook starts one task for its connection that works through the events
    queued behind it, so a slow connection never holds up the others while each
    connection's hooks still run in order. `ready` is set when `outbox` has verdicts.
    """

    def __init__(self, element: Element, answer: bool, changes_only: bool = False) -> None:
        self.element = element
        self.answer = answer
        # the proxy asked for changes only (`element-proxy-verdicts: changes`, proto rpc Session):
        # it never waits for these verdicts, so a plain PASS is left out
        self.changes_only = changes_only
        self.outbox = pb.SessionResponse()
        self.ready = asyncio.Event()
        self.closed = False
        self._connections: dict[str, _Tracked] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        framed_async = bool(element.framing) and (inspect.iscoroutinefunction(element.on_message)
                                                   or inspect.iscoroutinefunction(element.on_framing_error))
        self._async = {
            "open": element.wants_open and inspect.iscoroutinefunction(element.on_open),
            "data": inspect.iscoroutinefunction(element.on_data) or framed_async,
            "close": inspect.iscoroutinefunction(element.on_close),
        }
        self._framed_async = framed_async

    @property
    def open_connections(self) -> int:
        """Connections of this stream that had an event and no Close yet (what a drain waits for)."""
        return len(self._connections)

    def feed(self, events: Iterable[pb.Event]) -> None:
        """Handles one batch: sync hooks now, async ones in their connection's task."""
        for event in events:
            kind = event.WhichOneof("event")
            if kind is None:
                continue
            body = getattr(event, kind)
            tracked = self._connections.get(body.connection_id)
            if tracked is None:
                tracked = self._connections[body.connection_id] = _Tracked(Connection(body.connection_id))
            if tracked.backlog is not None:
                tracked.backlog.append((kind, body))
            elif self._async[kind]:
                tracked.backlog = deque([(kind, body)])
                task = asyncio.get_running_loop().create_task(self._work(tracked))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                try:
                    self._settle(tracked, kind, body, self._call(tracked, kind, body))
                except Exception as error:
                    self._fail(tracked.conn, kind, body, error)
        if self.outbox.verdicts:
            self.ready.set()

    async def drain(self) -> None:
        """Waits until every async hook started so far has finished."""
        while self._tasks:
            await asyncio.gather(*self._tasks)

    def cancel(self) -> None:
        """Stops the running async hooks (the stream is gone, nobody reads their verdicts)."""
        for task in self._tasks:
            task.cancel()

    def take(self) -> pb.SessionResponse:
        """Hands over the verdicts gathered so far and starts a new batch."""
        response, self.outbox = self.outbox, pb.SessionResponse()
        return response

    async def _work(self, tracked: _Tracked) -> None:
        backlog = tracked.backlog
        assert backlog is not None
        while backlog:
            kind, body = backlog.popleft()
            try:
                result = self._call(tracked, kind, body)
                if inspect.isawaitable(result):
                    result = await result
                self._settle(tracked, kind, body, result)
            except Exception as error:
                self._fail(tracked.conn, kind, body, error)
            if self.outbox.verdicts:
                self.ready.set()
        tracked.backlog = None

    def _call(self, tracked: _Tracked, kind: str, body: Any) -> Any:
        element = self.element
        conn = tracked.conn
        if kind == "data":
            return self._data(tracked, body)
        if kind == "open":
            conn.client = Address(body.client.ip, body.client.port)
            conn.original_destination = Address(body.original_destination.ip, body.original_destination.port)
            conn.listener = Address(body.listener.ip, body.listener.port)
            conn.resumed = body.resumed
            conn.request_bytes, conn.response_bytes = body.request_bytes, body.response_bytes
            conn.metadata.update(body.metadata)
            return element.on_open(conn) if element.wants_open else None
        return element.on_close(conn, _close_reason(body.reason), body.request_bytes, body.response_bytes)

    def _data(self, tracked: _Tracked, body: Any) -> Any:
        conn = tracked.conn
        metadata = dict(body.metadata) if body.metadata else {}
        if metadata:
            conn.metadata.update(metadata)
        direction = DIRECTION_OF.get(body.direction)
        if direction is None:
            raise BadEvent(f"direction {body.direction} is neither DIRECTION_REQUEST ({pb.DIRECTION_REQUEST}) "
                           f"nor DIRECTION_RESPONSE ({pb.DIRECTION_RESPONSE})")
        if tracked.done and direction in tracked.done:
            return None  # sent before the proxy learnt of `done`: it passes, unseen
        chunk = Chunk(body.sequence, direction, body.data, body.end_of_stream, metadata)
        if self.element.framing and direction in self.element.framing:
            return self._framed(tracked, chunk)
        return self.element.on_data(conn, chunk)

    def _framed(self, tracked: _Tracked, chunk: Chunk) -> Verdict | Awaitable[Verdict]:
        """A chunk of a framed direction: its messages to on_message, their verdicts to one for the chunk."""
        stream = self._stream(tracked, chunk.direction)
        judged = stream.scan(chunk.data, chunk.end_of_stream)
        if self._framed_async:
            return self._judged_async(tracked.conn, stream, judged, chunk.end_of_stream)
        verdicts: list[Verdict | None] = []
        for item in judged:
            verdict = self._judge(tracked.conn, item)
            verdicts.append(verdict)
            if verdict is not None and (verdict.done or verdict.action in _ENDS):
                break
        return stream.settle(verdicts, chunk.end_of_stream)

    def _stream(self, tracked: _Tracked, direction: Direction) -> Stream:
        """The connection's stream of a framed direction, made on its first chunk."""
        streams = tracked.streams
        if streams is None:
            streams = tracked.streams = {}
        stream = streams.get(direction)
        if stream is None:
            conn = tracked.conn
            written = conn.request_bytes if direction == Direction.REQUEST else conn.response_bytes
            stream = streams[direction] = Stream(self.element.framing[direction](), direction,
                                                 _RESUMED if conn.resumed and written else "")
        return stream

    async def _judged_async(self, conn: Connection, stream: Stream, judged: list[Judged],
                            end_of_stream: bool) -> Verdict:
        verdicts: list[Verdict | None] = []
        for item in judged:
            verdict = self._judge(conn, item)
            if inspect.isawaitable(verdict):
                verdict = await verdict
            verdicts.append(verdict)
            if verdict is not None and (verdict.done or verdict.action in _ENDS):
                break
        return stream.settle(verdicts, end_of_stream)

    def _judge(self, conn: Connection, item: Judged) -> Any:
        if isinstance(item, FramingError):
            return self.element.on_framing_error(conn, item)
        return self.element.on_message(conn, item)

    def _settle(self, tracked: _Tracked, kind: str, body: Any, result: Any) -> None:
        conn = tracked.conn
        if kind == "close":
            self._connections.pop(conn.id, None)
        elif self.answer and (kind == "data" or self.element.wants_open):
            if self.changes_only and _plain_pass(result):
                return
            if result is None:
                self.outbox.verdicts.add(connection_id=conn.id, sequence=_sequence(kind, body),
                                         action=pb.ACTION_PASS)
            elif isinstance(result, Verdict):
                self.outbox.verdicts.add(connection_id=conn.id, sequence=_sequence(kind, body),
                                         action=int(result.action), data=result.data, metadata=result.metadata,
                                         reply=result.reply, done=result.done)
                if result.done:
                    done = tracked.done if tracked.done is not None else set()
                    tracked.done = done
                    done.update((DIRECTION_OF[body.direction],) if kind == "data" else Direction)
            else:
                raise TypeError(f"on_{kind} returned {type(result).__name__}; expected a Verdict or None")

    def _fail(self, conn: Connection, kind: str, body: Any, error: Exception) -> None:
        """Answers RESET for an event whose hook raised (logged with its traceback, from inside
        the except block) or that the protocol does not allow (one line)."""
        if isinstance(error, BadEvent):
            log.warning("element %s: %s event %d of connection %s refused, %s; answering ACTION_RESET",
                        self.element.describe().name, kind, _sequence(kind, body), conn.id, error)
        else:
            log.exception("element %s: on_%s failed on connection %s; answering ACTION_RESET",
                          self.element.describe().name, kind, conn.id)
        if kind == "close":
            self._connections.pop(conn.id, None)
        elif self.answer and (kind == "data" or self.element.wants_open):
            self.outbox.verdicts.add(connection_id=conn.id, sequence=_sequence(kind, body),
                                     action=pb.ACTION_RESET)


def _plain_pass(result: Any) -> bool:
    """A verdict that changes nothing: None, or PASS with no data, metadata, reply or done."""
    return result is None or (isinstance(result, Verdict) and result.action == Action.PASS and result.data is None
                              and not result.metadata and not result.reply and not result.done)


def _sequence(kind: str, body: Any) -> int:
    return body.sequence if kind == "data" else 0


def _close_reason(value: int) -> CloseReason:
    try:
        return CloseReason(value)
    except ValueError:
        return CloseReason.UNSPECIFIED


