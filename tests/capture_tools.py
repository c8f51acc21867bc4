"""Test-only programs for interception tests, independent of the real proxy.

    forward --ports 15002,15006 [--uid U --gid G] [--mark M]
        a minimal transparent forwarder: reads SO_ORIGINAL_DST, dials it (as uid U, or
        with SO_MARK M) and copies bytes both ways, half-close included
    serve --port P
        reads a connection to EOF, answers one JSON line (peer, byte count, sha256),
        then echoes the bytes back
    dial HOST PORT [--bytes N]
        sends N random bytes, half-closes, prints one JSON line comparing hashes

`forward` and `serve` print one JSON line per event ("ready" once listening, "conn"
per connection), so a test can tell exactly which connections went where.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import struct
import sys
import threading
from collections.abc import Callable

SO_ORIGINAL_DST = 80  # same number for IPv4 (SOL_IP) and IPv6 (SOL_IPV6, IP6T_SO_ORIGINAL_DST)
SO_MARK = 36
_print_lock = threading.Lock()


def emit(**fields: object) -> None:
    with _print_lock:
        print(json.dumps(fields), flush=True)


def listen(port: int) -> list[socket.socket]:
    """One IPv4 and one IPv6-only listener, so each family's original destination is read natively."""
    sockets = []
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(128)
        sockets.append(sock)
    return sockets


def serve_forever(sockets: list[socket.socket], handle: Callable[[socket.socket, int], None]) -> None:
    """A thread per listener and per connection: plenty for a handful of test connections."""
    def accept_loop(listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=handle, args=(conn, listener.getsockname()[1]), daemon=True).start()

    threads = [threading.Thread(target=accept_loop, args=(sock,), daemon=True) for sock in sockets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def original_dst(conn: socket.socket) -> tuple[str, int]:
    if conn.family == socket.AF_INET:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # struct sockaddr_in
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack("!H", raw[2:4])[0]
    raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)  # struct sockaddr_in6
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack("!H", raw[2:4])[0]


def pump(source: socket.socket, sink: socket.socket) -> None:
    """Copies until EOF, then half-closes the sink so the other direction keeps flowing."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        for sock in (source, sink):
            sock.close()


def forward(args: argparse.Namespace) -> None:
    sockets = [sock for port in args.ports for sock in listen(port)]
    if args.gid is not None:
        os.setgroups([])
        os.setgid(args.gid)
    if args.uid is not None:
        os.setuid(args.uid)
    count = iter(range(1, sys.maxsize))

    def handle(conn: socket.socket, listener_port: int) -> None:
        n = next(count)
        orig = original_dst(conn)
        emit(event="conn", n=n, listener=listener_port, peer=list(conn.getpeername()[:2]), orig=list(orig))
        if n > args.max_conns or orig[1] == listener_port:  # a loop, or a client that dialed us directly
            conn.close()
            return
        upstream = socket.socket(conn.family, socket.SOCK_STREAM)
        if args.mark is not None:
            upstream.setsockopt(socket.SOL_SOCKET, SO_MARK, args.mark)
        upstream.settimeout(5)
        try:
            upstream.connect(orig)
        except OSError as error:
            emit(event="dial-failed", n=n, error=str(error))
            conn.close()
            upstream.close()
            return
        upstream.settimeout(None)
        threading.Thread(target=pump, args=(upstream, conn), daemon=True).start()
        pump(conn, upstream)

    emit(event="ready", uid=os.getuid())
    serve_forever(sockets, handle)


def serve(args: argparse.Namespace) -> None:
    def handle(conn: socket.socket, _listener_port: int) -> None:
        with conn:
            received = bytearray()
            while data := conn.recv(65536):
                received += data
            peer = conn.getpeername()[0]
            emit(event="conn", peer=peer, bytes=len(received))
            reply = {"peer": peer, "bytes": len(received), "sha256": hashlib.sha256(received).hexdigest()}
            conn.sendall(json.dumps(reply).encode() + b"\n" + received)

    sockets = listen(args.port)
    emit(event="ready")
    serve_forever(sockets, handle)


def dial(args: argparse.Namespace) -> None:
    payload = os.urandom(args.bytes)
    result: dict[str, object] = {"sent_sha256": hashlib.sha256(payload).hexdigest()}
    try:
        with socket.create_connection((args.host, args.port), timeout=args.timeout) as conn:
            result["local"] = conn.getsockname()[0]
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            answer = bytearray()
            while data := conn.recv(65536):
                answer += data
    except OSError as error:
        result["error"] = repr(error)
    else:
        line, _, echoed = bytes(answer).partition(b"\n")
        result["reply"] = json.loads(line) if line else None
        result["echo_sha256"] = hashlib.sha256(echoed).hexdigest()
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    forwarder = commands.add_parser("forward")
    forwarder.add_argument("--ports", type=lambda text: [int(port) for port in text.split(",")], default=[15002, 15006])
    forwarder.add_argument("--uid", type=int)
    forwarder.add_argument("--gid", type=int)
    forwarder.add_argument("--mark", type=lambda text: int(text, 0))
    forwarder.add_argument("--max-conns", type=int, default=8, help="refuse beyond this, so a loop ends quickly")
    server = commands.add_parser("serve")
    server.add_argument("--port", type=int, required=True)
    client = commands.add_parser("dial")
    client.add_argument("host")
    client.add_argument("port", type=int)
    client.add_argument("--bytes", type=int, default=256 * 1024)
    client.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    {"forward": forward, "serve": serve, "dial": dial}[args.command](args)


if __name__ == "__main__":
    main()
