"""The element SDK: subclass `Element`, implement a hook or two, `run()` it.

An element is a gRPC service (proto/element.proto) that judges the chunks of proxied
TCP connections. This module hides the protocol: it turns the proxy's batched
`Session` stream into per-connection hook calls in order, batches the verdicts
back, and brings the debug `Process` RPC, server reflection, health checking,
command-line options and graceful shutdown. Protobuf types stay at the edge: hooks
see `Connection`, `Chunk` and return `Verdict`s.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import inspect
import logging
import os
import signal
import socket
import sys
from collections import deque
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from elements import logs
from elements import process as process_rpc
from elements import reflection
from elements.api import element_pb2 as pb
from elements.api import element_pb2_grpc as pb_grpc

log = logging.getLogger("elements")

ELEMENT_SERVICE = pb.DESCRIPTOR.services_by_name["Element"].full_name
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_PORT = 50051
DEFAULT_GRACE = 5.0


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
_DIRECTION_OF = {int(d): d for d in Direction}


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
    """A hook's answer. Build it with Pass(), Drop(), Close() or Reset()."""

    action: Action
    data: bytes | None = None
    metadata: Mapping[str, str] | None = None


def Pass(data: bytes | None = None, metadata: Mapping[str, str] | None = None) -> Verdict:  # noqa: N802
    """Forward the chunk, or `data` in its place when given (may be empty, shorter, longer)."""
    return Verdict(Action.PASS, data, metadata)


def Drop(metadata: Mapping[str, str] | None = None) -> Verdict:  # noqa: N802
    """Discard this chunk only; the connection stays up."""
    return Verdict(Action.DROP, None, metadata)


def Close(metadata: Mapping[str, str] | None = None) -> Verdict:  # noqa: N802
    """End the connection gracefully: FIN both ways after what was read before this chunk."""
    return Verdict(Action.CLOSE, None, metadata)


def Reset(metadata: Mapping[str, str] | None = None) -> Verdict:  # noqa: N802
    """Abort the connection: RST both ways, nothing pending is written."""
    return Verdict(Action.RESET, None, metadata)


HookResult = Verdict | None | Awaitable[Verdict | None]


class Element:
    """Base class of every element: class attributes say what it wants, hooks judge.

    Each hook may be a plain function or `async def`. A hook returning None passes.
    Instances may override the class attributes in `__init__` (say, from options).
    """

    name: str = ""
    wants_open: bool = False
    mode: Mode = Mode.INLINE
    directions: tuple[Direction, ...] = (Direction.REQUEST, Direction.RESPONSE)
    request_bytes_limit: int = 0
    response_bytes_limit: int = 0

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

    def on_close(self, conn: Connection, reason: CloseReason, request_bytes: int,
                 response_bytes: int) -> None | Awaitable[None]:
        """The connection ended; its Connection is forgotten right after."""
        return None

    def describe(self) -> pb.Description:
        """The proto Description of this element, checked so a bad one fails at start."""
        directions = [int(d) for d in self.directions]
        if not set(directions) <= set(_DIRECTION_OF):
            raise ValueError(f"{type(self).__name__}.directions={self.directions!r}: allowed are "
                             f"Direction.REQUEST and Direction.RESPONSE")
        return pb.Description(
            name=self.name or type(self).__name__.lower(), directions=directions,
            wants_open=self.wants_open, mode=int(self.mode),
            request_bytes_limit=self.request_bytes_limit, response_bytes_limit=self.response_bytes_limit,
        )


class BadEvent(ValueError):
    """An event the protocol does not allow (say, a hand-written one from grpcurl): no hook sees
    it, the element answers ACTION_RESET and logs one line saying what was wrong."""


class _Tracked:
    """A connection plus the events queued behind its running async hook (None when idle)."""

    __slots__ = ("conn", "backlog")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.backlog: deque[tuple[str, Any]] | None = None


