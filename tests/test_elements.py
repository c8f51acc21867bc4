"""The example elements: real processes over a real Session, plus their pure parts with hypothesis."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from elements.api import element_pb2 as pb
from elements.api import element_pb2_grpc as pb_grpc
from elements.firewall import Firewall
from elements.rewrite import Rewriter
from elements.sdk import Chunk, Connection, Direction, Reset
from tests.elements_for_tests.client import (
    RESPONSE, by_key, close_event, data_event, exchange, open_event, verdicts,
)
from tests.procs import REPO, start_element


@pytest.fixture(scope="module")
def firewall() -> Iterator[int]:
    proc, port = start_element("elements.firewall", "--deny-cidr", "10.0.0.0/8", "--deny-cidr", "2001:db8::/32",
                               "--deny-port", "23", "--pattern", "FLUSHALL", "--regex", r"DROP\s+TABLE",
                               "--direction", "request")
    with proc:
        yield port


def test_firewall_denies_destinations_on_open(firewall: int) -> None:
    got = by_key(exchange(firewall, [
        open_event("cidr", "10.1.2.3"), open_event("port", "192.0.2.1", 23), open_event("ok", "192.0.2.1", 80),
        open_event("mapped", "::ffff:10.0.0.1"), open_event("v6", "2001:db8::5", 443),
    ]))
    assert {cid: v.action for (cid, _), v in got.items()} == {
        "cidr": pb.ACTION_RESET, "port": pb.ACTION_RESET, "ok": pb.ACTION_PASS,
        "mapped": pb.ACTION_RESET, "v6": pb.ACTION_RESET,
    }


def test_firewall_catches_a_pattern_split_across_chunks_of_one_connection(firewall: int) -> None:
    got = by_key(exchange(
        firewall,
        [data_event("split", 1, b"*1\r\nFLU"), data_event("a", 1, b"xxFLU"), data_event("b", 1, b"SHALLxx")],
        [data_event("split", 2, b"SHALL\r\n"), data_event("resp", 1, b"FLUSHALL", RESPONSE)],
        [data_event("re", 1, b"x; DROP "), data_event("re", 2, b"  TABLE users")],
    ))
    assert got["split", 1].action == pb.ACTION_PASS
    assert got["split", 2].action == pb.ACTION_RESET
    assert got["a", 1].action == got["b", 1].action == pb.ACTION_PASS
    assert got["resp", 1].action == pb.ACTION_PASS
    assert (got["re", 1].action, got["re", 2].action) == (pb.ACTION_PASS, pb.ACTION_RESET)


def test_firewall_open_action_close_and_drop_action() -> None:
    proc, port = start_element("elements.firewall", "--deny-port", "6379", "--open-action", "close",
                               "--pattern-hex", "00ff", "--action", "drop")
    with proc:
        got = by_key(exchange(port, [open_event("redis", port=6379), open_event("c", port=80),
                                     data_event("c", 1, b"a\x00"), data_event("c", 2, b"\xffb"),
                                     data_event("c", 3, b"\xff-fine", RESPONSE)]))
    assert got["redis", 0].action == pb.ACTION_CLOSE
    assert [got["c", seq].action for seq in (0, 1, 2, 3)] == [
        pb.ACTION_PASS, pb.ACTION_PASS, pb.ACTION_DROP, pb.ACTION_PASS]


@pytest.mark.parametrize("module, args, named", [
    ("elements.firewall", ["--deny-cidr", "10.0.0.300/8"], ["--deny-cidr", "10.0.0.300/8"]),
    ("elements.firewall", ["--deny-port", "http"], ["--deny-port", "'http'"]),
    ("elements.firewall", ["--regex", "(unclosed"], ["--regex", "(unclosed"]),
    ("elements.rewrite", ["--from", "a", "--from", "b", "--to", "c"], ["--from", "--to"]),
])
def test_bad_options_exit_2_naming_the_option_and_value(module: str, args: list[str], named: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert all(text in message for text in named), message


def test_a_second_element_on_a_taken_port_exits_1_instead_of_sharing_it() -> None:
    """gRPC binds with SO_REUSEPORT by default: without the SDK turning it off, the logger below
    would start fine and take every other session meant for the firewall."""
    proc, port = start_element("elements.firewall", "--deny-port", "23")
    with proc:
        result = subprocess.run([sys.executable, "-m", "elements.logger", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=REPO, capture_output=True, text=True, timeout=20)
        names = {describe(port).name for _ in range(6)}
    assert result.returncode == 1, result.stderr
    assert (f"element logger: cannot listen on 127.0.0.1:{port} (--host / --port): Address already in use"
            in result.stderr.strip().splitlines()[-1])
    assert "Traceback" not in result.stderr
    assert names == {"firewall"}


def describe(port: int) -> pb.Description:
    """Describe over a new connection each time, so SO_REUSEPORT would spread them."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return pb_grpc.ElementStub(channel).Describe(pb.DescribeRequest(), timeout=5)


@pytest.fixture(scope="module")
def rewrite() -> Iterator[int]:
    proc, port = start_element("elements.rewrite", "--from", "needle", "--to", "PIN")
    with proc:
        yield port


def passed_bytes(verdict: pb.Verdict, original: bytes) -> bytes:
    assert verdict.action == pb.ACTION_PASS
    return verdict.data if verdict.HasField("data") else original


