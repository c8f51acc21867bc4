"""The proxy end to end on loopback: real proxy, real element processes, real sockets.

Transfers are verified in-band by tests/traffic.py (sha256 both ways), so a lost,
duplicated or reordered byte anywhere fails the test.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests import traffic
from tests.checks import wait_for
from tests.procs import start_element
from tests.stack import PASSTHROUGH, chain_proxy, proxy, tagger

MiB = 1 << 20
CHAINS = {"empty": [], "one": [PASSTHROUGH], "three": [PASSTHROUGH] * 3}


def recv_until(sock: socket.socket, expected: bytes, timeout: float = 10.0) -> bytes:
    """Reads until `expected` bytes arrived (or EOF/timeout), returning what came."""
    sock.settimeout(timeout)
    got = b""
    while len(got) < len(expected):
        data = sock.recv(65536)
        if not data:
            break
        got += data
    return got


class Recorder:
    """An upstream that records every byte of each connection and how it ended."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytearray] = []
        self.endings: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            data = bytearray()
            self.received.append(data)
            threading.Thread(target=self._read, args=(conn, data), daemon=True).start()

    def _read(self, conn: socket.socket, data: bytearray) -> None:
        with conn:
            try:
                while chunk := conn.recv(65536):
                    data += chunk
                self.endings.append("eof")
            except ConnectionResetError:
                self.endings.append("reset")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def recorder():
    server = Recorder()
    yield server
    server.close()


@pytest.mark.parametrize("family", ["v4", "v6"])
@pytest.mark.parametrize("chain", list(CHAINS))
def test_32_mib_each_way_arrive_byte_exact_through_target_addr(chain: str, family: str) -> None:
    host = "127.0.0.1" if family == "v4" else "::1"
    with traffic.Server(host, mode="exchange", send=32 * MiB) as server:
        target = f"[{host}]:{server.port}" if family == "v6" else f"{host}:{server.port}"
        with chain_proxy(CHAINS[chain], "--target", target, listen=host) as (proc, port):
            result = traffic.dial(host, port, 32 * MiB)
            assert result.ok, result.detail
            assert result.received == 32 * MiB
            proc.wait_for_output("outcome=completed")


def test_requests_visit_elements_in_order_and_responses_in_reverse() -> None:
    with traffic.Server(mode="echo") as server:
        with chain_proxy([tagger("1"), tagger("2"), tagger("3")], "--target", f"127.0.0.1:{server.port}") as (_, port):
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.sendall(b"hi")
                expected = b"hi<1><2><3><3><2><1>"
                assert recv_until(client, expected) == expected


def test_drop_discards_one_chunk_and_the_connection_stays_up() -> None:
    firewall = ("elements.firewall", "--pattern", "DROPME", "--action", "drop", "--direction", "request")
    with traffic.Server(mode="echo") as server:
        with chain_proxy([firewall], "--target", f"127.0.0.1:{server.port}") as (_, port):
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                client.sendall(b"first ")
                assert recv_until(client, b"first ") == b"first "
                client.sendall(b"DROPME ")
                time.sleep(0.2)  # a separate chunk: TCP would otherwise be free to merge it with the next
                client.sendall(b"later")
                assert recv_until(client, b"later") == b"later"
                client.shutdown(socket.SHUT_WR)
                assert client.recv(100) == b""


def test_pass_with_replacement_bytes_reaches_the_wire() -> None:
    rewrite = ("elements.rewrite", "--from", "hello", "--to", "howdy")
    with traffic.Server(mode="echo") as server:
        with chain_proxy([rewrite], "--target", f"127.0.0.1:{server.port}") as (_, port):
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.sendall(b"hello world")
                assert recv_until(client, b"howdy world") == b"howdy world"


def test_close_delivers_approved_bytes_then_eof_both_ways(recorder: Recorder) -> None:
    firewall = ("elements.firewall", "--pattern", "CLOSEME", "--action", "close")
    with chain_proxy([firewall], "--target", f"127.0.0.1:{recorder.port}") as (proc, port):
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"approved ")
            wait_for(lambda: recorder.received and bytes(recorder.received[0]) == b"approved ")
            client.sendall(b"CLOSEME and more")
            client.settimeout(10)
            assert client.recv(100) == b""
            wait_for(lambda: recorder.endings == ["eof"])
            assert bytes(recorder.received[0]) == b"approved "
        proc.wait_for_output("outcome=closed_by_element")


def test_reset_reaches_both_peers_as_econnreset(recorder: Recorder) -> None:
    firewall = ("elements.firewall", "--pattern", "RESETME")
    with chain_proxy([firewall], "--target", f"127.0.0.1:{recorder.port}") as (proc, port):
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"fine ")
            wait_for(lambda: recorder.received and bytes(recorder.received[0]) == b"fine ")
            client.sendall(b"RESETME")
            client.settimeout(10)
            with pytest.raises(ConnectionResetError):
                client.recv(100)
            wait_for(lambda: recorder.endings == ["reset"])
        proc.wait_for_output("outcome=reset_by_element")


