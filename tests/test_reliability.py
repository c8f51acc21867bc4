"""Reliability with the faults injected for real (issue 6): elements killed, slow and answering
garbage, 2,000 concurrent connections with half-closes and resets, a stalled reader, SIGTERM
under load, running out of file descriptors, and every limit.

Everything runs as real processes on loopback: `python -m proxy` (JSON logs, admin endpoint on),
element processes (tests/elements_for_tests/faulty.py misbehaves on purpose through the raw gRPC
servicer), and in this process an upstream (`Upstream`, an asyncio server in a thread) that
records, per connection, the sha256 of what it sent and received and how each direction ended
(eof, reset), so a transfer is judged from both ends: byte-exact, or reported as reset on the
other side, never silently truncated.

On failure each test prints the tail of its processes' logs (pytest shows it with the failure).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import inspect
import json
import os
import random
import re
import resource
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.checks import metric, wait_for
from tests.procs import Proc, free_port, start_element
from tests.stack import proxy

MiB = 1 << 20
KiB = 1 << 10
FAULTY = "tests.elements_for_tests.faulty"
TAGGER = "tests.elements_for_tests.tagger"
PASSTHROUGH = "elements.passthrough"
LINGER_RESET = struct.pack("ii", 1, 0)
SWEEP_SLACK = 0.3  # the proxy checks timeouts every quarter timeout; plus scheduling on a shared 2-core box


# --- data ----------------------------------------------------------------------------------------

_BASE = random.Random(6).randbytes(2 * MiB)


def blocks(seed: int, total: int, size: int = 256 * KiB) -> Iterator[bytes]:
    """`total` deterministic bytes in pieces of `size`; every piece starts with (seed, index), so a
    lost, duplicated or reordered piece changes the stream's hash."""
    index = 0
    while total > 0:
        n = min(size, total)
        start = (index * 4099) % MiB
        yield (struct.pack("!QQ", seed, index) + _BASE[start + 16:start + n])[:n]
        total -= n
        index += 1


# --- the recording upstream ----------------------------------------------------------------------

MAGIC = b"RLY1"
HEADER = struct.Struct("!4sQBQQI")  # magic, key, kind, server_send, server stall_after, stall_ms
EXCHANGE, CLIENT_FIRST, SERVER_FIRST, CLIENT_RESET, SERVER_RESET = range(5)
KIND_NAMES = ["exchange", "client_first", "server_first", "client_reset", "server_reset"]
READ_SIZE = 1 << 20


@dataclass
class Side:
    """What one end of one connection did and saw. `received`/`rx` include the header."""

    sent: int = 0
    received: int = 0
    tx: Any = field(default_factory=hashlib.sha256)
    rx: Any = field(default_factory=hashlib.sha256)
    read_end: str = ""   # eof | reset | error: ... ("" while reading)
    write_end: str = ""  # done | reset | error: ...
    connected: bool = False
    local: str = ""  # the client's own address, as the proxy logs it ("client")
    stalled_at: float = 0.0
    ended_at: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)


def _how(error: BaseException) -> str:
    if isinstance(error, (ConnectionResetError, BrokenPipeError)):
        return "reset"
    return f"error: {error!r}"


async def read_side(reader: asyncio.StreamReader, side: Side, stall_after: int = 0, stall: float = 0.0) -> None:
    """Reads to EOF into side.rx; stops reading for `stall` seconds once `stall_after` bytes came."""
    try:
        while True:
            if stall and side.received >= stall_after:
                side.stalled_at = time.monotonic()
                await asyncio.sleep(stall)
                stall = 0.0
            data = await reader.read(READ_SIZE)
            if not data:
                side.read_end = "eof"
                return
            side.rx.update(data)
            side.received += len(data)
    except OSError as error:
        side.read_end = _how(error)
    finally:
        side.ended_at = time.monotonic()


async def write_side(writer: asyncio.StreamWriter, side: Side, seed: int, total: int, piece: int = 256 * KiB,
                     eof: bool = True, pace: float = 0.0) -> None:
    try:
        for data in blocks(seed, total, piece):
            writer.write(data)
            side.tx.update(data)
            side.sent += len(data)
            await writer.drain()
            if pace:
                await asyncio.sleep(pace)
        # drain() only waits for the buffer to fall below its high-water mark: flush it all,
        # or bytes still buffered here are lost when the caller's event loop ends
        writer.transport.set_write_buffer_limits(0, 0)
        await writer.drain()
        if eof:
            writer.write_eof()
        side.write_end = "done"
    except OSError as error:
        side.write_end = _how(error)