def test_rewrite_across_chunk_boundaries_flushes_at_end_of_stream(rewrite: int) -> None:
    chunks = [b"a nee", b"dle and a ne", b"", b"edl", b"e!", b"nee"]
    events = [data_event("r", i + 1, chunk) for i, chunk in enumerate(chunks)]
    events += [data_event("r", 7, b"", eos=True), data_event("r", 8, b"needle", RESPONSE)]
    got = by_key(exchange(rewrite, events))
    out = [passed_bytes(got["r", i + 1], chunk) for i, chunk in enumerate(chunks)]
    assert out == [b"a ", b"PIN and a ", b"", b"", b"PIN!", b""]
    assert passed_bytes(got["r", 7], b"") == b"nee"
    assert not got["r", 8].HasField("data")


def test_rewrite_of_a_large_random_stream_matches_bytes_replace(rewrite: int) -> None:
    rng = random.Random(7)
    parts = []
    for _ in range(4000):
        parts.append(rng.randbytes(rng.randrange(0, 600)))
        parts.append(rng.choice([b"needle", b"need", b"nee", b"needlneedle"]))
    stream = b"".join(parts)
    chunks, pos = [], 0
    while pos < len(stream):
        size = rng.choice([1, 3, 5, 100, 4096, 16384])
        chunks.append(stream[pos:pos + size])
        pos += size
    events = [data_event("big", i + 1, chunk, eos=i == len(chunks) - 1) for i, chunk in enumerate(chunks)]
    got = by_key(exchange(rewrite, *(events[i:i + 64] for i in range(0, len(events), 64))))
    out = b"".join(passed_bytes(got["big", i + 1], chunk) for i, chunk in enumerate(chunks))
    assert len(stream) > 1_000_000
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(stream.replace(b"needle", b"PIN")).hexdigest()


def chunked(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    return [stream[a:b] for a, b in zip(bounds, bounds[1:])]


@given(st.binary(max_size=200).map(lambda b: bytes(x % 4 + 97 for x in b)), st.lists(st.integers(0, 200)))
def test_rewriter_output_does_not_depend_on_chunking(stream: bytes, cuts: list[int]) -> None:
    rewriter = Rewriter({b"abc": b"X", b"bcd": b"YY", b"b": b"", b"dd": b"ddd"})
    whole, _ = rewriter.feed(b"", stream, final=True)
    out, held = [], b""
    for chunk in chunked(stream, cuts):
        piece, held = rewriter.feed(held, chunk, final=False)
        out.append(piece)
    out.append(rewriter.feed(held, b"", final=True)[0])
    assert b"".join(out) == whole
    single = Rewriter({b"aba": b"c"})
    assert single.feed(b"", stream, final=True)[0] == stream.replace(b"aba", b"c")


@given(st.binary(max_size=100), st.binary(max_size=100), st.lists(st.integers(0, 300)))
def test_firewall_finds_a_literal_however_the_stream_is_cut(before: bytes, after: bytes, cuts: list[int]) -> None:
    element = Firewall(patterns=[b"EVIL", b"\x00\x01"])

    def resets(stream: bytes) -> bool:
        conn = Connection("c")
        return any(element.on_data(conn, Chunk(i, Direction.REQUEST, chunk)) == Reset()
                   for i, chunk in enumerate(chunked(stream, cuts)))

    assert resets(before + b"EVIL" + after)
    clean = before + after
    assert resets(clean) == (b"EVIL" in clean or b"\x00\x01" in clean)


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_logger_logs_open_and_close(fmt: str) -> None:
    proc, port = start_element("elements.logger", "--log-format", fmt)
    with proc:
        batch = [open_event("L1", "192.0.2.1", 6379), data_event("L1", 1, b"PING\r\n"), close_event("L1", 6, 7)]
        assert verdicts(exchange(port, batch)) == []
        out = proc.wait_for_output("COMPLETED", timeout=5)
    lines = [line for line in out.splitlines() if "L1" in line]
    if fmt == "json":
        entries = [json.loads(line) for line in lines]
        assert [{k: v for k, v in entry.items() if k != "time"} for entry in entries] == [
            {"level": "info", "logger": "elements.logger", "message": "open", "id": "L1",
             "client": "198.51.100.7:40000", "destination": "192.0.2.1:6379", "listener": "127.0.0.1:15001"},
            {"level": "info", "logger": "elements.logger", "message": "close", "id": "L1", "reason": "COMPLETED",
             "request_bytes": 6, "response_bytes": 7},
        ]
    else:
        assert lines[0].endswith(" info    elements.logger: open id=L1 client=198.51.100.7:40000 "
                                 "destination=192.0.2.1:6379 listener=127.0.0.1:15001")
        assert lines[1].endswith("close id=L1 reason=COMPLETED request_bytes=6 response_bytes=7")


def test_elements_log_in_the_proxys_format() -> None:
    """LOG_FORMAT reaches an element as it reaches the proxy: one JSON object per line."""
    proc, port = start_element("elements.firewall", "--pattern", "X", env={"LOG_FORMAT": "json"})
    with proc:
        out = proc.wait_for_output("serving", timeout=5)
    entry = json.loads(next(line for line in out.splitlines() if "serving" in line))
    assert entry["level"] == "info" and entry["logger"] == "elements" and str(port) in entry["message"]


def test_a_bad_log_format_in_the_environment_exits_2_naming_it() -> None:
    result = subprocess.run([sys.executable, "-m", "elements.firewall", "--pattern", "X"], cwd=REPO,
                            capture_output=True, text=True, timeout=30, env={**os.environ, "LOG_FORMAT": "xml"})
    assert result.returncode == 2
    assert "LOG_FORMAT='xml': allowed are console, json" in result.stderr
