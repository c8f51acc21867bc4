"""elements/redis_guard.py for real: redis-server behind `python -m proxy`, the guard as its own
process, and redis-cli, redis-benchmark, redis-py and raw sockets as clients, on loopback.

"Blocked" is judged at the server: the keys a FLUSHALL would have removed are still there,
and the client got the guard's error in the place of the blocked command's reply."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elements.api import element_pb2 as pb
from elements.redis_guard import RedisGuard, rejected
from elements.redis_rules import Policy, glob, rules
from elements.resp import Command
from elements.sdk import process
from tests.procs import Proc, free_port, start_element
from tests.stack import proxy

BLOCKED = b"blocked by element-proxy (redis_guard)"
MiB = 1 << 20

pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("redis-server", "redis-cli", "redis-benchmark")),
                                reason="needs redis-server and redis-tools (apt-get install redis-server redis-tools)")


@dataclass
class Guarded:
    """redis-server, and a proxy in front of it with one redis_guard."""

    redis: int
    port: int
    proxy: Proc
    guard: Proc

    def cli(self, *args: str, port: int | None = None) -> str:
        done = subprocess.run(["redis-cli", "-p", str(port or self.port), *args], capture_output=True, timeout=30,
                              check=True)
        return done.stdout.decode(errors="replace").strip()

    def direct(self, *args: str) -> str:
        """Straight to the server, past the proxy: what is really there."""
        return self.cli(*args, port=self.redis)


@contextmanager
def guarded(*guard_args: str) -> Iterator[Guarded]:
    with ExitStack() as stack:
        port = free_port()
        server = stack.enter_context(Proc(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                           "--appendonly", "no"]))
        server.wait_for_port("127.0.0.1", port)
        guard, guard_port = start_element("elements.redis_guard", *guard_args)
        stack.callback(guard.stop)
        front, front_port = stack.enter_context(proxy([f"127.0.0.1:{guard_port}"], "--target", f"127.0.0.1:{port}"))
        yield Guarded(port, front_port, front, guard)


@pytest.fixture(scope="module")
def g() -> Iterator[Guarded]:
    with guarded("--deny", "FLUSHALL,CONFIG") as running:
        assert running.direct("SET", "survivor", "1") == "OK"  # what a FLUSHALL getting through would remove
        yield running


def replies(sock: socket.socket, count: int, timeout: float = 20.0) -> list[bytes]:
    """The next `count` replies, each as its first line (the tests' replies are one line or a bulk)."""
    sock.settimeout(timeout)
    buf, out = b"", []
    while len(out) < count:
        while b"\r\n" not in buf:
            data = sock.recv(1 << 16)
            assert data, f"connection ended after {len(out)} of {count} replies"
            buf += data
        line, buf = buf.split(b"\r\n", 1)
        if line.startswith(b"$") and line != b"$-1":
            while len(buf) < int(line[1:]) + 2:
                buf += sock.recv(1 << 16)
            line, buf = buf[:int(line[1:])], buf[int(line[1:]) + 2:]
        out.append(line)
    return out


def dial(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def array(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def test_flushall_in_every_case_and_form_is_blocked_and_the_keys_survive(g: Guarded) -> None:
    for spelling in ("FLUSHALL", "flushall", "FlushAll"):
        assert BLOCKED.decode() in g.cli(spelling)  # redis-cli sends the RESP array form
    with dial(g.port) as sock:  # inline forms, one of them split across writes 50 ms apart
        sock.sendall(b"flushall\r\n" + b'"FLUSH\\x41LL"\r\n' + b"FLU'SHALL'\r\n" + b"SET k v\r\n")
        sock.sendall(b"flu")
        time.sleep(0.05)
        sock.sendall(b"shall\r\nPING\r\n")
        got = replies(sock, 6)
    assert [BLOCKED in r for r in got] == [True, True, True, False, True, False], got
    assert got[3] == b"+OK" and got[5] == b"+PONG"
    assert g.direct("GET", "survivor") == "1" and g.direct("GET", "k") == "v"


def test_flushall_mid_pipeline_gets_its_error_in_order_and_every_other_command_its_reply(g: Guarded) -> None:
    commands = [array(b"SET", b"pipe:%d" % i, b"%d" % i) for i in range(1000)]
    commands[500] = array(b"FLUSHALL")
    wire = b"".join(commands)
    with dial(g.port) as sock:
        for i in range(0, len(wire), 4093):  # writes that cut commands anywhere
            sock.sendall(wire[i:i + 4093])
        got = replies(sock, 1000)
        sock.sendall(array(b"PING"))
        assert replies(sock, 1) == [b"+PONG"]  # the same connection, still usable
    assert got[:500] == [b"+OK"] * 500 and got[501:] == [b"+OK"] * 499
    assert got[500].startswith(b"-ERR unknown command 'FLUSHALL " + BLOCKED)
    assert g.direct("GET", "pipe:0") == "0" and g.direct("GET", "pipe:999") == "999"


def test_inside_multi_a_blocked_command_makes_exec_abort_as_the_server_does_for_a_rejected_one(g: Guarded) -> None:
    with dial(g.port) as sock:
        sock.sendall(b"MULTI\r\nSET inmulti 1\r\nflushall\r\nEXEC\r\nGET inmulti\r\n")
        got = replies(sock, 5)
    assert got[:2] == [b"+OK", b"+QUEUED"] and BLOCKED in got[2]
    assert got[3].startswith(b"-EXECABORT") and got[4] == b"$-1"


def test_config_and_its_subcommands_are_blocked_other_commands_pass(g: Guarded) -> None:
    assert BLOCKED.decode() in g.cli("CONFIG", "GET", "maxmemory")
    assert BLOCKED.decode() in g.cli("config", "set", "maxmemory", "1")
    assert g.direct("CONFIG", "GET", "maxmemory").splitlines()[1] == "0"
    assert g.cli("ECHO", "config") == "config"


def test_a_protocol_error_gets_the_servers_error_and_a_close(g: Guarded) -> None:
    with dial(g.port) as sock:
        sock.sendall(b"*1\r\n$x\r\n")
        sock.settimeout(5)
        got = b""
        while data := sock.recv(4096):
            got += data
    assert got == b"-ERR Protocol error: invalid bulk length (element-proxy redis_guard)\r\n"


def test_redis_py_with_a_pool_gets_a_response_error_naming_the_block_and_the_pool_keeps_working(g: Guarded) -> None:
    redis = pytest.importorskip("redis")
    pool = redis.ConnectionPool(host="127.0.0.1", port=g.port, max_connections=2)
    client = redis.Redis(connection_pool=pool)
    client.set("pooled", "yes")
    for _ in range(3):
        with pytest.raises(redis.ResponseError, match="blocked by element-proxy"):
            client.flushall()
    with pytest.raises(redis.ResponseError, match="blocked by element-proxy"):  # the queued error, then EXECABORT
        with client.pipeline(transaction=True) as pipe:
            pipe.set("in-tx", "1")
            pipe.execute_command("FLUSHALL")
            pipe.execute()
    assert client.get("pooled") == b"yes" and client.get("in-tx") is None
    assert [client.incr("counter") for _ in range(5)] == [1, 2, 3, 4, 5]
    assert len(pool._available_connections) + len(pool._in_use_connections) <= 2  # reused, not replaced
    pool.disconnect()


def test_redis_benchmark_pipelined_through_the_guard_gets_no_error(g: Guarded) -> None:
    """redis-benchmark 7 stops at the first error reply (exit 1), so exit 0 with every test's
    figure means every reply was a good one. (It warns that it could not read the server's
    CONFIG: the guard blocks CONFIG.)"""
    done = subprocess.run(["redis-benchmark", "-p", str(g.port), "-P", "16", "-c", "20", "-n", "20000", "-q",
                           "-t", "set,get,lpush,lrange_100,mset"], capture_output=True, timeout=120)
    out = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    assert done.returncode == 0, out
    assert "Error" not in out, out
    assert [line.split(":")[0] for line in out.splitlines() if "requests per second" in line] == [
        "SET", "GET", "LPUSH", "LPUSH (needed to benchmark LRANGE)", "LRANGE_100 (first 100 elements)",
        "MSET (10 keys)"], out


def rss_peak_mb(proc: Proc) -> float:
    with open(f"/proc/{proc.pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def test_a_100_mb_value_streams_through_the_guard_and_neither_process_grows_32_mb() -> None:
    with guarded("--deny", "FLUSHALL") as fresh:
        assert fresh.cli("PING") == "PONG"  # sessions up, everything warm
        before = {"proxy": rss_peak_mb(fresh.proxy), "guard": rss_peak_mb(fresh.guard)}
        value = hashlib.sha256(b"seed").digest() * (100 * MiB // 32)
        with dial(fresh.port) as sock:
            sock.sendall(b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$%d\r\n" % len(value))
            view = memoryview(value)
            for i in range(0, len(value), MiB):
                sock.sendall(view[i:i + MiB])
            sock.sendall(b"\r\n" + array(b"STRLEN", b"big") + array(b"GET", b"big"))
            got = replies(sock, 3, timeout=60)
        grew = {name: rss_peak_mb(p) - before[name] for name, p in (("proxy", fresh.proxy), ("guard", fresh.guard))}
    assert got[:2] == [b"+OK", b":%d" % len(value)]
    assert hashlib.sha256(got[2]).digest() == hashlib.sha256(value).digest()
    assert all(mb < 32 for mb in grew.values()), grew


# ---- every spelling, every cut: hypothesis against the real server ------------------------------

def spellings(draw: st.DrawFn) -> bytes:
    """FLUSHALL as the server would accept it: any case, array or inline, quoted or escaped in part."""
    name = bytes(c ^ 0x20 if draw(st.booleans()) else c for c in b"FLUSHALL")
    form = draw(st.sampled_from(["array", "plain", "quoted", "hex", "split-quote"]))
    if form == "array":
        return array(name)
    if form == "plain":
        return name + draw(st.sampled_from([b"\r\n", b"\n", b" \r\n"]))
    if form == "quoted":
        return b'"' + name + b'"\r\n'
    if form == "hex":
        return b'"' + b"".join(b"\\x%02x" % c if draw(st.booleans()) else bytes([c]) for c in name) + b'"\r\n'
    return name[:3] + b"'" + name[3:] + b"'\r\n"


@st.composite
def pipelines(draw: st.DrawFn) -> tuple[list[bytes], list[bool]]:
    """Commands, and which of them are a FLUSHALL."""
    commands, blocked = [], []
    for i in range(draw(st.integers(1, 25))):
        if draw(st.integers(0, 3)) == 0:
            commands.append(spellings(draw))
            blocked.append(True)
        else:
            commands.append(array(b"SET", b"h:%d" % i, b"x") if draw(st.booleans()) else b"SET h:%d x\r\n" % i)
            blocked.append(False)
    return commands, blocked


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(pipeline=pipelines(), data=st.data())
def test_any_spelling_of_flushall_split_anywhere_in_a_pipeline_is_blocked(g: Guarded, pipeline: tuple[list[bytes],
                                                                           list[bool]], data: st.DataObject) -> None:
    commands, blocked = pipeline
    wire = b"".join(commands)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(wire) - 1), max_size=6), label="cuts"))
    with dial(g.port) as sock:
        for piece in (wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)])):
            sock.sendall(piece)
            if data.draw(st.integers(0, 4), label="pause") == 0:
                time.sleep(0.005)  # a write of its own, most likely a chunk of its own
        got = replies(sock, len(commands))
    assert [BLOCKED in r for r in got] == blocked, (wire, got)
    assert all(r == b"+OK" for r, b in zip(got, blocked) if not b)
    assert g.direct("EXISTS", "survivor") == "1"


