"""minimal: the least a uvloop TCP forwarder can do, as a peer in the benchmark.

    python bench/min_forwarder.py --listen-port 7003 --target-port 6379

Why: element-proxy is Python on uvloop, haproxy is C. This forwarder has no chain, no
limits, no metrics, no logging, no original destination: accept, dial the one target,
copy bytes both ways, pass half-closes on. Its figures, measured in the same run, show
what the runtime itself allows; the gap between it and the empty chain is the proxy's own
cost. Not for use: it has no backpressure and no timeouts.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import socket

import uvloop


def _shutdown_write(transport: asyncio.Transport) -> None:
    """Half-close with shutdown() on the transport's socket, never write_eof() (DESIGN.md: uvloop's
    write_eof hazard under churn)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, transport.get_extra_info("socket").fileno())
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.detach()


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client.upstream_made(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def eof_received(self) -> bool:
        _shutdown_write(self.client.transport)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class Client(asyncio.Protocol):
    target: tuple[str, int]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.upstream: asyncio.Transport | None = None
        self.early: list[bytes] = []
        self.early_eof = False
        asyncio.get_running_loop().create_task(
            asyncio.get_running_loop().create_connection(lambda: Upstream(self), *self.target))

    def upstream_made(self, upstream: asyncio.Transport) -> None:
        self.upstream = upstream
        for data in self.early:
            upstream.write(data)
        if self.early_eof:
            _shutdown_write(upstream)

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.early.append(data)
        else:
            self.upstream.write(data)

    def eof_received(self) -> bool:
        if self.upstream is None:
            self.early_eof = True
        else:
            _shutdown_write(self.upstream)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def serve(listen_port: int, target_port: int) -> None:
    Client.target = ("127.0.0.1", target_port)
    server = await asyncio.get_running_loop().create_server(Client, "127.0.0.1", listen_port, backlog=4096)
    gc.freeze()  # as element-proxy does once it is ready
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen-port", type=int, required=True)
    parser.add_argument("--target-port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.listen_port, args.target_port))


if __name__ == "__main__":
    main()
