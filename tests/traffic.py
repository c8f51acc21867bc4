"""Byte-exact traffic for tests: a server and a client that prove every byte arrived.

Every reply ends with a 64-byte trailer: sha256 of what the server sent, then sha256
of what it received. The client checks both against what it sent and what it read,
so a transfer is verified in-band, through any proxy, in any namespace, with no log
parsing. Runs in-process (threads) or as `python -m tests.traffic` inside a netns.

    serve --listen HOST:PORT --mode exchange|after-eof|echo --send N
    dial HOST:PORT --send N      (prints one JSON line, exit 0 when verified)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import threading
from dataclasses import asdict, dataclass

TRAILER = 64
READ_SIZE = 1 << 20


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def split_host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def read_all(sock: socket.socket, into: bytearray | None = None) -> tuple[int, bytes, bytes]:
    """Reads to EOF: (byte count, sha256, the bytes when `into` is given)."""
    digest = hashlib.sha256()
    count = 0
    while data := sock.recv(READ_SIZE):
        digest.update(data)
        count += len(data)
        if into is not None:
            into += data
    return count, digest.digest(), bytes(into or b"")


def _send_quietly(conn: socket.socket, payload: bytes) -> None:
    try:
        conn.sendall(payload)
    except OSError:
        pass  # the reader sees the same failure; it decides


def _handle(conn: socket.socket, mode: str, send: int) -> None:
    with conn:
        try:
            if mode == "echo":
                while data := conn.recv(READ_SIZE):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
                return
            payload = os.urandom(send)
            if mode == "exchange":
                writer = threading.Thread(target=_send_quietly, args=(conn, payload), daemon=True)
                writer.start()
                _, received_sha, _ = read_all(conn)
                writer.join()
            else:
                _, received_sha, _ = read_all(conn)
                conn.sendall(payload)
            conn.sendall(hashlib.sha256(payload).digest() + received_sha)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # a reset connection is the test's to judge, from the client's side


class Server:
    """A threaded server; `with Server(...) as s:` listens on s.port until the block ends."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, mode: str = "exchange", send: int = 0) -> None:
        self.mode = mode
        self.send = send
        self.sock = socket.socket(_family(host), socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(1024)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=_handle, args=(conn, self.mode, self.send), daemon=True).start()

    def __enter__(self) -> "Server":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@dataclass
class Result:
    ok: bool
    sent: int
    received: int
    detail: str


def dial(host: str, port: int, send: int, timeout: float = 30.0, pieces: int = 1,
         source: socket.socket | None = None) -> Result:
    """Sends `send` random bytes (in `pieces` writes), half-closes, reads to EOF, checks the trailer."""
    payload = os.urandom(send)
    try:
        sock = source or socket.create_connection((host, port), timeout=timeout)
    except OSError as error:
        return Result(False, send, 0, f"connect failed: {error}")
    sock.settimeout(timeout)
    with sock:
        def write() -> None:
            step = max(1, -(-send // pieces))
            for offset in range(0, send, step):
                sock.sendall(payload[offset:offset + step])
            sock.shutdown(socket.SHUT_WR)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        body = bytearray()
        try:
            read_all(sock, body)
        except OSError as error:
            return Result(False, send, len(body), f"read failed: {error}")
        writer.join(timeout)
    if len(body) < TRAILER:
        return Result(False, send, len(body), "reply shorter than its trailer")
    reply, sent_sha, received_sha = body[:-TRAILER], body[-TRAILER:-32], body[-32:]
    if hashlib.sha256(reply).digest() != sent_sha:
        return Result(False, send, len(reply), "server->client bytes differ")
    if hashlib.sha256(payload).digest() != received_sha:
        return Result(False, send, len(reply), "client->server bytes differ")
    return Result(True, send, len(reply), "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve")
    serve.add_argument("--listen", required=True)
    serve.add_argument("--mode", choices=("exchange", "after-eof", "echo"), default="exchange")
    serve.add_argument("--send", type=int, default=0)
    client = commands.add_parser("dial")
    client.add_argument("address")
    client.add_argument("--send", type=int, default=0)
    client.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    if args.command == "serve":
        host, port = split_host_port(args.listen)
        with Server(host, port, args.mode, args.send) as server:
            print(json.dumps({"ready": server.port}), flush=True)
            threading.Event().wait()
        return 0
    host, port = split_host_port(args.address)
    result = dial(host, port, args.send, args.timeout)
    print(json.dumps(asdict(result)), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
