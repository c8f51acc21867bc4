"""One proxied connection: asyncio transports on both sides of a chain.Flow.

This module does the I/O the Flow asks for and nothing else: it finds where the
client was going, dials it, feeds reads into the lanes, writes what the lanes
release, half-closes, and ends with FIN or RST. Decisions live in chain.py.

Half-close goes through shutdown(SHUT_WR) on the socket once the transport's write
buffer is empty, never transport.write_eof(): under connection churn uvloop's
write_eof path aborted the whole process (DESIGN.md, "Known hazard").
"""

from __future__ import annotations

import _socket
import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from elements.api import element_pb2 as pb
from proxy.net.acceptor import LINGER_RESET
from proxy.chain import Direction, Flow, LaneLimits, Outcome, Payload
from proxy.config import HostPort
from elements.logs import fields
from proxy.sessions.plan import Chain
from proxy.interception.origdst import original_destination

log = logging.getLogger("proxy.connection")

# Why a source is not being read; reading resumes when no reason is left.
PAUSE_FLOW = 1        # the lane holds high_water bytes
PAUSE_DEST_FULL = 2   # the other side's write buffer is full
PAUSE_STARTING = 4    # Open phase running, or the upstream is not connected yet
# Outcomes logged at info. FAILURE is one: the element's own warning says what failed, at most
# once a second, where a line per connection would flood the log while an element is stalled.
_ROUTINE_OUTCOMES = frozenset((Outcome.COMPLETED, Outcome.CLOSED_BY_ELEMENT, Outcome.PEER_RESET,
                               Outcome.RESET_BY_ELEMENT, Outcome.IDLE_TIMEOUT, Outcome.FAILURE))


def _plain_ip(host: str) -> str:
    """'::ffff:10.0.0.1' -> '10.0.0.1', so IPv4 clients of a dual-stack socket compare equal."""
    if ":" not in host:
        return host  # the kernel's dotted quad is canonical already: no parse per connection
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


def _address(host_port: tuple[str, int]) -> pb.Address:
    return pb.Address(ip=host_port[0], port=host_port[1])


async def _resolve(loop: asyncio.AbstractEventLoop, destination: HostPort) -> tuple[int, tuple[Any, ...]]:
    """The socket family and address to dial; only a host name costs a lookup."""
    if destination.is_ip:
        return (socket.AF_INET6 if ":" in destination.host else socket.AF_INET), (destination.host, destination.port)
    infos = await loop.getaddrinfo(destination.host, destination.port, type=socket.SOCK_STREAM)
    family, _, _, _, address = infos[0]
    return family, address


def _shutdown_write(sock: _socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the peer is gone; connection_lost reports it


def _half_close_transport(transport: asyncio.Transport) -> None:
    """For a socket uvloop made (the upstream): a socket object over its descriptor, detached after."""
    # shutdown() ignores the family: naming one spares socket() three getsockopt probes; the C
    # type (_socket) spares socket.socket's Python __init__ and detach, per connection
    sock = _socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, transport.get_extra_info("socket").fileno())
    try:
        _shutdown_write(sock)
    finally:
        sock.detach()


def _abort_with_rst(transport: asyncio.Transport | None) -> None:
    if transport is None or transport.is_closing():
        if transport is not None:
            transport.abort()
        return
    try:
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    except OSError:
        pass  # already closed by the kernel: abort below is all that is left to do
    transport.abort()


class _Side(asyncio.Protocol):
    """The asyncio protocol of one socket; `reads` is the lane its bytes feed."""

    __slots__ = ("conn", "reads", "lane")

    def __init__(self, conn: Connection, reads: Direction) -> None:
        self.conn = conn
        self.reads = reads
        self.lane = conn.flow.lane(reads)

    def data_received(self, data: bytes) -> None:
        self.conn.last_active = time.monotonic()
        self.lane.feed(data)

    def eof_received(self) -> bool:
        self.lane.feed_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.side_lost(self.reads, exc)

    def pause_writing(self) -> None:
        self.conn.pause(_other(self.reads), PAUSE_DEST_FULL)

    def resume_writing(self) -> None:
        self.conn.writable_again(self.reads)


