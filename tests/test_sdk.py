"""The element SDK against real element processes and a real gRPC client."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import grpc
import pytest

from elements.api import element_pb2 as pb
from elements.api import element_pb2_grpc as pb_grpc
from tests.elements_for_tests.client import (
    RESPONSE, Arrival, by_key, close_event, data_event, exchange, open_event, verdicts,
)
from tests.procs import Proc, start_element

PROBE = "tests.elements_for_tests.probe"


@pytest.fixture(scope="module")
def async_probe() -> Iterator[tuple[Proc, int]]:
    proc, port = start_element(PROBE)
    with proc:
        yield proc, port


@pytest.fixture(scope="module")
def sync_probe() -> Iterator[tuple[Proc, int]]:
    proc, port = start_element(PROBE, "--sync")
    with proc:
        yield proc, port


@pytest.fixture(params=["async_probe", "sync_probe"])
def probe(request: pytest.FixtureRequest) -> tuple[Proc, int]:
    return request.getfixturevalue(request.param)


def test_verdicts_are_keyed_and_in_order_per_connection(probe: tuple[Proc, int]) -> None:
    _, port = probe
    batch = [
        open_event("c1"), open_event("c2", port=666),
        data_event("c1", 1, b"sleep 0.05"), data_event("c3", 1, b"lazy"), data_event("c1", 2, b"b"),
        data_event("c1", 3, b"c", RESPONSE), data_event("c3", 2, b"sleep 0.01"), data_event("c3", 3, b"d", eos=True),
        close_event("c2"),
    ]
    got = verdicts(exchange(port, batch))
    keys = [(v.connection_id, v.sequence) for v in got]
    assert sorted(keys) == [("c1", 0), ("c1", 1), ("c1", 2), ("c1", 3), ("c2", 0), ("c3", 1), ("c3", 2), ("c3", 3)]
    for cid in ("c1", "c3"):
        assert [seq for c, seq in keys if c == cid] == sorted(seq for c, seq in keys if c == cid)
    verdict = {(v.connection_id, v.sequence): v for v in got}
    assert verdict["c1", 0].action == pb.ACTION_PASS and not verdict["c1", 0].HasField("data")
    assert verdict["c2", 0].action == pb.ACTION_RESET
    assert verdict["c1", 2].data == b"B" and dict(verdict["c1", 2].metadata) == {"seen": "2"}
    assert verdict["c3", 3].data == b"D"


def test_sync_hooks_answer_one_batch_with_one_response(sync_probe: tuple[Proc, int]) -> None:
    _, port = sync_probe
    arrivals = exchange(port, [data_event(f"c{i}", 1, b"x") for i in range(50)])
    assert len(arrivals) == 1 and len(arrivals[0].response.verdicts) == 50


def test_slow_async_hook_does_not_delay_other_connections(async_probe: tuple[Proc, int]) -> None:
    _, port = async_probe
    arrivals = exchange(port, [data_event("slow", 1, b"sleep 0.6"), data_event("fast", 1, b"quick")])
    when = {v.connection_id: arrival.at for arrival in arrivals for v in arrival.response.verdicts}
    assert when["fast"] < 0.3, when
    assert when["slow"] >= 0.55, when


def test_observe_mode_runs_hooks_but_sends_no_verdicts() -> None:
    proc, port = start_element(PROBE, "--observe")
    with proc:
        batch = [open_event("o1"), data_event("o1", 1, b"abc"), data_event("o1", 2, b"sleep 0.01"),
                 close_event("o1", 3, 10)]
        assert exchange(port, batch) == []
        proc.wait_for_output("closed o1 COMPLETED 3 10")


def test_hook_exception_resets_that_event_and_the_stream_goes_on(probe: tuple[Proc, int]) -> None:
    proc, port = probe
    cid = f"boom-{probe[1]}-{time.monotonic_ns()}"
    got = by_key(exchange(port, [data_event(cid, 1, b"boom"), data_event("ok", 1, b"fine")],
                          [data_event(cid, 2, b"after")]))
    assert got[cid, 1].action == pb.ACTION_RESET
    assert got["ok", 1].action == pb.ACTION_PASS
    assert got[cid, 2].action == pb.ACTION_PASS and got[cid, 2].data == b"AFTER"
    out = proc.wait_for_output(f"on_data failed on connection {cid}")
    assert out.count(f"on_data failed on connection {cid}") == 1


def test_an_event_with_an_unknown_direction_is_refused_in_one_line(probe: tuple[Proc, int]) -> None:
    """What a hand-written Session event from grpcurl easily gets wrong: RESET, and one log line that
    says why, not a KeyError traceback per event."""
    proc, port = probe
    cid = f"nodir-{port}-{time.monotonic_ns()}"
    got = by_key(exchange(port, [data_event(cid, 1, b"x", direction=0), data_event(cid, 2, b"y", direction=7),
                                 data_event("ok", 1, b"fine")]))
    assert got[cid, 1].action == pb.ACTION_RESET
    assert got[cid, 2].action == pb.ACTION_RESET
    assert got["ok", 1].action == pb.ACTION_PASS
    out = proc.wait_for_output(f"data event 2 of connection {cid} refused")
    assert (f"data event 1 of connection {cid} refused, direction 0 is neither DIRECTION_REQUEST (1) "
            f"nor DIRECTION_RESPONSE (2); answering ACTION_RESET") in out
    assert "KeyError" not in out


def test_describe(async_probe: tuple[Proc, int]) -> None:
    _, port = async_probe
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        description = pb_grpc.ElementStub(channel).Describe(pb.DescribeRequest(), timeout=5)
    assert description == pb.Description(
        name="probe", directions=[pb.DIRECTION_REQUEST, pb.DIRECTION_RESPONSE], wants_open=True,
        mode=pb.MODE_INLINE, request_bytes_limit=100, response_bytes_limit=200,
    )


def test_process(async_probe: tuple[Proc, int]) -> None:
    proc, port = async_probe
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        process = pb_grpc.ElementStub(channel).Process
        plain = process(pb.ProcessRequest(text="hello"), timeout=5)
        rejected = process(pb.ProcessRequest(open=pb.OpenEvent(
            connection_id="p2", original_destination=pb.Address(ip="192.0.2.9", port=666))), timeout=5)
        raw = process(pb.ProcessRequest(data=pb.DataEvent(sequence=7, direction=RESPONSE, data=b"\xff\xfeok")),
                      timeout=5)
        failing = process(pb.ProcessRequest(text="boom"), timeout=5)
    assert plain.open_verdict.action == pb.ACTION_PASS
    assert (plain.verdict.connection_id, plain.verdict.sequence, plain.verdict.action) == ("process", 1, pb.ACTION_PASS)
    assert plain.text == "HELLO" and dict(plain.verdict.metadata) == {"seen": "1"}
    assert rejected.open_verdict.action == pb.ACTION_RESET and rejected.verdict.connection_id == "p2"
    assert raw.verdict.sequence == 7 and raw.text == "\\xff\\xfeOK"
    assert failing.verdict.action == pb.ACTION_RESET and failing.text == ""
    proc.wait_for_output("closed process COMPLETED 0 4")


def test_sigterm_drains_sessions_and_exits_zero() -> None:
    proc, port = start_element(PROBE)
    with proc:
        def on_arrival(arrival: Arrival) -> None:
            if any(v.connection_id == "fast" for v in arrival.response.verdicts):
                os.kill(proc.pid, signal.SIGTERM)

        async def run() -> list[Arrival]:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = pb_grpc.ElementStub(channel).Session()
                await call.write(pb.SessionRequest(events=[data_event("fast", 1, b"x"),
                                                           data_event("slow", 1, b"sleep 0.3")]))
                arrivals = []
                async for response in call:
                    arrivals.append(Arrival(0, response))
                    on_arrival(arrivals[-1])
                assert await call.code() == grpc.StatusCode.OK
                return arrivals

        started = time.monotonic()
        got = {v.connection_id for v in verdicts(asyncio.run(run()))}
        assert got == {"fast", "slow"}
        assert proc.popen.wait(timeout=10) == 0
        assert time.monotonic() - started < 3
        assert "element probe stopped" in proc.output()
