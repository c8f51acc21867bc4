"""elements/resp.py: the RESP request framer, pure (hypothesis: random pipelines cut at random
places), and against a real redis-server (what it runs is what the framer finds)."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elements.resp import HEAD_BYTES, Command, Resp, split_args
from elements.sdk import Event
from tests.procs import Proc, free_port


def frames(pieces: list[bytes]) -> list[tuple[Event, Command | str]]:
    """Feeds the pieces in order: every HEAD and END with what was found, a BROKEN with its problem."""
    framer, out = Resp(), []
    for piece in pieces:
        pos = 0
        while pos < len(piece):
            pos, event = framer.step(piece, pos)
            if event is Event.BROKEN:
                return [*out, (event, framer.problem)]
            if event is not None:
                out.append((event, framer.found))
    return out


def array(args: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def inline(args: list[bytes]) -> bytes:
    """Every argument double-quoted with \\xHH escapes: any bytes survive."""
    return b" ".join(b'"' + b"".join(b"\\x%02x" % c for c in a) + b'"' for a in args) + b"\r\n"


arguments = st.lists(st.binary(max_size=12), min_size=1, max_size=5)
# commands the server skips without a reply, and whether they are inline
EMPTY = [(b"*0\r\n", False), (b"*-1\r\n", False), (b"\r\n", True), (b"\n", True), (b"  \t\r\n", True)]
commands = st.lists(st.tuples(st.sampled_from(["array", "inline", "empty"]), arguments), max_size=12)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands=commands, data=st.data())
def test_a_pipeline_cut_anywhere_frames_into_its_commands(commands: list[tuple[str, list[bytes]]],
                                                          data: st.DataObject) -> None:
    wire, want = b"", []
    for form, args in commands:
        if form == "empty":
            empty, is_inline = data.draw(st.sampled_from(EMPTY), label="empty")
            wire += empty
            want.append(Command((), 0, inline=is_inline))
        else:
            wire += array(args) if form == "array" else inline(args)
            want.append(Command(tuple(args), len(args), inline=form == "inline"))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(len(wire) - 1, 1)), max_size=10), label="cuts"))
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)]) if wire[a:b]]
    assert frames(pieces) == [(Event.END, command) for command in want]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=arguments, cut=st.integers(1, 2000), data=st.data())
def test_a_large_argument_ends_the_head_before_it_and_streams(before: list[bytes], cut: int,
                                                              data: st.DataObject) -> None:
    big = b"v" * (HEAD_BYTES + 10)
    args = [b"SET", *before[:1], big, b"after"]
    wire = array(args) + array([b"PING"])
    cuts = sorted({cut, *data.draw(st.sets(st.integers(1, len(wire) - 1), max_size=6), label="cuts")})
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)]) if wire[a:b]]
    found = frames(pieces)
    head = Command((b"SET", *before[:1]), len(args))
    assert found == [(Event.HEAD, head), (Event.END, head), (Event.END, Command((b"PING",), 1))]


soup = st.lists(st.sampled_from([b"*", b"$", b"\r", b"\n", b"\r\n", b"0", b"1", b"2", b"3", b"-", b"-1", b"10",
                                  b"\0", b"x", b"PING", b" ", b'"', b"'", b"\\", b"*1\r\n$4\r\nPING\r\n"]),
                max_size=40).map(b"".join)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wire=soup, data=st.data())
def test_any_bytes_frame_the_same_whole_byte_by_byte_and_cut_anywhere(wire: bytes, data: st.DataObject) -> None:
    """The fast path for whole arrays and the state machine agree on every input, broken ones too."""
    cuts = sorted(data.draw(st.sets(st.integers(1, max(len(wire) - 1, 1)), max_size=5), label="cuts"))
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)]) if wire[a:b]]
    assert frames([wire]) == frames([bytes([b]) for b in wire]) == frames(pieces)


@pytest.mark.parametrize(("wire", "want"), [
    (b"*1\rX$4\r\nPINGxy", [Command((b"PING",), 1)]),  # the server skips the byte after \r, and the two after a bulk
    (b"FLU\"SHALL\"\r\n", [Command((b"FLUSHALL",), 1, True)]),
    (b"'FLUSH\\'ALL'\r\n", [Command((b"FLUSH'ALL",), 1, True)]),
    (b"\"\\x46LUSH\\ALL\"\n", [Command((b"FLUSHALL",), 1, True)]),  # \A is A (\a would be the bell)
    (b"PING\rFLUSHALL\n", [Command((b"PING", b"FLUSHALL"), 2, True)]),  # a \r inside the line splits, not ends
    (b"FLUSHALL\x0b\r\n", [Command((b"FLUSHALL\x0b",), 1, True)]),  # \v is a blank to skip, not a token's end
    (b"\x0bFLUSHALL\r\n", [Command((b"FLUSHALL",), 1, True)]),
    (b"*-7\r\n*0\r\n", [Command((), 0), Command((), 0)]),
])
def test_what_the_server_accepts(wire: bytes, want: list[Command]) -> None:
    """Whole (an array in one piece takes the fast path) and one byte at a time (the state machine)."""
    assert frames([wire]) == frames([bytes([b]) for b in wire]) == [(Event.END, command) for command in want]


@pytest.mark.parametrize(("wire", "says"), [
    (b"*00\r\n", "invalid multibulk length"), (b"*-0\r\n", "invalid multibulk length"),
    (b"*+1\r\n", "invalid multibulk length"), (b"*2147483648\r\n", "invalid multibulk length"),
    (b"*1\r\n$-1\r\n", "invalid bulk length"), (b"*1\r\n$536870913\r\n", "invalid bulk length"),
    (b"*1\r\n:1\r\n", "expected '$'"), (b"*1" + b"1" * 30, "invalid multibulk length"),
    (b"FLUSHALL\x00\r\n", "a NUL byte"), (b'"FLUSHALL\r\n', "unbalanced quotes"),
    (b'"a"b\r\n', "unbalanced quotes"), (b"x" * (64 * 1024 + 1), "too big inline request"),
])
def test_what_the_server_refuses_breaks_the_framing(wire: bytes, says: str) -> None:
    for pieces in ([wire], [bytes([b]) for b in wire]):
        [(event, problem)] = frames(pieces)
        assert event is Event.BROKEN and says in str(problem), problem


# ---- against the real server ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def redis_port() -> Iterator[int]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    with Proc(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]) as proc:
        proc.wait_for_port("127.0.0.1", port)
        yield port


def server_reply(port: int, wire: bytes) -> bytes:
    """The server's first reply line to `wire` (b"" when it closed instead)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(wire)
        got = b""
        while b"\r\n" not in got:
            data = sock.recv(65536)
            if not data:
                break
            got += data
        if got.startswith(b"$") and got.count(b"\r\n") < 2:
            got += sock.recv(65536)
        return got


