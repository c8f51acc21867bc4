"""`element-proxy demo`: the proxy with example elements in front of a local target, no root.

Starts a tiny line-echo target, the logger, firewall and rewrite elements as their own
processes (as they would be deployed), and a proxy with TARGET_ADDR pointing at the
target, all on 127.0.0.1. Then it sends a few requests through the proxy and prints
what each element did. With --keep-running it stays up so you can try `nc` and grpcurl.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator

from proxy.operations import logs
from proxy.config import ElementConfig, HostPort, ProxyConfig
from proxy.net.worker import Worker

ELEMENTS = (
    ("logger", ["--format", "console"]),
    ("firewall", ["--pattern", "DROP TABLE", "--direction", "request"]),
    ("rewrite", ["--from", "hello", "--to", "howdy", "--direction", "request"]),
)
REQUESTS = (
    (b"hello world\n", "the rewrite element turns 'hello' into 'howdy'"),
    (b"SELECT 1; DROP TABLE users;\n", "the firewall resets a connection whose bytes match 'DROP TABLE'"),
    (b"just passing through\n", "untouched bytes pass both ways"),
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _element_processes() -> Iterator[list[tuple[str, int, subprocess.Popen[bytes]]]]:
    started: list[tuple[str, int, subprocess.Popen[bytes]]] = []
    try:
        for name, options in ELEMENTS:
            port = _free_port()
            process = subprocess.Popen([sys.executable, "-m", f"elements.{name}", "--host", "127.0.0.1",
                                        "--port", str(port), "--log-level", "info", *options])
            started.append((name, port, process))
        yield started
    finally:
        for _, _, process in started:
            process.terminate()
        for _, _, process in started:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


async def _echo_target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The demo's upstream: answers every line with 'target got: <line>'."""
    with contextlib.suppress(ConnectionError):
        while line := await reader.readline():
            writer.write(b"target got: " + line)
            await writer.drain()
    writer.close()


async def _request(port: int, payload: bytes) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    try:
        reply = await asyncio.wait_for(reader.read(), 5)
        return f"reply {reply.decode(errors='replace').strip()!r}"
    except ConnectionResetError:
        return "connection reset by the proxy"
    finally:
        writer.close()


async def _demo(keep_running: bool, elements: list[tuple[str, int, subprocess.Popen[bytes]]]) -> None:
    target = await asyncio.start_server(_echo_target, "127.0.0.1", 0)
    target_port = target.sockets[0].getsockname()[1]
    proxy_port = _free_port()
    config = ProxyConfig(
        listen=(HostPort("127.0.0.1", proxy_port),), target=HostPort("127.0.0.1", target_port),
        elements=tuple(ElementConfig(f"127.0.0.1:{port}", name=name) for name, port, _ in elements),
        log_level="info")
    worker = Worker(config)
    await worker.start()
    try:
        print(f"\n== element-proxy on 127.0.0.1:{proxy_port} -> target 127.0.0.1:{target_port}; chain: "
              + " -> ".join(f"{name} (127.0.0.1:{port})" for name, port, _ in elements), flush=True)
        for payload, what in REQUESTS:
            outcome = await _request(proxy_port, payload)
            print(f"== sent {payload.decode().strip()!r}: {outcome}   ({what})", flush=True)
        await asyncio.sleep(0.2)  # lets the logger element print its close lines before the summary
        if keep_running:
            print(f"\n== try: nc 127.0.0.1 {proxy_port}\n== or:  grpcurl -plaintext -d '{{\"text\": \"hello\"}}' "
                  f"127.0.0.1:{elements[2][1]} element.v1.Element/Process\n== Ctrl-C stops the demo", flush=True)
            await asyncio.Event().wait()
    finally:
        await worker.stop()
        target.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="element-proxy demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-running", action="store_true", help="stay up after the scripted requests")
    args = parser.parse_args(argv)
    logs.setup("info", "console")
    with _element_processes() as elements:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_demo(args.keep_running, elements))
    return 0