@dataclass(frozen=True, slots=True)
class ConnectionContext:
    """What a connection needs of its worker, and no way back into it: the worker builds one and
    replaces it when a reload swaps the chain (a connection keeps the one it started with)."""

    loop: asyncio.AbstractEventLoop
    next_id: Callable[[], str]
    chain: Chain
    limits: LaneLimits
    target: HostPort | None
    connect_timeout_ms: int
    upstream_mark: int
    opened: Callable[[Connection], None]
    closed: Callable[[Connection, Outcome], None]


class ClientSide(_Side):
    """Accepted socket (the worker refused it already if it had to): creating the Connection
    is all connection_made does."""

    def __init__(self, context: ConnectionContext, accepted: Accepted) -> None:
        self.context = context
        self.accepted = accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.reads = Direction.REQUEST
        self.conn = Connection(self.context, self.accepted, cast(asyncio.Transport, transport))
        self.lane = self.conn.flow.request
        self.conn.start()
        if self.conn.paused[Direction.REQUEST]:
            self.conn.loop.call_soon(self.conn.reassert_pauses)


class UpstreamSide(_Side):
    """Dialed socket: the response lane reads it."""

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn, Direction.RESPONSE)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn.upstream_made(cast(asyncio.Transport, transport))
        if self.conn.paused[Direction.RESPONSE]:
            self.conn.loop.call_soon(self.conn.reassert_pauses)


def _other(direction: Direction) -> Direction:
    return Direction.RESPONSE if direction == Direction.REQUEST else Direction.REQUEST


class Accepted:
    """What the acceptor learnt from the socket it accepted, so the transport need not be asked:
    uvloop answers get_extra_info("socket").getsockopt() through a new Python socket object
    each time (SO_ORIGINAL_DST that way was 6% of the proxy's time under connection churn).
    A plain slots class: a frozen dataclass's __init__ costs an object.__setattr__ per field."""

    __slots__ = ("sock", "listener", "client")

    def __init__(self, sock: socket.socket, listener: HostPort, client: tuple[str, int]) -> None:
        self.sock = sock  # kept by the transport until it closes, usable for shutdown() until then
        self.listener = listener
        self.client = (_plain_ip(client[0]), client[1])

    def redirected_to(self) -> HostPort | None:
        """The client's original destination, unless it is this proxy itself (no redirect)."""
        original = original_destination(self.sock)
        if original is None:
            return None
        host, port = _plain_ip(original[0]), original[1]
        own = self.sock.getsockname()
        if (host, port) == (_plain_ip(own[0]), own[1]):
            return None
        return HostPort(original[0], port)