def rst(writer: asyncio.StreamWriter) -> None:
    """SO_LINGER 0, then close: the peer gets an RST."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    writer.transport.abort()


class Upstream:
    """Where every proxied connection goes: an asyncio server on its own thread.

    A connection that starts with HEADER does what its `kind` says and is recorded under its
    key in `records`; any other connection is echoed and recorded in `echoes`."""

    def __init__(self) -> None:
        self.records: dict[int, Side] = {}
        self.echoes: list[Side] = []
        self.accepted = 0
        self.open = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=4096))
        self.port = self.server.sockets[0].getsockname()[1]
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        self._writers.add(writer)
        side = Side()
        try:
            await self._handle(reader, writer, side)
        finally:
            self.open -= 1
            self._writers.discard(writer)
            side.done.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, side: Side) -> None:
        try:
            first = await reader.read(READ_SIZE)
            while first.startswith(MAGIC) and len(first) < HEADER.size:
                more = await reader.read(READ_SIZE)
                if not more:
                    break
                first += more
        except OSError as error:
            first, side.read_end = b"", _how(error)
        side.rx.update(first)
        side.received = len(first)
        if not first.startswith(MAGIC) or len(first) < HEADER.size:
            self.echoes.append(side)
            if not first:
                side.read_end = side.read_end or "eof"
                writer.close()
                return
            writer.write(first)
            try:
                while data := await reader.read(READ_SIZE):
                    side.rx.update(data)
                    side.received += len(data)
                    writer.write(data)
                    await writer.drain()
                side.read_end = "eof"
                writer.write_eof()
                await writer.drain()
            except OSError as error:
                side.read_end = _how(error)
            writer.close()
            return
        _, key, kind, server_send, stall_after, stall_ms = HEADER.unpack(first[:HEADER.size])
        self.records[key] = side
        seed = 2 * key + 1
        reading = read_side(reader, side, stall_after, stall_ms / 1000)
        if kind in (EXCHANGE, CLIENT_RESET):
            await asyncio.gather(reading, write_side(writer, side, seed, server_send))
        elif kind == CLIENT_FIRST:
            await reading
            if side.read_end == "eof":
                await write_side(writer, side, seed, server_send)
        elif kind == SERVER_FIRST:
            await write_side(writer, side, seed, server_send)
            await reading
        elif kind == SERVER_RESET:
            reading.close()
            await write_side(writer, side, seed, server_send, eof=False)
            rst(writer)
            side.read_end = "n/a"
            return
        writer.close()

    def record(self, key: int, timeout: float = 30.0) -> Side:
        deadline = time.monotonic() + timeout
        while key not in self.records:
            assert time.monotonic() < deadline, f"connection {key} never reached the upstream"
            time.sleep(0.01)
        side = self.records[key]
        assert side.done.wait(max(0.0, deadline - time.monotonic())), f"upstream connection {key} never ended"
        return side

    def close(self) -> None:
        async def shut() -> None:
            self.server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


async def client(port: int, key: int, kind: int = EXCHANGE, send: int = 0, server_send: int = 0, *,
                 piece: int = 256 * KiB, pace: float = 0.0, stall_after: int = 0, stall: float = 0.0,
                 server_stall_after: int = 0, server_stall_ms: int = 0, reset_part: int = 0,
                 side: Side | None = None, gate: asyncio.Event | None = None,
                 upstream: Upstream | None = None) -> Side:
    """One connection through the proxy to the Upstream, doing its half of `kind`; `side` (given or
    new) fills in as it goes, so a test can watch progress. With a `gate`, it connects, then waits
    for the gate before it sends anything. With `upstream`, it sends its header, then waits until
    the upstream has it before sending more: the proxy is connected both ways before a big write
    (see test_bytes_read_before_the_upstream_connects_still_pause_the_client for why)."""
    side = side or Side()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=256 * KiB)
    except OSError as error:
        side.read_end = side.write_end = f"connect failed: {error!r}"
        side.done.set()
        return side
    side.connected = True
    side.local = "%s:%d" % writer.get_extra_info("sockname")[:2]
    reading = read_side(reader, side, stall_after, stall)
    try:
        if gate is not None:
            await gate.wait()
        head = HEADER.pack(MAGIC, key, kind, server_send, server_stall_after, server_stall_ms)
        writer.write(head)
        side.tx.update(head)
        side.sent = len(head)
        if upstream is not None:
            await wait_async(lambda: key in upstream.records, 10, "the upstream got the header")
        seed = 2 * key
        if kind in (EXCHANGE, CLIENT_FIRST, SERVER_RESET):  # CLIENT_FIRST: the upstream waits for our EOF
            await asyncio.gather(reading, write_side(writer, side, seed, send, piece, pace=pace))
        elif kind == SERVER_FIRST:
            await reading
            if side.read_end == "eof":
                await write_side(writer, side, seed, send, piece, pace=pace)
        elif kind == CLIENT_RESET:
            await write_side(writer, side, seed, reset_part, piece, eof=False)
            try:
                first = await reader.read(1)  # the upstream answered: the proxy dialed it, forwarded the header
            except OSError as error:
                first, side.read_end = b"", f"{_how(error)} before my reset"
            side.received += len(first)
            if first:
                rst(writer)
                side.read_end = "reset by me"
            side.read_end = side.read_end or "eof before my reset"
            side.ended_at = time.monotonic()
            return side
    finally:
        if inspect.getcoroutinestate(reading) == inspect.CORO_CREATED:
            reading.close()  # never started: we returned early
        if not writer.transport.is_closing():
            writer.close()
        side.done.set()
    return side


def judge_pair(kind: int, mine: Side, theirs: Side | None) -> str | None:
    """Why a client/upstream pair is wrong, or None. Completed: byte-exact both ways, EOF both ways.
    Reset by one end: the other end saw a reset, not an EOF."""
    if theirs is None:
        return "never reached the upstream"
    if kind == CLIENT_RESET:
        if mine.read_end != "reset by me":
            return f"client could not reset: {mine.read_end}"
        return None if theirs.read_end == "reset" else f"client reset, upstream read ended with {theirs.read_end!r}"
    if kind == SERVER_RESET:
        return None if mine.read_end == "reset" else f"upstream reset, client read ended with {mine.read_end!r}"
    if (mine.read_end, theirs.read_end, mine.write_end, theirs.write_end) != ("eof", "eof", "done", "done"):
        return (f"ends: client read {mine.read_end} write {mine.write_end}, "
                f"upstream read {theirs.read_end} write {theirs.write_end}")
    if mine.tx.digest() != theirs.rx.digest() or mine.sent != theirs.received:
        return f"client->upstream differs: sent {mine.sent}, arrived {theirs.received}"
    if theirs.tx.digest() != mine.rx.digest() or theirs.sent != mine.received:
        return f"upstream->client differs: sent {theirs.sent}, arrived {mine.received}"
    return None


async def wait_async(condition: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not true after {timeout}s")
        await asyncio.sleep(0.01)


def run_async(coro: Any, timeout: float) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro
    return asyncio.run(bounded())


# --- processes, metrics, logs ----------------------------------------------------------------------

class Proxy:
    def __init__(self, proc: Proc, port: int, admin: int) -> None:
        self.proc = proc
        self.port = port
        self.admin = admin

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def metrics(self) -> str:
        status, text = self.get("/metrics")
        assert status == 200, text
        return text

    def value(self, name: str, default: float | None = 0.0, **labels: str) -> float:
        return metric(self.metrics(), name, default, **labels)

    def element(self, name: str, default: float | None = 0.0, position: str = "0", **labels: str) -> float:
        """element_proxy_element_<name> of the element at `position`, whatever it calls itself."""
        text = self.metrics()
        full = f"element_proxy_element_{name}"
        for line in text.splitlines():
            if line.startswith(full) and f'position="{position}"' in line:
                element = line.split('element="', 1)[1].split('"', 1)[0]
                return metric(text, full, default, position=position, element=element, **labels)
        if default is None:
            raise AssertionError(f"{full} for position {position} not in /metrics:\n{text}")
        return default

    def log(self) -> str:
        return self.proc.log_path.read_text(errors="replace")

    def lines(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return entries

    def closed(self) -> list[dict[str, Any]]:
        return [e for e in self.lines() if e.get("message") == "connection closed"]

    def outcomes(self) -> collections.Counter[str]:
        return collections.Counter(e["outcome"] for e in self.closed())

    def wait_closed(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        wait_for(lambda: len(self.closed()) >= count, timeout, f"{count} 'connection closed' lines")
        return self.closed()

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


class Harness:
    """Starts what a test needs and stops all of it; prints the logs' tails (shown on failure)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.stack = ExitStack()
        self.procs: list[tuple[str, Proc]] = []

    def element(self, module: str, *args: str, port: int | None = None) -> tuple[Proc, str]:
        proc, port = start_element(module, *args, port=port)
        self.stack.callback(proc.stop)
        self.procs.append((f"element {module} :{port}", proc))
        return proc, f"127.0.0.1:{port}"

    def proxy(self, addresses: list[str], *options: str) -> Proxy:
        admin = free_port()
        proc, port = self.stack.enter_context(
            proxy(addresses, "--log-format", "json", *options, admin=f"127.0.0.1:{admin}"))
        self.procs.append((f"proxy :{port}", proc))
        return Proxy(proc, port, admin)

    def upstream(self) -> Upstream:
        server = Upstream()
        self.stack.callback(server.close)
        return server

    def config(self, name: str, **element: Any) -> str:
        """A TOML file with one [[element]] table; returns its path."""
        path = self.tmp_path / f"{name}.toml"
        path.write_text("[[element]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in element.items()))
        return str(path)

    def close(self) -> None:
        try:
            self.stack.close()
        finally:
            for name, proc in self.procs:
                lines = [line for line in proc.log_path.read_text(errors="replace").splitlines()
                         if '"connection opened"' not in line and '"upstream connected"' not in line]
                print(f"----- {name} (pid {proc.pid}, exit {proc.popen.returncode}): last lines of {proc.log_path}")
                print("\n".join(lines[-60:]))


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        harness.close()


# --- small blocking clients ------------------------------------------------------------------------

def dial(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_until(sock: socket.socket, length: int, timeout: float = 5.0) -> bytes:
    """Reads until `length` bytes came, EOF, or the timeout."""
    sock.settimeout(timeout)
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < length and time.monotonic() < deadline:
        data = sock.recv(65536)
        if not data:
            break
        got += data
    return got


def ending(sock: socket.socket, timeout: float) -> tuple[str, float, bytes]:
    """Reads until the connection ends: ('eof' | 'reset' | 'timeout', seconds it took, bytes read)."""
    start = time.monotonic()
    sock.settimeout(timeout)
    got = b""
    try:
        while data := sock.recv(65536):
            got += data
        return "eof", time.monotonic() - start, got
    except (ConnectionResetError, BrokenPipeError):
        return "reset", time.monotonic() - start, got
    except TimeoutError:
        return "timeout", time.monotonic() - start, got


def dial_outcome(port: int, timeout: float = 5.0) -> tuple[str, float, bytes]:
    """Connects and reads until the connection ends: like `ending`, but a reset that arrives
    while connect() is still checking SO_ERROR counts as the reset it is; 'refused' when nothing
    listens."""
    start = time.monotonic()
    try:
        sock = dial(port, timeout)
    except ConnectionResetError:
        return "reset", time.monotonic() - start, b""
    except ConnectionRefusedError:
        return "refused", time.monotonic() - start, b""
    with sock:
        end, _, got = ending(sock, timeout)
    return end, time.monotonic() - start, got


def echo(port: int, payload: bytes, expect: bytes | None = None) -> bytes:
    """One connection: payload out, reads len(expect) bytes back, half-close, EOF."""
    expect = payload if expect is None else expect
    with dial(port) as sock:
        sock.sendall(payload)
        got = read_until(sock, len(expect))
        sock.shutdown(socket.SHUT_WR)
        end, _, rest = ending(sock, 5)
        assert (end, rest) == ("eof", b""), (end, rest)
        return got


def raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(needed, soft), hard), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= needed, "RLIMIT_NOFILE too low for this test"


# --- 1. an element SIGKILLed mid-transfer --------------------------------------------------------

def test_element_sigkilled_mid_transfer_fail_open_finishes_fail_closed_resets_then_it_comes_back(
        h: Harness) -> None:
    """Three 64 MiB exchanges (64 MiB each way) through a fail-open proxy and three through a
    fail-closed one share one passthrough element, SIGKILLed once every transfer is under way.
    Then an element (a tagger, so its work shows in the bytes) starts on the same port. (Each
    client waits for the upstream to have its header before it streams: see
    test_bytes_read_before_the_upstream_connects_still_pause_the_client.)"""
    size, count, timeout_ms = 64 * MiB, 3, 1000
    upstream = h.upstream()
    element_proc, element = h.element(PASSTHROUGH)
    options = ("--element-timeout-ms", str(timeout_ms), "--target", f"127.0.0.1:{upstream.port}")
    p_open = h.proxy([element], "--element-failure", "open", *options)
    p_closed = h.proxy([element], "--element-failure", "closed", *options)
    sides = {("open", i): Side() for i in range(count)} | {("closed", i): Side() for i in range(count)}
    keys = {name: 100 * (1 + (name[0] == "closed")) + name[1] for name in sides}
    killed_at: list[float] = []
    at_kill: dict[tuple[str, int], tuple[int, int]] = {}

    async def main() -> None:
        tasks = [asyncio.create_task(client(p_open.port if name[0] == "open" else p_closed.port, keys[name],
                                            EXCHANGE, size, size, side=side, upstream=upstream))
                 for name, side in sides.items()]

        def under_way() -> bool:
            servers = [upstream.records.get(keys[name]) for name in sides]
            return all(s is not None and s.received > 8 * MiB for s in servers) and \
                all(s.received > 8 * MiB for s in sides.values())

        await wait_async(under_way, 30, "every transfer under way")
        os.kill(element_proc.pid, signal.SIGKILL)
        killed_at.append(time.monotonic())
        # bytes that arrived so far: at the upstream, at the client
        at_kill.update({name: (upstream.records[keys[name]].received, s.received) for name, s in sides.items()})
        await asyncio.gather(*tasks)

    run_async(main(), 60)
    element_proc.popen.wait(5)
    print(f"bytes arrived at the kill (upstream, client): {at_kill}")
    for name, side in sides.items():
        upstream_had, client_had = at_kill[name]
        assert upstream_had < HEADER.size + size or client_had < size, f"{name} was not mid-transfer at the kill"
        server = upstream.record(keys[name])
        if name[0] == "open":
            assert judge_pair(EXCHANGE, side, server) is None, (name, judge_pair(EXCHANGE, side, server))
            continue
        # fail-closed: a direction cut short is a reset at its receiver, within the timeout of the kill;
        # a direction that had arrived whole may have ended either way, but never short
        for receiver, sender, had, whole in ((server, side, upstream_had, HEADER.size + size),
                                             (side, server, client_had, size)):
            who = "upstream" if receiver is server else "client"
            if had < whole:
                assert receiver.read_end == "reset", f"{name}: the {who} read {receiver.read_end}, not a reset"
                took = receiver.ended_at - killed_at[0]
                print(f"{name}: {who} reset {took:.3f}s after the kill")
                assert 0 <= took < timeout_ms / 1000, f"{name}: {who} reset {took:.3f}s after the kill"
            else:
                assert receiver.read_end in ("eof", "reset"), (name, who, receiver.read_end)
            if receiver.read_end == "eof":
                assert (receiver.received, receiver.rx.digest()) == (sender.sent, sender.tx.digest()), \
                    f"{name}: the {who} saw a clean EOF after {receiver.received} of {sender.sent} bytes"
    assert p_open.outcomes() == {"completed": count}, p_open.outcomes()
    assert p_closed.outcomes() == {"failure": count}, p_closed.outcomes()
    for p in (p_open, p_closed):
        assert p.element("failures_total", cause="session_down") >= 1
        assert p.element("session_up") == 0

    element_port = int(element.rsplit(":", 1)[1])
    h.element(TAGGER, "--tag", "R", port=element_port)
    back = time.monotonic()
    wait_for(lambda: p_open.element("session_up") == p_closed.element("session_up") == 1, 5, "sessions up again")
    took = time.monotonic() - back
    print(f"sessions up {took:.3f}s after the element listened again")
    assert took < 1.0, f"the sessions came back {took:.3f}s after the element did"
    for p in (p_open, p_closed):
        passed = p.element("verdicts_total", kind="data", action="pass")
        assert echo(p.port, b"after the restart", b"after the restart<R><R>") == b"after the restart<R><R>"
        assert p.element("verdicts_total", kind="data", action="pass") > passed


class _FinishedCall:
    """What grpc.aio's Session call does once the element is gone: write() raises
    asyncio.InvalidStateError (grpc/aio/_call.py, 'RPC already finished'; a real call to a
    SIGKILLed element does exactly this), and read() reports the end a moment later."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def write(self, request: Any) -> None:
        asyncio.get_running_loop().call_later(0.05, self.gone.set)
        raise asyncio.InvalidStateError("RPC already finished.")

    async def read(self) -> Any:
        await self.gone.wait()
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, details="Socket closed")

    def cancel(self) -> bool:
        return True


def test_a_session_whose_write_fails_first_reconnects(monkeypatch: pytest.MonkeyPatch) -> None:
    """The race behind an occasional 'session never comes back' after a SIGKILL under load, made
    deterministic: the write fails before the read notices the end of the stream."""
    from elements.api import element_pb2 as pb
    from proxy.sessions import session as session_module
    from proxy.chain import Direction
    from proxy.config import ElementConfig
    from proxy.sessions.endpoint import Endpoint
    from proxy.sessions.validate import VerdictLimits

    opened: list[_FinishedCall] = []
    verdicts: list[tuple[int, int]] = []

    class Stub:
        def __init__(self, channel: Any) -> None:
            pass

        async def Describe(self, request: Any, timeout: float) -> Any:
            return pb.Description(name="dies")

    def open_session(channel: Any, metadata: Any = None) -> _FinishedCall:
        opened.append(_FinishedCall())
        return opened[-1]

    class Target:
        def on_verdict(self, pos: int, seq: int, action: int, data: Any, metadata: Any, reply: Any = None,
                       done: bool = False) -> None:
            verdicts.append((seq, action))

    monkeypatch.setattr(session_module.pb_grpc, "ElementStub", Stub)
    monkeypatch.setattr(session_module, "open_session", open_session)

    async def main() -> tuple[int, BaseException | None]:
        config = ElementConfig(address="127.0.0.1:9", failure="open")
        session = session_module.ElementSession(0, config, lambda: None, VerdictLimits(1 << 20),
                                                Endpoint(config.address, config))
        session.start()
        await wait_async(lambda: session.up, 5, "session up")
        session.send_data("c1", 1, Direction.REQUEST, b"x", False, None, Target(), 0)
        deadline = time.monotonic() + 2
        while len(opened) < 2 and not session._task.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        died = session._task.exception() if session._task.done() else None
        await session.stop()
        return len(opened), died

    sessions, died = run_async(main(), 10)
    assert verdicts == [(1, 1)], "the pending event gets the fail-open policy (PASS)"
    assert died is None, f"the session task died of {died!r}"
    assert sessions >= 2, "the session was never reopened"


def test_a_session_hit_by_an_unexpected_error_logs_it_and_redials(
        h: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A bug of ours inside the session (here: encoding a batch raises once) must not leave the
    element unused until the proxy restarts: the pending event gets the failure policy, the
    traceback is logged, and the next event reaches the real element."""
    from proxy.sessions import session as session_module
    from proxy.chain import Action, Direction
    from proxy.config import ElementConfig
    from proxy.sessions.endpoint import Endpoint
    from proxy.sessions.validate import VerdictLimits

    _, address = h.element(PASSTHROUGH)
    verdicts: list[tuple[int, int]] = []
    real_session_request = session_module.session_request
    calls = 0

    def session_request_failing_once(events: Any) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected encoding bug")
        return real_session_request(events)

    class Target:
        def on_verdict(self, pos: int, seq: int, action: int, data: Any, metadata: Any, reply: Any = None,
                       done: bool = False) -> None:
            verdicts.append((seq, action))

    monkeypatch.setattr(session_module, "session_request", session_request_failing_once)

    async def main() -> None:
        config = ElementConfig(address=address, failure="closed")
        session = session_module.ElementSession(0, config, lambda: None, VerdictLimits(1 << 20),
                                                Endpoint(address, config))
        session.start()
        await wait_async(lambda: session.up, 5, "session up")
        session.send_data("c1", 1, Direction.REQUEST, b"x", False, None, Target(), 0)
        await wait_async(lambda: verdicts, 5, "the failure policy for the first event")
        await wait_async(lambda: session.up, 5, "session up again")
        session.send_data("c1", 2, Direction.REQUEST, b"y", False, None, Target(), 0)
        await wait_async(lambda: len(verdicts) == 2, 5, "the element's verdict on the second event")
        await session.stop()

    run_async(main(), 20)
    assert verdicts == [(1, Action.FAIL), (2, Action.PASS)]
    assert "injected encoding bug" in caplog.text, "the traceback must be logged"


# --- 2. a slow element -----------------------------------------------------------------------------

def test_slow_element_fail_open_passes_each_event_unprocessed_after_the_timeout(h: Harness) -> None:
    """Every chunk is answered after 1 s; the timeout is 300 ms. Three chunks sent 50 ms apart
    each come back unprocessed ~300 ms after they were sent (per event, not queued behind one
    another), and the end of stream too."""
    upstream = h.upstream()
    _, element = h.element(FAULTY, "--delay", "1.0")
    p = h.proxy([element], "--element-failure", "open", "--element-timeout-ms", "300",
                "--target", f"127.0.0.1:{upstream.port}")
    messages = [b"first-", b"second-", b"third-"]
    sent_at, latencies = [], []
    with dial(p.port) as sock:
        for message in messages:
            sock.sendall(message)
            sent_at.append(time.monotonic())
            time.sleep(0.05)  # pacing, so each message is a chunk of its own
        got = b""
        sock.settimeout(5)
        for message, at in zip(messages, sent_at):
            while len(got) < len(b"".join(messages[:messages.index(message) + 1])):
                data = sock.recv(100)
                assert data, f"EOF after {got!r}"
                got += data
            latencies.append(time.monotonic() - at)
        assert got == b"".join(messages), f"fail-open must pass the bytes unprocessed: {got!r}"
        sock.shutdown(socket.SHUT_WR)
        end, eof_took, rest = ending(sock, 5)
    assert (end, rest) == ("eof", b"")
    print(f"fail-open per-event latencies {[round(x, 3) for x in latencies]}, end of stream {eof_took:.3f}s")
    for latency in latencies + [eof_took]:
        assert 0.3 <= latency <= 0.3 + SWEEP_SLACK, f"per-event latencies {latencies}, eof {eof_took:.3f}s"
    assert p.element("failures_total", cause="timeout") == 4  # three chunks and the end of stream
    assert p.element("verdicts_total", kind="data", action="pass") == 0
    assert p.element("breaker_open") == 0
    (closed,) = p.wait_closed(1)
    assert closed["outcome"] == "completed", closed
    # every timeout is said: the first in a line of its own, the ones within the next second in a count
    log = p.proc.wait_for_output("more timeouts in the last 1 s")
    said = log.count("within 300 ms, failure policy open applied")
    counted = sum(int(n) for n in re.findall(r"element faulty: (\d+) more timeouts in the last 1 s", log))
    assert (said, said + counted) in ((1, 4), (2, 4)), log


def test_slow_element_fail_closed_resets_within_the_timeout(h: Harness) -> None:
    upstream = h.upstream()
    _, element = h.element(FAULTY, "--delay", "1.0")
    p = h.proxy([element], "--element-failure", "closed", "--element-timeout-ms", "300",
                "--target", f"127.0.0.1:{upstream.port}")
    with dial(p.port) as sock:
        sock.sendall(b"never judged in time")
        end, took, got = ending(sock, 5)
    assert (end, got) == ("reset", b""), (end, got)
    print(f"fail-closed reset after {took:.3f}s")
    assert 0.3 <= took <= 0.3 + SWEEP_SLACK, f"reset after {took:.3f}s"
    assert p.element("failures_total", cause="timeout") == 1
    (closed,) = p.wait_closed(1)
    assert closed["outcome"] == "failure", closed
    wait_for(lambda: upstream.echoes and upstream.echoes[0].done.is_set(), 5)
    assert upstream.echoes[0].received == 0 and upstream.echoes[0].read_end == "reset"


# --- 3. 2,000 concurrent connections -------------------------------------------------------------

def test_two_thousand_concurrent_connections_with_half_closes_and_resets_lose_no_byte(h: Harness) -> None:
    """2,000 connections through one passthrough element, all open at once before any byte moves;
    random sizes both ways (0 to 256 KiB), random write sizes, and five behaviours: both send at
    once, the client half-closes first, the upstream half-closes first, the client resets
    (SO_LINGER 0) mid-stream, the upstream resets mid-stream. Completed ones must be byte-exact
    both ways (sha256 at both ends), reset ones must be seen as reset by the other end."""
    count = 2000
    raise_nofile(4 * count + 1000)  # the clients and the upstream live here; the proxy inherits it
    upstream = h.upstream()
    _, element = h.element(PASSTHROUGH)
    p = h.proxy([element], "--target", f"127.0.0.1:{upstream.port}")
    rng = random.Random(6)

    def size() -> int:
        return rng.choice([0, rng.randint(1, 4 * KiB), rng.randint(4 * KiB, 64 * KiB),
                           rng.randint(64 * KiB, 256 * KiB)])

    plans = []
    for key in range(count):
        kind = rng.choices(range(5), weights=[4, 2, 2, 1, 1])[0]
        send, server_send = size(), size()
        if kind in (CLIENT_RESET, SERVER_RESET):
            server_send = max(server_send, 1)
        plans.append({"key": key, "kind": kind, "send": send, "server_send": server_send,
                      "piece": rng.choice([1 * KiB, 16 * KiB, 64 * KiB, 256 * KiB]),
                      "reset_part": rng.randint(0, send)})
    sides = [Side() for _ in plans]

    async def main() -> None:
        gate = asyncio.Event()
        tasks = [asyncio.create_task(client(p.port, plan["key"], plan["kind"], plan["send"], plan["server_send"],
                                            piece=plan["piece"], reset_part=plan["reset_part"], side=side,
                                            gate=gate))
                 for plan, side in zip(plans, sides)]
        await wait_async(lambda: all(s.connected or s.done.is_set() for s in sides), 60, "all connected")
        await wait_async(lambda: upstream.open == count, 30, "every connection dialed through")
        active = await asyncio.to_thread(p.value, "element_proxy_connections_active", None,
                                         listener=f"127.0.0.1:{p.port}")
        assert active == count, f"{active} connections open at the proxy"
        start = time.monotonic()
        gate.set()
        await asyncio.gather(*tasks)
        print(f"{count} connections, all open at once, finished {time.monotonic() - start:.2f}s after the gate")

    run_async(main(), 120)
    problems = []
    for plan, side in zip(plans, sides):
        problem = judge_pair(plan["kind"], side, upstream.record(plan["key"], 10))
        if problem:
            problems.append((plan, problem))
    assert not problems, f"{len(problems)} bad transfers, first ones: {problems[:5]}"
    kinds = collections.Counter(KIND_NAMES[plan["kind"]] for plan in plans)
    resets = kinds["client_reset"] + kinds["server_reset"]
    p.wait_closed(count, 30)
    print(f"kinds {dict(kinds)}, bytes {sum(s.sent + s.received for s in sides) / MiB:.0f} MiB at the clients")
    assert p.outcomes() == {"completed": count - resets, "peer_reset": resets}, p.outcomes()
    assert p.element("failures_total", cause="timeout") == 0


# --- 4. a stalled reader -------------------------------------------------------------------------

class RssSampler:
    """Every 50 ms: VmRSS of each proxy, and how many bytes its transfer's sender has sent so far."""

    def __init__(self, proxies: dict[str, Proxy]) -> None:
        self.proxies = proxies
        self.senders: dict[str, Side] = {}
        self.samples: dict[str, list[tuple[float, int]]] = {name: [] for name in proxies}
        self.sent: dict[str, list[tuple[float, int]]] = {name: [] for name in proxies}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for name, p in self.proxies.items():
                try:
                    self.samples[name].append((now, p.rss()))
                except (OSError, AssertionError):
                    pass
                if name in self.senders:
                    self.sent[name].append((now, self.senders[name].sent))
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def window(self, name: str, start: float, end: float, series: str = "samples") -> list[int]:
        return [value for at, value in getattr(self, series)[name] if start <= at <= end]


def test_a_reader_stalled_for_10s_keeps_proxy_memory_flat_then_gets_every_byte(h: Harness) -> None:
    """Two stalls at once, 1 GiB each: through an empty chain the client stops reading what the
    upstream sends, through one passthrough element the upstream stops reading what the client
    sends; each after 8 MiB, for 10 s. Each proxy's RSS grows by less than 32 MiB during the stall
    (the sender is paused: it gets a few MiB of socket buffers further at most), then all of the
    GiB arrives byte-exact (sha256 as it streams)."""
    size, stall = 1 << 30, 10.0
    upstream = h.upstream()
    _, element = h.element(PASSTHROUGH)
    proxies = {"empty chain": h.proxy([], "--target", f"127.0.0.1:{upstream.port}"),
               "one element": h.proxy([element], "--target", f"127.0.0.1:{upstream.port}")}
    sides = {"empty chain": Side(), "one element": Side()}
    keys = {"empty chain": 900, "one element": 901}
    sampler = RssSampler(proxies)
    before = {name: p.rss() for name, p in proxies.items()}

    async def main() -> None:
        tasks = [asyncio.create_task(client(proxies["empty chain"].port, 900, EXCHANGE, 0, size, stall_after=8 * MiB,
                                            stall=stall, side=sides["empty chain"])),
                 asyncio.create_task(client(proxies["one element"].port, 901, EXCHANGE, size, 0, piece=MiB,
                                            server_stall_after=8 * MiB, server_stall_ms=int(stall * 1000),
                                            side=sides["one element"], upstream=upstream))]
        await wait_async(lambda: all(k in upstream.records for k in keys.values()), 10, "both connected")
        sampler.senders.update({"empty chain": upstream.records[900], "one element": sides["one element"]})
        await asyncio.gather(*tasks)

    start = time.monotonic()
    try:
        run_async(main(), 90)
    finally:
        sampler.stop()
    print(f"two 1 GiB transfers with a 10 s stall each: {time.monotonic() - start:.1f}s")
    stalled = {"empty chain": sides["empty chain"], "one element": upstream.record(901)}
    facts = {}
    for name, p in proxies.items():
        at = stalled[name].stalled_at
        window = sampler.window(name, at, at + stall)
        growth = max(window) - window[0] if window else -1
        sent = sampler.window(name, at, at + stall, "sent")
        pushed = sent[-1] - sent[0] if sent else -1
        peak = max(rss for _, rss in sampler.samples[name]) - before[name]
        facts[name] = (at, len(window), growth, pushed)
        print(f"{name}: RSS {window[0] / MiB if window else -1:.1f} MiB at the stall, +{growth / MiB:.1f} MiB "
              f"during it, peak +{peak / MiB:.1f} MiB over the idle proxy; the sender pushed "
              f"{pushed / MiB:.1f} MiB during the stall; outcomes {p.outcomes()}")
    for name in proxies:
        at, samples, growth, pushed = facts[name]
        assert at > 0, f"{name}: the reader never stalled"
        assert samples > 100, f"{name}: only {samples} RSS samples during the stall"
        assert growth < 32 * MiB, f"{name}: RSS grew {growth / MiB:.1f} MiB while the reader stalled"
        # socket buffers (up to 32 MiB receive + 4 MiB send per hop here) are all that may fill up
        assert 0 <= pushed < 96 * MiB, f"{name}: the sender was not paused: {pushed / MiB:.0f} MiB during the stall"
        server = upstream.record(keys[name])
        assert judge_pair(EXCHANGE, sides[name], server) is None, (name, judge_pair(EXCHANGE, sides[name], server))


def test_bytes_read_before_the_upstream_connects_still_pause_the_client(h: Harness) -> None:
    """The element answers the Open event after 0.3 s, so the upstream is dialed late, and each chunk
    after 20 ms. The client writes 128 MiB at once: more than high_water (64 KiB here) reaches the
    proxy before the upstream is connected. Kernel socket buffers take some tens of MiB of it; the
    proxy itself must hold about high_water, not what the client sends."""
    upstream = h.upstream()
    _, element = h.element(FAULTY, "--open-delay", "0.3", "--delay", "0.02")
    p = h.proxy([element], "--element-failure", "open", "--element-timeout-ms", "10000", "--high-water", "65536",
                "--drain-timeout-ms", "0", "--target", f"127.0.0.1:{upstream.port}")
    idle = p.rss()
    side = Side()

    async def main() -> None:
        task = asyncio.create_task(client(p.port, 1, EXCHANGE, 128 * MiB, 0, piece=MiB, server_stall_ms=60_000,
                                          side=side))
        last, since = -1, time.monotonic()
        deadline = time.monotonic() + 15
        while not task.done() and time.monotonic() - since < 1.0 and time.monotonic() < deadline:
            if side.sent != last:
                last, since = side.sent, time.monotonic()
            await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run_async(main(), 60)
    growth = p.rss() - idle
    print(f"client pushed {side.sent / MiB:.0f} MiB, proxy RSS +{growth / MiB:.1f} MiB")
    assert growth < 32 * MiB, f"the proxy buffered {growth / MiB:.0f} MiB for a client it should have paused"


# --- 5. SIGTERM under load -----------------------------------------------------------------------

def test_sigterm_drains_open_connections_refuses_new_ones_and_exits_0(h: Harness) -> None:
    """Six 4 MiB exchanges whose clients send at a pace (about 1.6 s each) are under way at SIGTERM
    (--drain-timeout-ms 5000): a new connection is refused, the six finish byte-exact, the proxy
    exits 0 as soon as they are done."""
    upstream = h.upstream()
    _, element = h.element(PASSTHROUGH)
    p = h.proxy([element], "--drain-timeout-ms", "5000", "--target", f"127.0.0.1:{upstream.port}")
    count, size = 6, 4 * MiB
    sides = [Side() for _ in range(count)]
    marks: dict[str, Any] = {}

    async def main() -> None:
        tasks = [asyncio.create_task(client(p.port, 500 + i, EXCHANGE, size, size, piece=128 * KiB, pace=0.05,
                                            side=side, upstream=upstream)) for i, side in enumerate(sides)]
        await wait_async(lambda: all(s.received > 0 and s.sent > MiB // 2 for s in sides), 10, "under way")
        os.kill(p.proc.pid, signal.SIGTERM)
        marks["term"] = time.monotonic()
        marks["progress"] = [s.sent for s in sides]
        await wait_async(lambda: '"draining"' in p.log(), 5, "the proxy says it drains")
        marks["new"] = await asyncio.to_thread(dial_outcome, p.port, 2)
        await asyncio.gather(*tasks)
        marks["done"] = time.monotonic()

    run_async(main(), 30)
    code = p.proc.popen.wait(10)
    exited = time.monotonic() - marks["term"]
    print(f"sent at SIGTERM {marks['progress']}, transfers done {marks['done'] - marks['term']:.2f}s and "
          f"exit {exited:.2f}s after it")
    assert all(sent < HEADER.size + size for sent in marks["progress"]), "a transfer was over before SIGTERM"
    assert marks["new"][0] == "refused", f"a new connection during the drain: {marks['new']}"
    for i, side in enumerate(sides):
        assert judge_pair(EXCHANGE, side, upstream.record(500 + i)) is None, judge_pair(EXCHANGE, side, None)
    assert code == 0
    assert exited < 5.0
    assert p.outcomes() == {"completed": count}, p.outcomes()
    assert any(e.get("message") == "draining" and e.get("connections") == count for e in p.lines())


def test_sigterm_resets_what_outlives_the_drain_timeout_and_still_exits_0(h: Harness) -> None:
    upstream = h.upstream()
    p = h.proxy([], "--drain-timeout-ms", "1000", "--target", f"127.0.0.1:{upstream.port}")
    side = Side()
    marks: dict[str, float] = {}

    async def main() -> None:
        # 1 MiB in 16 KiB pieces every 0.15 s: ten seconds, far longer than the drain; the upstream
        # answers only after the client's EOF, so both directions are open when the drain ends
        task = asyncio.create_task(client(p.port, 700, CLIENT_FIRST, MiB, 1, piece=16 * KiB, pace=0.15,
                                          side=side))
        await wait_async(lambda: side.sent > 64 * KiB, 5, "under way")
        os.kill(p.proc.pid, signal.SIGTERM)
        marks["term"] = time.monotonic()
        await task

    run_async(main(), 30)
    code = p.proc.popen.wait(10)
    exited = time.monotonic() - marks["term"]
    server = upstream.record(700)
    took = side.ended_at - marks["term"]
    print(f"reset {took:.3f}s after SIGTERM, exit {exited:.2f}s after it")
    assert side.read_end == "reset" and server.read_end == "reset", (side.read_end, server.read_end)
    assert 1.0 <= took < 1.0 + SWEEP_SLACK, f"reset {took:.3f}s after SIGTERM"
    assert code == 0 and exited < 3.0, (code, exited)
    (closed,) = p.closed()
    assert closed["outcome"] == "proxy_stopping", closed


# --- 6. bad input from elements and from the OS ---------------------------------------------------

def faulty_pair(h: Harness) -> tuple[Upstream, Proc, Proxy, Proxy]:
    """The faulty element behind a fail-open and a fail-closed proxy (timeout 3 s, so a failure
    that comes sooner was not a timeout; max_replacement_bytes 4096)."""
    upstream = h.upstream()
    faulty, element = h.element(FAULTY)
    options = ("--element-timeout-ms", "3000", "--max-replacement-bytes", "4096",
               "--target", f"127.0.0.1:{upstream.port}")
    p_open = h.proxy([element], "--element-failure", "open", *options)
    p_closed = h.proxy([element], "--element-failure", "closed", *options)
    return upstream, faulty, p_open, p_closed


def still_serving(p: Proxy) -> None:
    """A new connection afterwards goes through the element (tagged) and completes."""
    assert echo(p.port, b"afterwards", b"afterwards<f>") == b"afterwards<f>"
    assert p.element("breaker_open") == 0
    assert p.proc.alive()


def test_verdicts_for_unknown_connections_and_sequences_are_ignored(h: Harness) -> None:
    _, _, p_open, p_closed = faulty_pair(h)
    for p in (p_open, p_closed):
        with dial(p.port) as sock:
            sock.sendall(b"!unknown verdicts")
            assert read_until(sock, 20) == b"!unknown verdicts<f>"
            sock.sendall(b"still up")
            assert read_until(sock, 11) == b"still up<f>"
            sock.shutdown(socket.SHUT_WR)
            assert ending(sock, 5)[0] == "eof"
        (closed,) = p.wait_closed(1)
        assert closed["outcome"] == "completed", closed
        log = p.log()
        assert "invalid verdict (unknown_connection) for connection 'no-such-connection' sequence 1, " \
               "which does not use this element" in log
        # sequence 1000001 and the duplicate RESET of sequence 1: said once, then counted
        assert f"invalid verdict (unknown_sequence) for connection '{closed['conn']}' sequence" in log
        assert p.element("invalid_verdicts_total", cause="unknown_connection") == 1
        assert p.element("invalid_verdicts_total", cause="unknown_sequence") == 2
        for cause in ("invalid_verdict", "timeout", "session_down"):
            assert p.element("failures_total", cause=cause) == 0
        still_serving(p)


def test_replacement_over_max_replacement_bytes_gets_the_failure_policy(h: Harness) -> None:
    _, _, p_open, p_closed = faulty_pair(h)
    with dial(p_open.port) as sock:
        sock.sendall(b"!huge 4096")  # exactly the maximum: allowed
        assert read_until(sock, 4096) == b"H" * 4096
        sock.sendall(b"!huge 4097")  # one byte over: fail-open passes the chunk unprocessed
        assert read_until(sock, 10) == b"!huge 4097"
    with dial(p_closed.port) as sock:
        sock.sendall(b"!huge 4096")
        assert read_until(sock, 4096) == b"H" * 4096
        sock.sendall(b"!huge 4097")
        end, _, got = ending(sock, 5)
        assert (end, got) == ("reset", b""), (end, got)
    for p, outcome in ((p_open, "completed"), (p_closed, "failure")):
        assert p.element("failures_total", cause="invalid_verdict") == 1
        (closed,) = p.wait_closed(1)
        assert closed["outcome"] == outcome, closed
        assert p.element("invalid_verdicts_total", cause="replacement_too_big") == 1
        assert "invalid verdict (replacement_too_big) for connection " in p.log()
        assert ": 4097 replacement bytes, over max_replacement_bytes (4096); failure policy" in p.log()
        still_serving(p)


@pytest.mark.parametrize("action", [0, 99, 100, -1])
def test_unknown_action_gets_the_failure_policy(h: Harness, action: int) -> None:
    """0 is ACTION_UNSPECIFIED, 99 unknown, 100 the proxy's internal FAIL value, -1 negative."""
    _, _, p_open, p_closed = faulty_pair(h)
    command = b"!action %d" % action
    with dial(p_open.port) as sock:
        sock.sendall(command)
        assert read_until(sock, len(command)) == command  # passed unprocessed
        sock.sendall(b"next")
        assert read_until(sock, 7) == b"next<f>"
    with dial(p_closed.port) as sock:
        sock.sendall(command)
        end, took, got = ending(sock, 5)
        assert (end, got) == ("reset", b"") and took < 1, (end, took, got)
    for p in (p_open, p_closed):
        assert p.element("failures_total", cause="invalid_verdict") == 1
        assert p.element("invalid_verdicts_total", cause="bad_action") == 1
        assert f"action {action} is not PASS, DROP, CLOSE, RESET or HOLD; failure policy" in p.log()
        still_serving(p)
    assert p_closed.wait_closed(1)[0]["outcome"] == "failure"


@pytest.mark.parametrize("how", ["hangup", "abort"])
def test_session_ended_by_the_element_mid_batch(h: Harness, how: str) -> None:
    """One connection's chunk is held unanswered, then another connection's chunk makes the element
    end its Session (OK status, or INTERNAL). Both pending events get the policy at once (not after
    the 3 s timeout), the session comes back, new connections go through the element again."""
    _, _, p_open, p_closed = faulty_pair(h)
    command = b"!" + how.encode()
    for p in (p_open, p_closed):
        with dial(p.port) as held, dial(p.port) as ender:
            held.sendall(b"!hold me")
            wait_for(lambda p=p: p.element("events_total", kind="data") == 1, 5, "held chunk sent to the element")
            start = time.monotonic()
            ender.sendall(command)
            if p is p_open:
                assert read_until(held, 8) == b"!hold me"
                assert read_until(ender, len(command)) == command
            else:
                assert ending(held, 5)[0] == "reset"
                assert ending(ender, 5)[0] == "reset"
            took = time.monotonic() - start
            assert took < 1.0, f"the pending events got the policy only after {took:.2f}s"
            assert p.element("failures_total", cause="session_down") == 2
        assert "2 events unanswered (session_down), failure policy" in p.log()
        assert ("ended its session" if how == "hangup" else "session lost, redialing: INTERNAL") in p.log()
        wait_for(lambda p=p: p.element("session_up") == 1, 3, "session back up")
        still_serving(p)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def exhaust_fds(h: Harness, *options: str) -> tuple[Proxy, collections.Counter[str], int]:
    """A proxy (one passthrough element) whose RLIMIT_NOFILE is lowered to 64 after it started,
    then 80 connections at once, each sending `ping` and reading the answer while all are open.
    Returns the proxy, what the clients saw, and its descriptor count before."""
    upstream = h.upstream()
    _, element = h.element(PASSTHROUGH)
    p = h.proxy([element], "--target", f"127.0.0.1:{upstream.port}", *options)
    before = fd_count(p.proc.pid)
    subprocess.run(["prlimit", "--nofile=64:64", "--pid", str(p.proc.pid)], check=True)
    seen: collections.Counter[str] = collections.Counter()
    socks = []
    for _ in range(80):
        try:
            socks.append(dial(p.port))
        except ConnectionResetError:
            seen["reset"] += 1  # reset before connect() returned
    try:
        for sock in socks:
            sock.settimeout(5)
            try:
                sock.sendall(b"ping")  # a reset seen here is consumed: recv would then say EOF
                got = sock.recv(4)
                seen["served" if got == b"ping" else "eof" if got == b"" else f"got {got!r}"] += 1
            except (ConnectionResetError, BrokenPipeError):
                seen["reset"] += 1
            except TimeoutError:
                seen["timeout"] += 1
        assert p.proc.alive(), "the proxy died of running out of file descriptors"
    finally:
        for sock in socks:
            sock.close()
    print(f"fd exhaustion {options}: {dict(seen)} (descriptors before: {before}), "
          f"proxy outcomes {dict(p.outcomes())}")
    wait_for(lambda: fd_count(p.proc.pid) <= before + 2, 10, "descriptors released")
    return p, seen, before


def test_running_out_of_file_descriptors_does_not_kill_the_proxy(h: Harness) -> None:
    p, seen, _ = exhaust_fds(h)
    assert seen["served"] >= 10 and seen["timeout"] == 0, seen
    for i in range(3):
        assert echo(p.port, b"served again %d" % i) == b"served again %d" % i
    assert p.proc.alive() and p.get("/healthz") == (200, "ok\n")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_connections_beyond_the_descriptor_limit_are_reset_and_logged(h: Harness, loop: str) -> None:
    """The proxy admits what RLIMIT_NOFILE leaves room for (two descriptors a connection) and
    resets the rest at accept, counted and logged, rather than accepting connections whose
    dials must fail, or (libuv's own answer) closing them with a clean EOF."""
    p, seen, _ = exhaust_fds(h, "--event-loop", loop)
    assert seen["served"] >= 10 and seen["served"] + seen["reset"] == 80, seen
    assert p.value("element_proxy_connections_refused_total") == seen["reset"]
    assert "upstream_unreachable" not in p.outcomes(), p.outcomes()
    assert "no file descriptors left for its upstream" in p.log()
    assert echo(p.port, b"served again") == b"served again"


def test_accept_failing_for_want_of_descriptors_resets_each_waiting_client(h: Harness) -> None:
    """RLIMIT_NOFILE lowered to what the proxy already holds: accept() itself fails (EMFILE).
    The proxy spends its reserve descriptor to accept and reset each waiting client, logs it,
    and serves again once descriptors are back."""
    upstream = h.upstream()
    p = h.proxy([], "--target", f"127.0.0.1:{upstream.port}")
    soft, hard = resource.prlimit(p.proc.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(p.proc.pid, resource.RLIMIT_NOFILE, (fd_count(p.proc.pid), hard))
    outcomes = [dial_outcome(p.port) for _ in range(5)]
    assert all((end, got) == ("reset", b"") for end, _, got in outcomes), outcomes
    assert max(took for _, took, _ in outcomes) < 0.5, outcomes
    wait_for(lambda: "out of file descriptors (Too many open files)" in p.log(), 5, "the refusal logged")
    assert upstream.accepted == 0
    resource.prlimit(p.proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert echo(p.port, b"served again") == b"served again"
    assert p.value("element_proxy_connections_refused_total") == 5
    assert p.proc.alive()


def test_a_stalling_observe_element_costs_dropped_events_never_bytes_or_memory(h: Harness) -> None:
    """An observe-mode tap that sleeps 1 s after every message it reads: gRPC flow control stops
    the proxy's writes to it, so its queue fills. 64 MiB each way still arrive byte-exact and
    unhurried, the events beyond the cap are dropped and counted, and the proxy's memory stays
    within the cap (4 MiB of queued events) plus what gRPC buffers."""
    size = 64 * MiB
    upstream = h.upstream()
    _, tap = h.element(FAULTY, "--observe-stall", "1")
    p = h.proxy([tap], "--element-failure", "open", "--target", f"127.0.0.1:{upstream.port}")
    idle = p.rss()
    side = Side()
    start = time.monotonic()
    run_async(client(p.port, 1, EXCHANGE, size, size, side=side, upstream=upstream), 60)
    took = time.monotonic() - start
    growth = p.rss() - idle
    dropped = p.element("failures_total", cause="backlog_full")
    print(f"64 MiB each way past a stalling tap: {took:.1f}s, proxy RSS +{growth / MiB:.1f} MiB, "
          f"{dropped:.0f} events dropped")
    assert judge_pair(EXCHANGE, side, upstream.record(1)) is None
    assert dropped > 0, "the tap's queue never filled: the test did not stall it"
    assert growth < 32 * MiB, f"the proxy grew {growth / MiB:.0f} MiB queueing for a stalled tap"
    assert p.outcomes() == {"completed": 1}


# --- 7. limits and the circuit breaker -------------------------------------------------------------

@contextlib.contextmanager
def _silent_listener() -> Iterator[int]:
    """A loopback port whose SYNs go unanswered: its accept queue (backlog 0) is filled by one
    connection nobody accepts, so the kernel drops further SYNs and a dial hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        time.sleep(0.2)
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", port))
            pytest.fail("the silent listener answered a SYN: cannot test a connect timeout this way")
        except TimeoutError:
            pass
        finally:
            probe.close()
        yield port
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


def test_an_upstream_that_never_answers_is_reset_after_connect_timeout_ms(h: Harness) -> None:
    with _silent_listener() as port:
        p = h.proxy([], "--target", f"127.0.0.1:{port}", "--connect-timeout-ms", "300")
        with dial(p.port) as sock:
            sock.sendall(b"hello")
            end, took, rest = ending(sock, 5)
    assert (end, rest) == ("reset", b""), "the client learns the dial failed, by RST"
    assert 0.25 <= took <= 0.3 + SWEEP_SLACK, f"reset {took:.3f}s after the request, timeout 0.3 s"
    (closed,) = p.wait_closed(1)
    assert closed["outcome"] == "upstream_unreachable"
    assert closed["detail"] == f"dialing 127.0.0.1:{port} failed: timed out"


def test_an_upstream_that_refuses_is_reset_at_once_and_named(h: Harness) -> None:
    port = free_port()  # nothing listens there
    p = h.proxy([], "--target", f"127.0.0.1:{port}")
    start = time.monotonic()
    with dial(p.port) as sock:
        try:
            sock.sendall(b"hello")
            end, took, rest = ending(sock, 5)
        except ConnectionResetError:  # the refused dial's RST can beat the client's first write
            end, took, rest = "reset", time.monotonic() - start, b""
    assert (end, rest) == ("reset", b"")
    assert took < 0.5, f"a refused dial resets the client at once, not after {took:.3f}s"
    (closed,) = p.wait_closed(1)
    assert closed["outcome"] == "upstream_unreachable"
    assert closed["detail"] == f"dialing 127.0.0.1:{port} failed: Connection refused"


def test_max_connections_refuses_the_sixth_at_once_with_rst_and_counts_it(h: Harness) -> None:
    upstream = h.upstream()
    p = h.proxy([], "--target", f"127.0.0.1:{upstream.port}", "--max-connections", "5")
    held = [dial(p.port) for _ in range(5)]
    try:
        for i, sock in enumerate(held):
            sock.sendall(b"held%d" % i)
            assert read_until(sock, 5) == b"held%d" % i
        end, took, got = dial_outcome(p.port)
        assert (end, got) == ("reset", b""), (end, got)
        assert took < 0.5, f"the refusal took {took:.3f}s"
        assert p.value("element_proxy_connections_refused_total") == 1
        assert p.value("element_proxy_connections_active", listener=f"127.0.0.1:{p.port}") == 5
        assert upstream.accepted == 5, "a refused connection must never be dialed"
        held.pop().close()
        wait_for(lambda: p.value("element_proxy_connections_active", listener=f"127.0.0.1:{p.port}") == 4, 5)
        assert echo(p.port, b"room again") == b"room again"
        assert p.value("element_proxy_connections_refused_total") == 1
    finally:
        for sock in held:
            sock.close()


def test_idle_timeout_closes_an_idle_connection_with_eof_and_spares_a_busy_one(h: Harness) -> None:
    upstream = h.upstream()
    p = h.proxy([], "--target", f"127.0.0.1:{upstream.port}", "--idle-timeout-ms", "500")
    busy_result: list[str] = []

    def busy() -> None:
        with dial(p.port) as sock:
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                sock.sendall(b"tick")
                if read_until(sock, 4) != b"tick":
                    busy_result.append("lost its echo")
                    return
                time.sleep(0.1)
            busy_result.append("alive")

    worker = threading.Thread(target=busy)
    worker.start()
    with dial(p.port) as idle:
        idle.sendall(b"once")
        assert read_until(idle, 4) == b"once"
        end, took, got = ending(idle, 5)
    worker.join(10)
    assert (end, got) == ("eof", b""), f"an idle connection must be closed with a FIN: {end} {got!r}"
    assert 0.45 <= took <= 0.5 + SWEEP_SLACK, f"closed after {took:.3f}s of idleness"
    assert busy_result == ["alive"], "a connection moving bytes every 0.1s must outlive the idle timeout"
    closed = p.wait_closed(2)
    assert [e["outcome"] for e in closed] == ["idle_timeout", "completed"], closed
    assert p.value("element_proxy_connections_closed_total", outcome="idle_timeout") == 1


def test_max_duration_resets_a_busy_long_connection(h: Harness) -> None:
    upstream = h.upstream()
    p = h.proxy([], "--target", f"127.0.0.1:{upstream.port}", "--max-duration-ms", "500")
    with dial(p.port) as sock:
        start = time.monotonic()
        end = "?"
        try:
            while time.monotonic() - start < 5:
                sock.sendall(b"busy" * 1000)
                assert len(read_until(sock, 4000)) == 4000
        except (ConnectionResetError, BrokenPipeError):
            end = "reset"
        took = time.monotonic() - start
    assert end == "reset", "a busy connection older than max_duration_ms must be reset"
    assert 0.5 <= took <= 0.5 + SWEEP_SLACK, f"reset after {took:.3f}s"
    (closed,) = p.wait_closed(1)
    assert closed["outcome"] == "max_duration", closed
    wait_for(lambda: upstream.echoes and upstream.echoes[0].done.is_set(), 5)
    assert upstream.echoes[0].read_end == "reset", "the upstream must see the reset too"


def test_circuit_breaker_skips_or_refuses_then_closes_when_the_health_probe_passes(h: Harness) -> None:
    """breaker_failures = 3, breaker_cooldown_ms = 1000 (TOML): three timeouts open it; while it
    is open a fail-open proxy skips the element (fast, unprocessed) and a fail-closed one refuses
    new connections; a probe of the still-sick element keeps it open; once the element is healthy
    the next probe closes it and new connections are processed again."""
    upstream = h.upstream()
    control = h.tmp_path / "delay"
    control.write_text("2")  # every chunk answered after 2 s, health NOT_SERVING
    faulty, element = h.element(FAULTY, "--control", str(control))
    common = {"address": element, "timeout_ms": 300, "breaker_failures": 3, "breaker_cooldown_ms": 1000}
    p_open = h.proxy([], "--config", h.config("open", failure="open", **common),
                     "--target", f"127.0.0.1:{upstream.port}")
    p_closed = h.proxy([], "--config", h.config("closed", failure="closed", **common),
                       "--target", f"127.0.0.1:{upstream.port}")

    def three_timeouts(p: Proxy, expect: str) -> None:
        socks = [dial(p.port) for _ in range(3)]
        for sock in socks:
            sock.sendall(b"slow")
        for sock in socks:
            if expect == "unprocessed":
                assert read_until(sock, 4) == b"slow"
            else:
                end, _, got = ending(sock, 5)
                assert (end, got) == ("reset", b"")
            sock.close()
        assert p.element("failures_total", cause="timeout") == 3
        assert p.element("breaker_open") == 1

    three_timeouts(p_open, "unprocessed")
    events = p_open.element("events_total", kind="data")
    start = time.monotonic()
    assert echo(p_open.port, b"skipped") == b"skipped"
    took = time.monotonic() - start
    assert took < 0.2, f"with the breaker open a fail-open element is skipped, yet it took {took:.3f}s"
    assert p_open.element("events_total", kind="data") == events, "the skipped element was sent events"

    three_timeouts(p_closed, "reset")
    end, took, got = dial_outcome(p_closed.port)
    assert (end, got) == ("reset", b"") and took < 0.5, (end, took, got)
    assert p_closed.value("element_proxy_connections_refused_total") == 1

    # past the cool-down each proxy's probe finds the element NOT_SERVING: the breaker stays open
    wait_for(lambda: faulty.output().count("health check: NOT_SERVING") >= 2, 3, "both proxies probed")
    assert p_open.element("breaker_open") == 1 and p_closed.element("breaker_open") == 1

    control.write_text("0")  # fast and SERVING
    healed = time.monotonic()
    for p in (p_open, p_closed):
        wait_for(lambda p=p: p.element("breaker_open") == 0, 3, "breaker closed")
    took = time.monotonic() - healed
    assert took < 1.0 + SWEEP_SLACK, f"the breaker closed {took:.2f}s after the element healed"
    for p in (p_open, p_closed):
        assert echo(p.port, b"healed", b"healed<f>") == b"healed<f>"
        assert "circuit breaker closed (health probe passed)" in p.log()
        assert "circuit breaker open after 3 failures in a row" in p.log()
