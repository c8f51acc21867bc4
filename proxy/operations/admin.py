"""The admin HTTP endpoint: /metrics, /healthz, /readyz, /config, /connections.

Loopback by default, GET only, one request per connection: operators and Prometheus
scrape it, nobody streams through it, so a few lines of asyncio beat a web framework.
With several workers the supervisor serves it and asks every worker over a unix
socket (the same routes plus /snapshot), so figures add up across workers.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from proxy.operations import metrics, stats
from proxy.config import HostPort
from proxy.operations.listen_errors import cannot_listen

log = logging.getLogger("proxy.admin")

REQUEST_TIMEOUT = 5.0
MAX_REQUEST_BYTES = 8192


class AdminSource(Protocol):
    async def snapshot(self) -> dict[str, Any]: ...

    async def connections(self) -> list[dict[str, Any]]: ...

    async def unready(self) -> list[str]: ...

    def config(self) -> dict[str, Any]: ...


Response = tuple[int, str, bytes]


def _json(status: int, value: Any) -> Response:
    return status, "application/json", json.dumps(value, indent=1).encode() + b"\n"


async def _route(source: AdminSource, path: str) -> Response:
    if path == "/metrics":
        return 200, "text/plain; version=0.0.4; charset=utf-8", metrics.render(await source.snapshot())
    if path == "/snapshot":
        return _json(200, await source.snapshot())
    if path == "/healthz":
        return 200, "text/plain", b"ok\n"
    if path == "/readyz":
        reasons = await source.unready()
        elements = (await source.snapshot()).get("elements", {})
        return _json(503 if reasons else 200, {"ready": not reasons, "reasons": reasons, "endpoints": {
            key: element.get("endpoints", {}) for key, element in elements.items()}})
    if path == "/config":
        return _json(200, source.config())
    if path == "/connections":
        return _json(200, await source.connections())
    return 404, "text/plain", b"not found; try /metrics /healthz /readyz /config /connections\n"


async def serve(source: AdminSource, address: HostPort) -> asyncio.AbstractServer:
    """Starts the endpoint; a failed bind names --admin and what to do instead."""
    try:
        return await asyncio.start_server(handler(source), address.host, address.port)
    except OSError as error:
        raise cannot_listen("serve the admin endpoint", address, "--admin / admin", error,
                            "; every proxy defaults to 127.0.0.1:15000: give each its own --admin HOST:PORT, "
                            "or --admin off") from error


def handler(source: AdminSource) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            method, _, rest = head.decode("latin-1").partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            if method != "GET":
                status, kind, body = 405, "text/plain", b"only GET\n"
            else:
                status, kind, body = await _route(source, path)
            writer.write(f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {kind}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass  # a client that hung up or sent garbage gets nothing; the next scrape is unaffected
        finally:
            writer.close()

    return handle


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


async def fetch_json(unix_path: str, path: str) -> Any:
    """GETs a JSON route from a worker's admin socket."""
    reader, writer = await asyncio.open_unix_connection(unix_path)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: worker\r\n\r\n".encode())
        response = await asyncio.wait_for(reader.read(), REQUEST_TIMEOUT)
    finally:
        writer.close()
    return json.loads(response.partition(b"\r\n\r\n")[2])


class WorkersSource:
    """The supervisor's view: every worker asked over its unix socket, figures added up."""

    def __init__(self, sockets: list[str], config: dict[str, Any]) -> None:
        self.sockets = sockets
        self._config = config

    async def _all(self, path: str) -> list[Any]:
        return await asyncio.gather(*(fetch_json(socket, path) for socket in self.sockets))

    async def snapshot(self) -> dict[str, Any]:
        return stats.merge(await self._all("/snapshot"))

    async def connections(self) -> list[dict[str, Any]]:
        return [row for rows in await self._all("/connections") for row in rows]

    async def unready(self) -> list[str]:
        try:
            answers = await self._all("/readyz")
        except (OSError, ValueError) as error:
            return [f"a worker did not answer: {error}"]
        return sorted({reason for answer in answers for reason in answer["reasons"]})

    def config(self) -> dict[str, Any]:
        return self._config


class WorkerSource:
    """A single worker's view, for its own admin endpoint or its supervisor's socket."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker

    async def snapshot(self) -> dict[str, Any]:
        return self.worker.snapshot()

    async def connections(self) -> list[dict[str, Any]]:
        return self.worker.connection_list()

    async def unready(self) -> list[str]:
        return self.worker.unready()

    def config(self) -> dict[str, Any]:
        return self.worker.effective_config()
