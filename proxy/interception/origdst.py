"""Where a redirected connection was going: one getsockopt on the accepted socket.

iptables REDIRECT rewrites the destination; conntrack remembers the original, and
SO_ORIGINAL_DST (IPv4, a sockaddr_in) or IP6T_SO_ORIGINAL_DST (IPv6, a
sockaddr_in6) reads it back. An IPv4 client on a dual-stack [::] listener is an
IPv4 connection to conntrack, so both levels are tried.
"""

from __future__ import annotations

import socket
import struct
from typing import Protocol

SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
SOL_IPV6 = 41
SOCKADDR_IN_SIZE = 16
SOCKADDR_IN6_SIZE = 28


class SockOpts(Protocol):
    @property
    def family(self) -> int: ...

    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...


def parse_sockaddr(raw: bytes) -> tuple[str, int]:
    """Decodes a sockaddr_in or sockaddr_in6 as the kernel returns it (port in network order)."""
    family = struct.unpack_from("=H", raw)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET and len(raw) >= SOCKADDR_IN_SIZE:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6 and len(raw) >= SOCKADDR_IN6_SIZE:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raise ValueError(f"not a sockaddr_in/sockaddr_in6: family {family}, {len(raw)} bytes")


def original_destination(sock: SockOpts) -> tuple[str, int] | None:
    """The pre-NAT destination, or None when conntrack has none (the connection was not redirected)."""
    if sock.family == socket.AF_INET6:
        try:
            return parse_sockaddr(sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, SOCKADDR_IN6_SIZE))
        except OSError:
            pass  # an IPv4 client of a dual-stack listener: conntrack knows it at the IPv4 level
    try:
        return parse_sockaddr(sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_SIZE))
    except OSError:
        return None