# ---- pure: rules and the Process RPC ---------------------------------------------------------------

def test_allow_lists_subcommands_and_key_rules() -> None:
    policy = Policy(deny=rules(["CONFIG SET"]), allow=rules(["GET,SET,CONFIG,DEL,MSET"]),
                    protect=(glob("config:*"), glob("[ab]?x")))
    assert policy.blocked(Command((b"GET", b"config:a"), 2)) is None  # reads are not key-checked
    assert policy.blocked(Command((b"config", b"get", b"x"), 3)) is None
    assert policy.blocked(Command((b"CONFIG", b"Set", b"x", b"1"), 4)) == "CONFIG SET"
    assert policy.blocked(Command((b"KEYS", b"*"), 2)) == "KEYS (not allowed)"
    assert policy.blocked(Command((b"set", b"config:a", b"1"), 3)) == "SET (a protected key)"
    assert policy.blocked(Command((b"MSET", b"ok", b"1", b"bzx", b"2"), 5)) == "MSET (a protected key)"
    assert policy.blocked(Command((b"MSET", b"ok", b"1", b"czx", b"2"), 5)) is None
    assert policy.blocked(Command((b"DEL", b"ok"), 3)) == "DEL (a protected key)"  # a key beyond the head: unseen
    assert policy.blocked(Command((b"FLUSHALL\x00junk",), 1)) == "FLUSHALL (not allowed)"
    assert Policy(deny=rules(["flushall"])).blocked(Command((b"FLUSHALL\x00junk",), 1)) == "FLUSHALL"


def test_process_shows_what_the_guard_does_to_a_command_given_as_text() -> None:
    guard = RedisGuard(Policy(deny=rules(["FLUSHALL"])))
    answer = asyncio.run(process(guard, pb.ProcessRequest(text="flushall\r\n")))
    assert answer.verdict.action == pb.ACTION_PASS
    assert answer.verdict.data == rejected("FLUSHALL blocked by element-proxy (redis_guard)")
    split = asyncio.run(process(guard, pb.ProcessRequest(chunks=[pb.ProcessChunk(text="GET a\r\nFLU"),
                                                                  pb.ProcessChunk(text="SHALL\r\n")])))
    assert [c.verdict.action for c in split.chunks] == [pb.ACTION_HOLD, pb.ACTION_PASS]
    assert split.chunks[1].data == b"GET a\r\n" + rejected("FLUSHALL blocked by element-proxy (redis_guard)")
