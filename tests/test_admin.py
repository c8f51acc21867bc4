"""The operator's view: /metrics after known traffic, /readyz following an element, /connections,
/config, workers adding up, and SIGHUP swapping the chain under live traffic."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

from tests import traffic
from tests.checks import metric, wait_for
from tests.procs import free_port, start_element
from tests.stack import PASSTHROUGH, elements, proxy, tagger

MiB = 1 << 20
COMPLETED = 'element_proxy_connections_closed_total{{outcome="completed"}} {}.0'


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def echo_round_trip(port: int, payload: bytes) -> None:
    """One connection: payload out, the same back, then a half-close each way."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += client.recv(65536)
        client.shutdown(socket.SHUT_WR)
        assert client.recv(10) == b""
        assert got == payload


def test_metrics_count_exact_bytes_and_chunks() -> None:
    admin = free_port()
    with traffic.Server(mode="echo") as server:
        with elements([PASSTHROUGH]) as addresses:
            with proxy(addresses, "--target", f"127.0.0.1:{server.port}", admin=f"127.0.0.1:{admin}") as (_, port):
                for _ in range(3):
                    echo_round_trip(port, os.urandom(1000))
                wait_for(lambda: COMPLETED.format(3) in get(admin, "/metrics")[1], 5)
                status, text = get(admin, "/metrics")
    assert status == 200
    listener = f"127.0.0.1:{port}"
    element = {"position": "0", "element": "passthrough"}
    assert metric(text, "element_proxy_connections_total", listener=listener) == 3
    assert metric(text, "element_proxy_connections_active", listener=listener) == 0
    assert metric(text, "element_proxy_bytes_total", direction="request") == 3000
    assert metric(text, "element_proxy_bytes_total", direction="response") == 3000
    # per connection: 1000 bytes each way, then an end-of-stream event each way
    assert metric(text, "element_proxy_element_events_total", **element, kind="data") == 12
    assert metric(text, "element_proxy_element_verdicts_total", **element, kind="data", action="pass") == 12
    assert metric(text, "element_proxy_element_events_total", **element, kind="close") == 3
    assert metric(text, "element_proxy_element_latency_seconds_count", **element) == 12
    assert metric(text, "element_proxy_element_session_up", **element) == 1
    assert metric(text, "element_proxy_element_failures_total", **element, cause="timeout") == 0


def test_readyz_follows_a_fail_closed_element() -> None:
    admin = free_port()
    element_port = free_port()
    first, _ = start_element("elements.passthrough", port=element_port)
    try:
        with proxy([f"127.0.0.1:{element_port}"], "--target", "127.0.0.1:9", admin=f"127.0.0.1:{admin}"):
            assert get(admin, "/readyz")[0] == 200
            os.kill(first.pid, signal.SIGKILL)
            took = wait_for(lambda: get(admin, "/readyz")[0] == 503, 5)
            assert took < 2, f"unready only after {took:.2f}s"
            status, body = get(admin, "/readyz")
            assert json.loads(body)["reasons"] == ["element passthrough (fail-closed) session down"]
            second, _ = start_element("elements.passthrough", port=element_port)
            with second:
                wait_for(lambda: get(admin, "/readyz")[0] == 200, 5)
            assert get(admin, "/healthz") == (200, "ok\n")
    finally:
        first.stop()


def test_connections_and_config_show_live_state_without_secrets() -> None:
    admin = free_port()
    with traffic.Server(mode="echo") as server:
        with proxy([], "--target", f"127.0.0.1:{server.port}", admin=f"127.0.0.1:{admin}") as (_, port):
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.sendall(b"hello")
                assert client.recv(5) == b"hello"
                rows = json.loads(get(admin, "/connections")[1])
                assert len(rows) == 1
                row = rows[0]
                assert row["client"] == f"127.0.0.1:{client.getsockname()[1]}"
                assert row["destination"] == f"127.0.0.1:{server.port}"
                assert row["request_bytes"] == 5 and row["response_bytes"] == 5 and row["age_s"] >= 0
            config = json.loads(get(admin, "/config")[1])
            assert config["target"] == f"127.0.0.1:{server.port}"
            assert config["listen"] == [f"127.0.0.1:{port}"]
            assert get(admin, "/nope")[0] == 404


def test_workers_add_up_in_metrics() -> None:
    admin = free_port()
    with traffic.Server(mode="after-eof", send=10) as server:
        with proxy([], "--target", f"127.0.0.1:{server.port}", "--workers", "2",
                   admin=f"127.0.0.1:{admin}") as (proc, port):
            wait_for(lambda: proc.output().count("element-proxy ready") == 2, 10)
            for _ in range(20):
                assert traffic.dial("127.0.0.1", port, 10).ok
            wait_for(lambda: COMPLETED.format(20) in get(admin, "/metrics")[1], 5)
            text = get(admin, "/metrics")[1]
            assert metric(text, "element_proxy_connections_total", listener=f"127.0.0.1:{port}") == 20
            assert metric(text, "element_proxy_bytes_total", direction="request") == 200


def write_chain(path: Path, addresses: list[str]) -> None:
    path.write_text("".join(f'[[element]]\naddress = "{a}"\n' for a in addresses))


def test_sighup_swaps_the_chain_for_new_connections_only(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    with traffic.Server(mode="echo") as server, elements([tagger("A"), tagger("B")]) as (a, b):
        write_chain(config, [a])
        with proxy([], "--config", str(config), "--target", f"127.0.0.1:{server.port}") as (proc, port):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as old:
                old.sendall(b"x")
                assert old.recv(100) == b"x<A><A>"
                write_chain(config, [b])
                os.kill(proc.pid, signal.SIGHUP)
                proc.wait_for_output("reload: new connections use the new chain")
                with socket.create_connection(("127.0.0.1", port), timeout=10) as new:
                    new.sendall(b"z")
                    assert new.recv(100) == b"z<B><B>"
                old.sendall(b"y")
                assert old.recv(100) == b"y<A><A>"


def test_sighup_under_live_traffic_breaks_no_connection(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    with traffic.Server(mode="exchange", send=16 * MiB) as server, \
            elements([PASSTHROUGH, PASSTHROUGH]) as (first, second):
        write_chain(config, [first])
        with proxy([], "--config", str(config), "--target", f"127.0.0.1:{server.port}") as (proc, port):
            results: list[traffic.Result] = []
            transfers = [threading.Thread(target=lambda: results.append(traffic.dial("127.0.0.1", port, 16 * MiB)))
                         for _ in range(6)]
            for transfer in transfers:
                transfer.start()
            write_chain(config, [second])
            os.kill(proc.pid, signal.SIGHUP)
            proc.wait_for_output("reload: new connections use the new chain")
            after = traffic.dial("127.0.0.1", port, MiB)
            for transfer in transfers:
                transfer.join(60)
            assert len(results) == 6 and all(r.ok for r in results), results
            assert after.ok, after
            assert "reset" not in proc.output().split("reload:")[1]