class Dispatcher:
    """Turns events of one Session stream into hook calls, and verdicts into `outbox`.

    Sync hooks run inline, with no task per event (the proxy sends ~100k events/s).
    An async hook starts one task for its connection that works through the events
    queued behind it, so a slow connection never holds up the others while each
    connection's hooks still run in order. `ready` is set when `outbox` has verdicts.
    """

    def __init__(self, element: Element, answer: bool) -> None:
        self.element = element
        self.answer = answer
        self.outbox = pb.SessionResponse()
        self.ready = asyncio.Event()
        self.closed = False
        self._connections: dict[str, _Tracked] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._async = {
            "open": element.wants_open and inspect.iscoroutinefunction(element.on_open),
            "data": inspect.iscoroutinefunction(element.on_data),
            "close": inspect.iscoroutinefunction(element.on_close),
        }

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
                    self._settle(tracked.conn, kind, body, self._call(tracked.conn, kind, body))
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
                result = self._call(tracked.conn, kind, body)
                if inspect.isawaitable(result):
                    result = await result
                self._settle(tracked.conn, kind, body, result)
            except Exception as error:
                self._fail(tracked.conn, kind, body, error)
            if self.outbox.verdicts:
                self.ready.set()
        tracked.backlog = None

    def _call(self, conn: Connection, kind: str, body: Any) -> Any:
        element = self.element
        if kind == "data":
            metadata = dict(body.metadata) if body.metadata else {}
            if metadata:
                conn.metadata.update(metadata)
            direction = _DIRECTION_OF.get(body.direction)
            if direction is None:
                raise BadEvent(f"direction {body.direction} is neither DIRECTION_REQUEST ({pb.DIRECTION_REQUEST}) "
                               f"nor DIRECTION_RESPONSE ({pb.DIRECTION_RESPONSE})")
            chunk = Chunk(body.sequence, direction, body.data, body.end_of_stream, metadata)
            return element.on_data(conn, chunk)
        if kind == "open":
            conn.client = Address(body.client.ip, body.client.port)
            conn.original_destination = Address(body.original_destination.ip, body.original_destination.port)
            conn.listener = Address(body.listener.ip, body.listener.port)
            conn.resumed = body.resumed
            conn.request_bytes, conn.response_bytes = body.request_bytes, body.response_bytes
            conn.metadata.update(body.metadata)
            return element.on_open(conn) if element.wants_open else None
        return element.on_close(conn, _close_reason(body.reason), body.request_bytes, body.response_bytes)

    def _settle(self, conn: Connection, kind: str, body: Any, result: Any) -> None:
        if kind == "close":
            self._connections.pop(conn.id, None)
        elif self.answer and (kind == "data" or self.element.wants_open):
            if result is None:
                self.outbox.verdicts.add(connection_id=conn.id, sequence=_sequence(kind, body),
                                         action=pb.ACTION_PASS)
            elif isinstance(result, Verdict):
                self.outbox.verdicts.add(connection_id=conn.id, sequence=_sequence(kind, body),
                                         action=int(result.action), data=result.data, metadata=result.metadata)
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


def _sequence(kind: str, body: Any) -> int:
    return body.sequence if kind == "data" else 0


def _close_reason(value: int) -> CloseReason:
    try:
        return CloseReason(value)
    except ValueError:
        return CloseReason.UNSPECIFIED