def test_open_rejected_never_reaches_the_upstream(recorder: Recorder) -> None:
    firewall = ("elements.firewall", "--deny-port", str(recorder.port))
    with chain_proxy([firewall], "--target", f"127.0.0.1:{recorder.port}") as (proc, port):
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"let me in")
            client.settimeout(10)
            with pytest.raises(ConnectionResetError):
                client.recv(100)
        proc.wait_for_output("reset it on open")
        assert recorder.received == []


def test_half_close_then_the_server_sends_one_mib() -> None:
    with traffic.Server(mode="after-eof", send=MiB) as server:
        with chain_proxy([PASSTHROUGH], "--target", f"127.0.0.1:{server.port}") as (_, port):
            result = traffic.dial("127.0.0.1", port, 1000)
            assert result.ok, result.detail
            assert result.received == MiB


def test_two_thousand_short_half_closing_connections_through_one_element() -> None:
    with traffic.Server(mode="after-eof", send=3000) as server:
        with chain_proxy([PASSTHROUGH], "--target", f"127.0.0.1:{server.port}",
                         "--log-level", "info") as (proc, port):
            with ThreadPoolExecutor(16) as pool:
                results = list(pool.map(lambda size: traffic.dial("127.0.0.1", port, size, timeout=20),
                                        [(i * 37) % 5000 for i in range(2000)]))
            failures = [r for r in results if not r.ok]
            assert not failures, failures[:3]
            assert server.accepted == 2000
            assert proc.alive()
            assert traffic.dial("127.0.0.1", port, 10).ok


def test_firewall_catches_a_pattern_written_in_two_halves(recorder: Recorder) -> None:
    firewall = ("elements.firewall", "--pattern", "DROP TABLE")
    with chain_proxy([firewall], "--target", f"127.0.0.1:{recorder.port}") as (_, port):
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.sendall(b"please DROP TA")
            wait_for(lambda: recorder.received and recorder.received[0].endswith(b"DROP TA"))
            client.sendall(b"BLE users;")
            client.settimeout(10)
            with pytest.raises(ConnectionResetError):
                client.recv(100)
            wait_for(lambda: recorder.endings == ["reset"])
            assert b"BLE" not in recorder.received[0]


def test_workers_share_the_port_and_stop_cleanly() -> None:
    with traffic.Server(mode="after-eof", send=100) as server:
        with chain_proxy([PASSTHROUGH], "--target", f"127.0.0.1:{server.port}", "--workers", "2") as (proc, port):
            proc.wait_for_output("element-proxy ready")
            deadline = time.monotonic() + 10
            while proc.output().count("element-proxy ready") < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            results = [traffic.dial("127.0.0.1", port, 100) for _ in range(40)]
            assert all(r.ok for r in results)
            prefixes = {line.split("conn=")[1].split("-")[0]
                        for line in proc.output().splitlines() if "connection closed" in line}
            assert len(prefixes) == 2, prefixes
            assert proc.stop() == 0


def test_json_log_lines_carry_the_same_fields() -> None:
    with traffic.Server(mode="after-eof", send=10) as server:
        with chain_proxy([], "--target", f"127.0.0.1:{server.port}", env={"LOG_FORMAT": "json"}) as (proc, port):
            assert traffic.dial("127.0.0.1", port, 10).ok
            line = proc.wait_for_output('"connection closed"').splitlines()
            closed = [json.loads(entry) for entry in line if '"connection closed"' in entry][0]
            assert closed["outcome"] == "completed"
            assert closed["request_bytes"] == 10 and closed["response_bytes"] == 10 + traffic.TRAILER


def test_an_element_hears_each_connection_open_and_close_with_its_byte_counts() -> None:
    """Open and Close events reach a real element through the proxy (the stock logger prints
    them): the client's address, the destination, the outcome and the bytes written each way."""
    with traffic.Server(mode="after-eof", send=10) as server:
        logger, logger_port = start_element("elements.logger", "--log-format", "json")
        with logger, proxy([f"127.0.0.1:{logger_port}"], "--target", f"127.0.0.1:{server.port}") as (_, port):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                client = sock.getsockname()
                sock.sendall(b"x" * 10)
                sock.shutdown(socket.SHUT_WR)
                reply = b""
                while data := sock.recv(65536):
                    reply += data
            out = logger.wait_for_output('"message": "close"', timeout=5)
    events = [entry for entry in map(json.loads, out.splitlines()) if entry["logger"] == "elements.logger"]
    opened, closed = events
    assert opened["message"] == "open" and closed["message"] == "close" and opened["id"] == closed["id"]
    assert opened["client"] == f"{client[0]}:{client[1]}"
    assert opened["destination"] == f"127.0.0.1:{server.port}"
    assert closed["reason"] == "COMPLETED"
    assert (closed["request_bytes"], closed["response_bytes"]) == (10, len(reply))


def test_a_connection_that_was_not_redirected_is_closed_saying_why() -> None:
    """No original destination and no TARGET_ADDR: one line, and a destination that reads as what
    it is, not `None`."""
    with chain_proxy([]) as (proc, port):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert sock.recv(10) == b""
        out = proc.wait_for_output("outcome=not_redirected")
    (line,) = [entry for entry in out.splitlines() if "outcome=not_redirected" in entry]
    assert "destination=none (not redirected)" in line and "None" not in line, line
    assert "TARGET_ADDR is unset: the proxy never dials itself" in line, line