class Connection:
    """The flow's socket side (chain.SocketSide) with real sockets, and the connection as its
    elements are told about it (chain.Peer)."""

    def __init__(self, context: ConnectionContext, accepted: Accepted, client: asyncio.Transport) -> None:
        self.context = context
        self.loop = context.loop
        self.id = context.next_id()
        self.accepted = accepted
        self.client: asyncio.Transport = client
        self.upstream: asyncio.Transport | None = None
        self.chain = context.chain
        self.chain.acquire()
        self.request_bytes = 0
        self.response_bytes = 0
        self.flow: Flow = Flow(self.chain.plan, context.limits, self, self.chain.ports, self)
        self.paused = {Direction.REQUEST: 0, Direction.RESPONSE: PAUSE_STARTING}
        self.eof_after_drain: set[Direction] = set()
        self.early: list[Payload] = []
        self.early_bytes = 0
        self.early_eof = False
        self.started = self.last_active = time.monotonic()
        self.destination: HostPort | None = None
        self.dial_task: asyncio.Task[None] | None = None
        self.dial_timed_out = False

    def start(self) -> None:
        """Without Open stages the client is read while the upstream is dialed: what the chain
        releases meanwhile waits in `early` (bounded by high_water), so no pause, no resume."""
        if self.chain.plan.open:
            self.pause(Direction.REQUEST, PAUSE_STARTING)
        self.context.opened(self)
        redirected_to = self.accepted.redirected_to()
        if redirected_to is not None:
            self.destination = redirected_to
        elif self.context.target is not None:
            self.destination = self.context.target
        else:
            self._log_open()
            self.flow.end(Outcome.NOT_REDIRECTED, "not redirected (its original destination is the proxy's own "
                                         "address) and TARGET_ADDR is unset: the proxy never dials itself")
            return
        self._log_open()
        self.flow.start()

    def where(self) -> str:
        """The destination for logs and /connections; none when the connection was not
        redirected and TARGET_ADDR is unset (it is reset, never dialed)."""
        return str(self.destination) if self.destination is not None else "none (not redirected)"

    def describe(self) -> dict[str, object]:
        """One row of the admin endpoint's /connections."""
        return {"id": self.id, "client": str(HostPort(*self.accepted.client)), "destination": self.where(),
                "listener": str(self.accepted.listener), "request_bytes": self.request_bytes,
                "response_bytes": self.response_bytes, "age_s": round(time.monotonic() - self.started, 3)}

    def _log_open(self) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            return
        log.debug("connection opened", extra=fields(
            conn=self.id, client=str(HostPort(*self.accepted.client)), destination=self.where(),
            listener=str(self.accepted.listener)))

    # --- chain.Peer ---------------------------------------------------------------------

    def open_event(self, metadata: Mapping[str, str], resumed: bool) -> pb.OpenEvent:
        """The Open event for this connection; a resumed one carries the bytes written so far."""
        destination = self.destination
        assert destination is not None
        event = pb.OpenEvent(connection_id=self.id, client=_address(self.accepted.client),
                             original_destination=pb.Address(ip=destination.host, port=destination.port),
                             listener=pb.Address(ip=self.accepted.listener.host, port=self.accepted.listener.port),
                             metadata=metadata)
        if resumed:
            event.resumed = True
            event.request_bytes = self.request_bytes
            event.response_bytes = self.response_bytes
        return event

    # --- chain.SocketSide ---------------------------------------------------------------

    def writer(self, direction: Direction) -> Callable[[Payload], None]:
        return self._write_request if direction == Direction.REQUEST else self._write_response

    def _write_request(self, data: Payload) -> None:
        self.request_bytes += len(data)
        if self.upstream is None:
            self.early.append(data)
            self.early_bytes += len(data)
            if self.early_bytes >= self.context.limits.high_water:
                self.pause(Direction.REQUEST, PAUSE_STARTING)
            return
        self.upstream.write(data)

    def _write_response(self, data: Payload) -> None:
        self.response_bytes += len(data)
        self.client.write(data)

    def write_eof(self, direction: Direction) -> None:
        transport = self.upstream if direction == Direction.REQUEST else self.client
        if transport is None:
            self.early_eof = True
        elif transport.get_write_buffer_size() == 0:
            self._half_close(direction, transport)
        else:
            self.eof_after_drain.add(direction)
            transport.set_write_buffer_limits(high=0, low=0)

    def set_reading(self, direction: Direction, reading: bool) -> None:
        if reading:
            self.resume(direction, PAUSE_FLOW)
        else:
            self.pause(direction, PAUSE_FLOW)

    def dial(self) -> None:
        self.dial_task = self.loop.create_task(self._dial())

    def finish(self, outcome: Outcome, detail: str) -> None:
        if self.dial_task is not None and not self.dial_task.done():
            self.dial_task.cancel()
        if outcome.graceful:
            for transport in (self.client, self.upstream):
                if transport is not None:
                    transport.close()
        else:
            _abort_with_rst(self.client)
            _abort_with_rst(self.upstream)
        self.context.closed(self, outcome)
        self.chain.release()
        level = logging.INFO if outcome in _ROUTINE_OUTCOMES else logging.WARNING
        if not log.isEnabledFor(level):
            return
        log.log(level, "connection closed", extra=fields(
            conn=self.id, outcome=outcome.name.lower(), detail=detail or None,
            client=str(HostPort(*self.accepted.client)), destination=self.where(),
            request_bytes=self.request_bytes, response_bytes=self.response_bytes,
            duration_ms=round((time.monotonic() - self.started) * 1000, 1)))

    # --- transport events -------------------------------------------------------------

    async def _dial(self) -> None:
        """Dials the destination; the connect timeout is a plain timer that cancels this task
        (asyncio.timeout cost 4% of the proxy's time under connection churn)."""
        destination = self.destination
        assert destination is not None
        context = self.context
        loop = self.loop
        sock: socket.socket | None = None
        timer = loop.call_later(context.connect_timeout_ms / 1000, self._dial_expired)
        try:
            if not context.upstream_mark:
                await loop.create_connection(lambda: UpstreamSide(self), destination.host, destination.port)
                return
            family, address = await _resolve(loop, destination)
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, context.upstream_mark)
            await loop.sock_connect(sock, address)
            timer.cancel()
            await loop.create_connection(lambda: UpstreamSide(self), sock=sock)
        except asyncio.CancelledError:
            if sock is not None and self.upstream is None:
                sock.close()
            if not self.dial_timed_out:
                raise
            self.flow.end(Outcome.UPSTREAM_UNREACHABLE, f"dialing {destination} failed: timed out")
        except OSError as error:
            if sock is not None:
                sock.close()
            self.flow.end(Outcome.UPSTREAM_UNREACHABLE,
                            f"dialing {destination} failed: {error.strerror or str(error)}")
        finally:
            timer.cancel()

    def _dial_expired(self) -> None:
        if self.dial_task is not None and not self.dial_task.done():
            self.dial_timed_out = True
            self.dial_task.cancel()

    def _half_close(self, direction: Direction, transport: asyncio.Transport) -> None:
        if direction == Direction.RESPONSE:
            _shutdown_write(self.accepted.sock)
        else:
            _half_close_transport(transport)

    def upstream_made(self, transport: asyncio.Transport) -> None:
        """The upstream answered: flush what the request lane released meanwhile, start reading."""
        if self.flow.ended:
            transport.abort()
            return
        self.upstream = transport
        if log.isEnabledFor(logging.DEBUG):
            local = HostPort(*transport.get_extra_info("sockname")[:2])
            log.debug("upstream connected",
                      extra=fields(conn=self.id, upstream=str(self.destination), local=str(local)))
        if self.paused[Direction.RESPONSE] & ~PAUSE_STARTING:
            transport.pause_reading()
        for data in self.early:
            transport.write(data)
        self.early.clear()
        if self.early_eof:
            self.write_eof(Direction.REQUEST)
        self.resume(Direction.RESPONSE, PAUSE_STARTING)
        self.resume(Direction.REQUEST, PAUSE_STARTING)

    def side_lost(self, reads: Direction, exc: Exception | None) -> None:
        if self.flow.ended:
            return
        side = "client" if reads == Direction.REQUEST else "upstream"
        self.flow.end(Outcome.PEER_RESET, f"{side} {'reset: ' + str(exc) if exc else 'closed'}")

    def writable_again(self, reads: Direction) -> None:
        """The socket feeding lane `reads` drained its write buffer: finish a deferred
        half-close, resume the source of the lane that writes into it."""
        written = _other(reads)
        if written in self.eof_after_drain:
            self.eof_after_drain.discard(written)
            transport = self.upstream if written == Direction.REQUEST else self.client
            if transport is not None and not transport.is_closing():
                self._half_close(written, transport)
        self.resume(written, PAUSE_DEST_FULL)

    def reassert_pauses(self) -> None:
        """uvloop starts reading a new transport once connection_made returns, whatever it asked
        for: pause again each source that has a reason to be paused."""
        for direction, reasons in self.paused.items():
            source = self.client if direction == Direction.REQUEST else self.upstream
            if reasons and source is not None and not source.is_closing():
                source.pause_reading()

    def pause(self, direction: Direction, reason: int) -> None:
        before = self.paused[direction]
        self.paused[direction] = before | reason
        if not before:
            source = self.client if direction == Direction.REQUEST else self.upstream
            if source is not None and not source.is_closing():
                source.pause_reading()

    def resume(self, direction: Direction, reason: int) -> None:
        before = self.paused[direction]
        self.paused[direction] = before & ~reason
        if before and not self.paused[direction]:
            source = self.client if direction == Direction.REQUEST else self.upstream
            if source is not None and not source.is_closing():
                source.resume_reading()
