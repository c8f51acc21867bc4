"""The demo application of the compose stack: a line server.

    python /demo/app.py --port 7000 --name app

Answers every line with `<name> got: <line>` and logs each line it receives with the
connection's peer and local address. Behind the sidecar the peer is the proxy, which
dials from the app's own network namespace: peer IP == local IP. A connection that
reaches the app straight from the client would show the client's IP instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=7000)
    parser.add_argument("--name", default="app", help="prefix of replies and log lines")
    args = parser.parse_args()

    def show(sockname: tuple) -> str:
        return f"{sockname[0]}:{sockname[1]}"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        where = f"peer={show(writer.get_extra_info('peername'))} local={show(writer.get_extra_info('sockname'))}"
        lines = 0
        try:
            while line := await reader.readline():
                lines += 1
                text = line.rstrip(b"\r\n").decode(errors="replace")
                print(f"{args.name}: {where} line={text!r}", flush=True)
                writer.write(f"{args.name} got: {text}\n".encode())
                await writer.drain()
            print(f"{args.name}: {where} closed after {lines} line(s)", flush=True)
        except ConnectionError as error:
            print(f"{args.name}: {where} {type(error).__name__} after {lines} line(s)", flush=True)
        finally:
            with contextlib.suppress(ConnectionError):
                writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(handle, args.host, args.port)
        print(f"{args.name}: listening on {args.host}:{args.port}", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