class _Servicer(pb_grpc.ElementServicer):
    """The Element service of one element; `stopping` ends every Session cleanly."""

    def __init__(self, element: Element, stopping: asyncio.Event) -> None:
        self.element = element
        self.stopping = stopping

    async def Session(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:  # noqa: N802
        dispatcher = Dispatcher(self.element, answer=self.element.mode != Mode.OBSERVE)
        reader = asyncio.create_task(_read(request_iterator, dispatcher))
        writer = asyncio.create_task(_write(context, dispatcher))
        stopping = asyncio.create_task(self.stopping.wait())
        try:
            await asyncio.wait({reader, writer, stopping}, return_when=asyncio.FIRST_COMPLETED)
            # Cancelling the reader loses no event: a batch is fed between two awaits.
            reader.cancel()
            (read_error,) = await asyncio.gather(reader, return_exceptions=True)
            if isinstance(read_error, Exception):
                log.warning("element %s: session read failed: %r", self.element.describe().name, read_error)
            await dispatcher.drain()
            dispatcher.closed = True
            dispatcher.ready.set()
            await writer
        finally:
            for task in (reader, writer, stopping):
                task.cancel()
            dispatcher.cancel()

    async def Describe(self, request: pb.DescribeRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> pb.Description:
        return self.element.describe()

    async def Process(self, request: pb.ProcessRequest,  # noqa: N802
                      context: grpc.aio.ServicerContext) -> pb.ProcessResponse:
        try:
            return await process(self.element, request)
        except process_rpc.BadProcessRequest as error:
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            context.set_details(str(error))
            return pb.ProcessResponse()


async def _read(request_iterator: Any, dispatcher: Dispatcher) -> None:
    async for request in request_iterator:
        dispatcher.feed(request.events)


async def _write(context: grpc.aio.ServicerContext, dispatcher: Dispatcher) -> None:
    """The stream's one writer: sends whatever verdicts gathered meanwhile as one message.

    `closed` is read before the outbox is taken: verdicts added while a write was awaited
    (the last hooks finishing as the stream ends) must still go out in one more message."""
    while True:
        await dispatcher.ready.wait()
        dispatcher.ready.clear()
        closed = dispatcher.closed
        response = dispatcher.take()
        if response.verdicts:
            await context.write(response)
        if closed:
            return


async def process(element: Element, request: pb.ProcessRequest) -> pb.ProcessResponse:
    """Runs the element on one throw-away connection: Open, the chunks, Close (elements/process.py).
    Raises BadProcessRequest for a request no connection could produce."""
    opening = process_rpc.open_event(request)
    chunks = process_rpc.data_events(request, opening.connection_id)
    dispatcher = Dispatcher(element, answer=True)
    dispatcher.feed([pb.Event(open=opening), *(pb.Event(data=chunk) for chunk in chunks)])
    await dispatcher.drain()
    verdicts = list(dispatcher.take().verdicts)
    dispatcher.feed([pb.Event(close=process_rpc.close_event(opening.connection_id, chunks, verdicts))])
    await dispatcher.drain()
    return process_rpc.response(request, chunks, verdicts)


def _listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class CannotServe(Exception):
    """The element could not listen where it was told to; the message says where and why."""


def _why_not_bound(host: str, port: int) -> str:
    """gRPC says only "Failed to bind": a plain bind on the same address tells why."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.strerror or str(error)
    return "gRPC could not bind it (GRPC_VERBOSITY=debug says why)"


async def serve_async(element: Element, host: str = "0.0.0.0", port: int = DEFAULT_PORT,
                      grace: float = DEFAULT_GRACE) -> None:
    """Serves until SIGTERM/SIGINT, then reports NOT_SERVING, ends sessions and stops within `grace`."""
    name = element.describe().name
    server = grpc.aio.server(options=[
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # gRPC binds with SO_REUSEPORT by default: a second element started on a taken port
        # would silently take half of the proxy's sessions (a passthrough beside a firewall).
        ("grpc.so_reuseport", 0),
    ])
    stopping = asyncio.Event()
    pb_grpc.add_ElementServicer_to_server(_Servicer(element, stopping), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.add_to_server(server, [ELEMENT_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name],
                             [*reflection.with_comments(), *reflection.described(health_pb2)])
    try:
        bound = server.add_insecure_port(_listen_address(host, port))
    except RuntimeError as error:
        raise CannotServe(f"element {name}: cannot listen on {_listen_address(host, port)} (--host / --port): "
                          f"{_why_not_bound(host, port)}") from error
    await server.start()
    await health.set(ELEMENT_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("element %s serving on %s:%d", name, host, bound)
    await stop.wait()
    log.info("element %s stopping, grace %.1fs", name, grace)
    await health.enter_graceful_shutdown()
    stopping.set()
    await server.stop(grace)
    log.info("element %s stopped", name)


def serve(element: Element, host: str = "0.0.0.0", port: int = DEFAULT_PORT,
          grace: float = DEFAULT_GRACE) -> None:
    """Blocks serving `element` (on uvloop when installed) until SIGTERM or SIGINT."""
    try:
        import uvloop
    except ImportError:
        runner = asyncio.Runner()
    else:
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    with runner:
        runner.run(serve_async(element, host, port, grace))


def port_number(text: str) -> int:
    """argparse type for a TCP port, so a bad one is reported with its option and value."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return port


def _listen_port(text: str) -> int:
    return 0 if text == "0" else port_number(text)


def _from_env(parser: argparse.ArgumentParser, name: str, default: str, allowed: tuple[str, ...]) -> str:
    """An option's default from the environment; argparse checks choices only of given options."""
    value = os.environ.get(name, default).lower()
    if value not in allowed:
        parser.error(f"{name}={value!r}: allowed are {', '.join(allowed)}")
    return value


def run(element_class: type[Element], argv: list[str] | None = None) -> None:
    """The `python -m elements.<name>` entry point: options, logging, then `serve`."""
    module = sys.modules[element_class.__module__]
    spec = getattr(module, "__spec__", None)
    parser = argparse.ArgumentParser(prog=f"python -m {spec.name if spec else module.__name__}",
                                     description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=_listen_port, default=DEFAULT_PORT,
                        help="port to listen on, 0 for any (default: %(default)s)")
    parser.add_argument("--log-level", default=_from_env(parser, "LOG_LEVEL", "info", logs.LOG_LEVELS),
                        choices=logs.LOG_LEVELS, help="default: $LOG_LEVEL or info")
    parser.add_argument("--log-format", default=_from_env(parser, "LOG_FORMAT", "console", logs.LOG_FORMATS),
                        choices=logs.LOG_FORMATS,
                        help="console or json, the proxy's formats (default: $LOG_FORMAT or console)")
    element_class.add_arguments(parser)
    args = parser.parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    try:
        element = element_class.from_args(args)
        element.describe()
    except ValueError as err:
        parser.error(str(err))
    try:
        serve(element, args.host, args.port)
    except CannotServe as error:
        log.error("%s", error)
        sys.exit(1)