token = st.lists(st.sampled_from(list(b"ab'\"\\ x4F1\t\x0b\x0c")), max_size=10).map(bytes)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=token)
def test_inline_arguments_split_as_the_server_splits_them(redis_port: int, text: bytes) -> None:
    """ECHO answers its one argument: split_args agrees with the server on what it is, on
    how many there are (a wrong count is an arity error) and on unbalanced quotes."""
    line = b"ECHO " + text
    reply = server_reply(redis_port, line + b"\r\n")
    args = split_args(line)
    if args is None:
        assert b"Protocol error: unbalanced quotes" in reply, reply
    elif len(args) == 2:
        head, _, rest = reply.partition(b"\r\n")
        assert head == b"$%d" % len(args[1]) and rest.startswith(args[1]), (reply, args)
    else:
        assert reply.startswith(b"-ERR wrong number of arguments"), (reply, args)


@pytest.mark.parametrize("wire", [b"*1\rX$4\r\nPINGxy", b"NOS\"UCHCMD\"\r\n", b"PING\rNOSUCHCMD\n",
                                  b"*2\r\n$4\r\nECHO\r\n$3\r\na\r\n\r\n", b"\x0bNOSUCHCMD\r\n"])
def test_the_server_runs_what_the_framer_finds(redis_port: int, wire: bytes) -> None:
    """Hand-made quirks: the command the framer finds is the one the server runs (PING answers
    PONG or its argument, ECHO its argument, an unknown command names itself)."""
    [(_, command)] = frames([wire])
    assert isinstance(command, Command)
    reply = server_reply(redis_port, wire)
    name = command.args[0].upper()
    if name == b"PING":
        assert reply.startswith(b"+PONG" if len(command.args) == 1 else b"$"), reply
    elif name == b"ECHO":
        assert reply == b"$%d\r\n%s\r\n" % (len(command.args[1]), command.args[1]), reply
    else:
        assert b"unknown command '%s'" % command.args[0] in reply, reply
