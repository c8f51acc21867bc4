"""Accepting connections on a listening socket the proxy owns.

Why not loop.create_server: when a process runs out of file descriptors, libuv (uvloop)
accepts each waiting connection and closes it at once, so the client reads a clean EOF and
nobody hears of it. Here the proxy keeps one descriptor in reserve for that moment, answers
each waiting client with a RST (a refusal it cannot mistake for an answer), counts it, and
logs it at most once a second.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Callable

from proxy.config import HostPort
from elements.logs import fields

log = logging.getLogger("proxy")

ACCEPT_BURST = 64  # connections accepted per readiness event, so one busy listener cannot starve the loop
BACKLOG = 4096
RETRY_DELAY = 1.0  # seconds without accepting when not even the reserve descriptor is left
_OUT_OF_DESCRIPTORS = frozenset((errno.EMFILE, errno.ENFILE))
LINGER_RESET = struct.pack("ii", 1, 0)


def listening_socket(address: HostPort, reuse_port: bool) -> socket.socket:
    """A non-blocking listening socket; an IPv6 one takes IPv6 only, as create_server's does."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class AcceptedSocket(socket.socket):
    """An accepted TCP socket whose family and type are plain class attributes: socket.socket
    converts them to enums on every read, and accept(), uvloop's connect_accepted_socket and
    the original-destination lookup read them five times per connection (3% of the proxy's
    time under connection churn)."""

    type = socket.SOCK_STREAM


class AcceptedSocket4(AcceptedSocket):
    family = socket.AF_INET


class AcceptedSocket6(AcceptedSocket):
    family = socket.AF_INET6


def reset(sock: socket.socket) -> None:
    """Closes with a RST: the client cannot take a refusal for an answer."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    sock.close()


class Acceptor:
    """Accepts on one listening socket. `refusal()` is asked before each socket is handed to
    `on_accepted`: a refused client is reset at once and reported to `on_refused`."""

    def __init__(self, sock: socket.socket, refusal: Callable[[], str | None],
                 on_accepted: Callable[[socket.socket, tuple[str, int]], None],
                 on_refused: Callable[[str, tuple[str, int]], None]) -> None:
        self.sock = sock
        self.refusal = refusal
        self.on_accepted = on_accepted
        self.on_refused = on_refused
        self.serving = False
        self._accepted_class = AcceptedSocket6 if sock.family == socket.AF_INET6 else AcceptedSocket4
        self._reserve: int | None = _open_reserve()
        self._last_warning = 0.0

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._accept_ready)
        self.serving = True

    def close(self) -> None:
        """Stops accepting; connections still in the backlog are reset by the kernel."""
        if self.serving:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.serving = False
        self.sock.close()
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None

    def _accept_ready(self) -> None:
        for _ in range(ACCEPT_BURST):
            try:
                conn, client = self._accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as error:
                if error.errno not in _OUT_OF_DESCRIPTORS:
                    log.warning("accept failed", extra=fields(listener=_name(self.sock), error=str(error)))
                    return
                if not self._reset_one(error):
                    return
                continue
            why = self.refusal()
            if why is not None:
                reset(conn)
                self.on_refused(why, client[:2])
                continue
            # no setblocking(False): uvloop's transport makes the descriptor non-blocking itself
            # (libuv's uv_tcp_open), and a second ioctl per connection costs under churn
            self.on_accepted(conn, client)

    def _accept(self) -> tuple[AcceptedSocket, tuple[str, int]]:
        # socket.accept() minus its reads of family and type (under churn, per connection)
        fd, client = self.sock._accept()  # type: ignore[attr-defined]
        accepted = self._accepted_class
        return accepted(accepted.family, socket.SOCK_STREAM, 0, fd), client

    def _reset_one(self, error: OSError) -> bool:
        """Out of descriptors: frees the reserve to accept and reset one waiting client. Without
        a reserve (another thread took the slot) accepting pauses for a second instead of
        spinning. Returns whether a client was reset."""
        if self._reserve is None:
            self._warn(error, f"accepting paused {RETRY_DELAY:g} s")
            self._pause_accepting(RETRY_DELAY)
            return False
        os.close(self._reserve)
        try:
            conn, client = self._accept()
        except OSError:
            self._reserve = _open_reserve()
            return False
        reset(conn)
        self._reserve = _open_reserve()
        self.on_refused(f"out of file descriptors ({error.strerror})", client[:2])
        self._warn(error, "waiting connections reset")
        return True

    def _warn(self, error: OSError, what: str) -> None:
        """At most one warning a second: a flood of clients must not become a flood of logs."""
        now = time.monotonic()
        if now - self._last_warning >= 1.0:
            self._last_warning = now
            log.warning("out of file descriptors", extra=fields(
                listener=_name(self.sock), error=error.strerror, action=what))

    def _pause_accepting(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.sock.fileno())
        loop.call_later(seconds, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self.serving:
            if self._reserve is None:
                self._reserve = _open_reserve()
            asyncio.get_running_loop().add_reader(self.sock.fileno(), self._accept_ready)


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _name(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return str(HostPort(host, port))
