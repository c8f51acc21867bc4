"""sockaddr parsing for SO_ORIGINAL_DST (the getsockopt itself is exercised in test_redirect.py)."""

from __future__ import annotations

import socket
import struct

import pytest

from proxy.interception.origdst import SOCKADDR_IN6_SIZE, SOCKADDR_IN_SIZE, original_destination, parse_sockaddr


def sockaddr_in(ip: str, port: int) -> bytes:
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_pton(socket.AF_INET, ip) + bytes(8)


def sockaddr_in6(ip: str, port: int) -> bytes:
    return (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", port) + bytes(4)
            + socket.inet_pton(socket.AF_INET6, ip) + bytes(4))


def test_parses_ipv4_and_ipv6() -> None:
    assert parse_sockaddr(sockaddr_in("10.1.2.3", 8080)) == ("10.1.2.3", 8080)
    assert parse_sockaddr(sockaddr_in6("fd00::1", 443)) == ("fd00::1", 443)
    assert len(sockaddr_in("1.2.3.4", 1)) == SOCKADDR_IN_SIZE
    assert len(sockaddr_in6("::1", 1)) == SOCKADDR_IN6_SIZE


def test_rejects_other_families_and_short_buffers() -> None:
    with pytest.raises(ValueError, match="not a sockaddr_in"):
        parse_sockaddr(struct.pack("=H", socket.AF_UNIX) + bytes(14))
    with pytest.raises(ValueError):
        parse_sockaddr(sockaddr_in6("::1", 1)[:20])


def test_a_socket_that_was_not_redirected_has_no_original_destination() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname()):
            accepted, _ = server.accept()
            with accepted:
                assert original_destination(accepted) in (None, accepted.getsockname())
