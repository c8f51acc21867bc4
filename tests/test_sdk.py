"""The element SDK against real element processes and a real gRPC client."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from elements.api import element_pb2 as pb
from elements.api import element_pb2_grpc as pb_grpc
from tests.elements_for_tests.client import (
    RESPONSE, Arrival, by_key, close_event, data_event, exchange, exchange_async, open_event, verdicts,
)
from elements.api import VERDICTS_METADATA
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


def test_asked_for_changes_only_the_element_leaves_plain_passes_out() -> None:
    """A proxy in detect or shadow mode opens the Session with `element-proxy-verdicts: changes`
    (VERDICTS_METADATA): the firewall sends its RESET and no PASS; asked without it, it answers all."""
    proc, port = start_element("elements.firewall", "--pattern", "EVIL")
    with proc:
        batch = [data_event("c1", 1, b"fine"), data_event("c1", 2, b"still fine"), data_event("c2", 1, b"EVIL")]
        changes = verdicts(asyncio.run(exchange_async(port, [batch], metadata=VERDICTS_METADATA)))
        assert [(v.connection_id, v.sequence, v.action) for v in changes] == [("c2", 1, pb.ACTION_RESET)]
        every = verdicts(exchange(port, [data_event("c3", 1, b"fine"), data_event("c4", 1, b"EVIL")]))
        assert [(v.connection_id, v.action) for v in every] == [("c3", pb.ACTION_PASS), ("c4", pb.ACTION_RESET)]


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


async def _watch_health(channel: grpc.aio.Channel, seen: list[int]) -> None:
    async for response in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest()):
        seen.append(response.status)


def test_sigterm_drains_serving_open_connections_until_they_close_then_exits_zero() -> None:
    """SIGTERM turns health NOT_SERVING at once, yet a connection already open through the element is
    still served (its chunk sent after the signal gets its verdict); once the proxy's Close for it
    came, the Session ends with OK and the element exits 0, long before its 5 s grace."""
    proc, port = start_element(PROBE)
    with proc:
        async def run() -> tuple[list[pb.Verdict], list[int], float]:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                seen: list[int] = []
                watch = asyncio.create_task(_watch_health(channel, seen))
                call = pb_grpc.ElementStub(channel).Session()
                await call.write(pb.SessionRequest(events=[data_event("open", 1, b"before")]))
                got = list((await call.read()).verdicts)
                signalled = time.monotonic()
                os.kill(proc.pid, signal.SIGTERM)
                await wait_async(lambda: health_pb2.HealthCheckResponse.NOT_SERVING in seen, 5, "NOT_SERVING")
                await call.write(pb.SessionRequest(events=[data_event("open", 2, b"after")]))
                got += (await call.read()).verdicts
                await call.write(pb.SessionRequest(events=[close_event("open")]))
                while (response := await call.read()) is not grpc.aio.EOF:
                    got += response.verdicts
                assert await call.code() == grpc.StatusCode.OK
                took = time.monotonic() - signalled
                watch.cancel()
                return got, seen, took

        got, seen, took = asyncio.run(run())
        assert [(v.sequence, v.data) for v in got] == [(1, b"BEFORE"), (2, b"AFTER")]
        assert seen == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]
        assert proc.popen.wait(timeout=10) == 0
        assert took < 3, f"the session ended {took:.1f}s after SIGTERM, though its last connection had closed"
        assert "element probe drained" in proc.output() and "element probe stopped" in proc.output()


def test_sigterm_ends_the_sessions_when_the_grace_runs_out() -> None:
    """A connection that never closes keeps the element only until --grace: then its Session ends
    with OK (the proxy's failure policy decides for the connection) and the element exits 0."""
    proc, port = start_element(PROBE, "--grace", "1")
    with proc:
        async def run() -> float:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = pb_grpc.ElementStub(channel).Session()
                await call.write(pb.SessionRequest(events=[data_event("forever", 1, b"x")]))
                await call.read()
                signalled = time.monotonic()
                os.kill(proc.pid, signal.SIGTERM)
                while await call.read() is not grpc.aio.EOF:
                    pass
                assert await call.code() == grpc.StatusCode.OK
                return time.monotonic() - signalled

        took = run_bounded(run())
        assert proc.popen.wait(timeout=10) == 0
        assert 0.9 < took < 3, f"the session ended {took:.1f}s after SIGTERM, with a 1 s grace"
        assert "grace over, 1 connections still open" in proc.output()


def run_bounded(coro: Any) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(20):
            return await coro
    return asyncio.run(bounded())


async def wait_async(condition: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout}s"
        await asyncio.sleep(0.01)
