"""The element channel over TLS and mutual TLS (issue 17), with real certificates made at test time
(tests/certs.py): a CA, the element's certificate, the proxy's client certificate, and the bad ones:
another CA's, an expired one, none at all.

Elements are the stock firewall (SDK) served with --tls-cert/--tls-key/--tls-client-ca; proxies run
with the harness of tests/test_reliability.py (JSON logs, admin endpoint), and an Upstream records
the sha256 of what each connection carried. A certificate that does not verify, on either side, makes
the element unreachable: the failure policy applies (fail-closed: reset before dialing), and the
proxy says why in one line.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from elements.api import element_pb2 as pb
from elements.api import element_pb2_grpc as pb_grpc
from tests.certs import Authority, Issued
from tests.checks import wait_for
from tests.procs import free_port
from tests.test_enforcement import send_and_end
from tests.test_reliability import (  # noqa: F401  (h: the fixture, used by name)
    EXCHANGE, Harness, Proxy, Side, Upstream, client, h, judge_pair, run_async,
)

FIREWALL = "elements.firewall"
SERVER_NAME = "element.test"


class Pki:
    """One CA with the element's and the proxy's certificates, and the bad ones."""

    def __init__(self, folder: Path) -> None:
        self.ca = Authority(folder / "ca")
        self.other = Authority(folder / "other", "other CA")
        self.server = self.ca.issue("element", [SERVER_NAME, "127.0.0.1"])
        self.proxy = self.ca.issue("proxy", ["proxy"], client=True)
        self.expired = self.ca.issue("expired", ["proxy"], client=True, expired=True)
        self.foreign = self.other.issue("foreign", ["proxy"], client=True)
        self.untrusted_server = self.other.issue("untrusted", [SERVER_NAME, "127.0.0.1"])


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


def mtls_element(h: Harness, pki: Pki, server: Issued | None = None, *options: str) -> str:
    server = server or pki.server
    _, address = h.element(FIREWALL, "--pattern", "DROP TABLE", "--tls-cert", str(server.cert),
                           "--tls-key", str(server.key), "--tls-client-ca", str(pki.ca.path), *options)
    return address


def tls_options(pki: Pki, cert: Issued | None, *extra: str) -> tuple[str, ...]:
    options = ("--element-tls-ca", str(pki.ca.path), *extra)
    if cert is not None:
        options += ("--element-tls-cert", str(cert.cert), "--element-tls-key", str(cert.key))
    return options


def exchange_exact(p: Proxy, upstream: Upstream, key: int) -> None:
    """One 256 KiB exchange each way through the proxy, byte-exact at both ends."""

    async def main() -> Side:
        return await client(p.port, key, EXCHANGE, 256 << 10, 256 << 10)

    side = run_async(main(), 30)
    assert judge_pair(EXCHANGE, side, upstream.record(key)) is None, judge_pair(EXCHANGE, side, upstream.record(key))


def unreachable_lines(p: Proxy) -> list[str]:
    """The warnings that the element cannot be reached (its retries are logged at debug)."""
    return [entry["message"] for entry in p.lines()
            if entry.get("level") == "warning" and "unreachable" in entry.get("message", "")]


def test_mtls_element_filters_traffic_byte_exact_with_the_right_client_certificate(h: Harness, pki: Pki) -> None:
    """The proxy's client certificate is from the CA the element trusts: transfers are byte-exact, the
    firewall still resets DROP TABLE, and /config shows the TLS files' paths, never their contents."""
    upstream = h.upstream()
    address = mtls_element(h, pki)
    p = h.proxy([address], "--target", f"127.0.0.1:{upstream.port}",
                *tls_options(pki, pki.proxy, "--element-tls-server-name", SERVER_NAME))
    assert p.element("session_up") == 1
    exchange_exact(p, upstream, 1)
    assert send_and_end(p.port, b"SELECT 1; DROP TABLE users;") == "reset"
    status, body = p.get("/config")
    assert status == 200 and str(pki.proxy.key) in body and "PRIVATE KEY" not in body and "BEGIN" not in body


def test_the_element_name_defaults_to_the_address_host(h: Harness, pki: Pki) -> None:
    """No tls_server_name: the certificate must carry the address's host, here the IP 127.0.0.1."""
    upstream = h.upstream()
    address = mtls_element(h, pki)
    p = h.proxy([address], "--target", f"127.0.0.1:{upstream.port}", *tls_options(pki, pki.proxy))
    exchange_exact(p, upstream, 2)


@pytest.mark.parametrize(("case", "words"), [
    ("no client certificate", "this proxy has none: set tls_cert and tls_key"),
    ("another CA's", "it is issued by CN=other CA: is that a CA the element trusts"),
    ("expired", "it expired at"),
])
def test_an_mtls_element_refuses_a_proxy_without_a_good_client_certificate(h: Harness, pki: Pki, case: str,
                                                                           words: str) -> None:
    """The element's handshake refuses the proxy: the element is unreachable, fail-closed resets every
    connection before dialing, /readyz says the element is down, and one warning names the TLS reason."""
    cert = {"no client certificate": None, "another CA's": pki.foreign, "expired": pki.expired}[case]
    upstream = h.upstream()
    address = mtls_element(h, pki)
    p = h.proxy([address], "--target", f"127.0.0.1:{upstream.port}",
                *tls_options(pki, cert, "--element-tls-server-name", SERVER_NAME))
    assert send_and_end(p.port, b"hello") == "reset"
    assert upstream.accepted == 0, "a connection was dialed though its element could not be asked"
    assert p.element("session_up") == 0
    assert p.get("/readyz")[0] == 503
    lines = unreachable_lines(p)
    assert len(lines) == 1 and words in lines[0], lines


@pytest.mark.parametrize(("case", "words"), [
    ("untrusted", "the proxy refused the element's certificate: its certificate is not signed by the CA in tls_ca"),
    ("wrong name", "the proxy refused the element's certificate: its certificate does not carry the name other.test"),
])
def test_an_element_certificate_that_does_not_verify_makes_it_unreachable(h: Harness, pki: Pki, case: str,
                                                                          words: str) -> None:
    upstream = h.upstream()
    address = mtls_element(h, pki, pki.untrusted_server if case == "untrusted" else pki.server)
    name = "other.test" if case == "wrong name" else SERVER_NAME
    p = h.proxy([address], "--target", f"127.0.0.1:{upstream.port}", "--element-failure", "open",
                *tls_options(pki, pki.proxy, "--element-tls-server-name", name))
    assert send_and_end(p.port, b"hello", timeout=2) in ("eof", "timeout")  # fail-open: passed unfiltered
    assert p.element("failures_total", cause="session_down") >= 1
    lines = unreachable_lines(p)
    assert len(lines) == 1 and words in lines[0], lines


def test_process_without_a_client_certificate_is_refused(h: Harness, pki: Pki) -> None:
    """grpcurl-style debugging needs a certificate from the element's client CA too: Process over TLS
    without one, or in plaintext, never reaches the element; with one it does. The plaintext
    --health-port answers health alone."""
    health_port = free_port()
    address = mtls_element(h, pki, None, "--health-port", str(health_port))
    ca = pki.ca.path.read_bytes()
    options = [("grpc.ssl_target_name_override", SERVER_NAME)]
    request = pb.ProcessRequest(text="SELECT 1; DROP TABLE users;")

    async def process(credentials: grpc.ChannelCredentials | None) -> str:
        channel = (grpc.aio.secure_channel(address, credentials, options=options) if credentials
                   else grpc.aio.insecure_channel(address))
        async with channel:
            try:
                response = await pb_grpc.ElementStub(channel).Process(request, timeout=3)
            except grpc.aio.AioRpcError as error:
                return error.code().name
            return pb.Action.Name(response.verdict.action)

    async def health() -> int:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
            try:
                await pb_grpc.ElementStub(channel).Process(request, timeout=3)
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNIMPLEMENTED, error
            return answer.status

    assert asyncio.run(process(grpc.ssl_channel_credentials(ca))) == "UNAVAILABLE"
    assert asyncio.run(process(None)) == "UNAVAILABLE"
    foreign = grpc.ssl_channel_credentials(ca, pki.foreign.key.read_bytes(), pki.foreign.cert.read_bytes())
    assert asyncio.run(process(foreign)) == "UNAVAILABLE"
    good = grpc.ssl_channel_credentials(ca, pki.proxy.key.read_bytes(), pki.proxy.cert.read_bytes())
    assert asyncio.run(process(good)) == "ACTION_RESET"
    assert asyncio.run(health()) == health_pb2.HealthCheckResponse.SERVING


def test_sighup_reloads_rotated_certificates_with_the_chain(h: Harness, pki: Pki, tmp_path: Path) -> None:
    """The proxy starts with an expired client certificate (the element refuses it); the files are
    replaced by a good certificate and SIGHUP makes a new chain with it: traffic passes."""
    upstream = h.upstream()
    address = mtls_element(h, pki)
    cert, key = tmp_path / "proxy.crt", tmp_path / "proxy.key"
    cert.write_bytes(pki.expired.cert.read_bytes())
    key.write_bytes(pki.expired.key.read_bytes())
    p = h.proxy([address], "--target", f"127.0.0.1:{upstream.port}", "--element-tls-ca", str(pki.ca.path),
                "--element-tls-cert", str(cert), "--element-tls-key", str(key),
                "--element-tls-server-name", SERVER_NAME)
    assert send_and_end(p.port, b"hello") == "reset"
    cert.write_bytes(pki.proxy.cert.read_bytes())
    key.write_bytes(pki.proxy.key.read_bytes())
    os.kill(p.proc.pid, signal.SIGHUP)
    wait_for(lambda: "new connections use the new chain" in p.log(), 10, "the reload")
    exchange_exact(p, upstream, 3)


def test_a_key_that_is_not_the_certificates_is_refused_at_start(pki: Pki) -> None:
    from proxy import cli
    from proxy.config import ConfigError

    with pytest.raises(ConfigError, match=r"--element\.tls_key: .* is not the key of the certificate in"):
        cli.load(["--element", "127.0.0.1:1", *tls_options(pki, pki.proxy)[:2], "--element-tls-cert",
                  str(pki.proxy.cert), "--element-tls-key", str(pki.expired.key)], {})


def test_plaintext_proxy_to_a_tls_element_is_unreachable_not_a_crash(h: Harness, pki: Pki) -> None:
    address = mtls_element(h, pki)
    upstream = h.upstream()
    p = h.proxy([address], "--target", f"127.0.0.1:{upstream.port}")
    assert send_and_end(p.port, b"hello") == "reset"
    assert p.element("session_up") == 0
    assert socket.create_connection(("127.0.0.1", p.admin), timeout=2)
    assert json.loads(p.get("/readyz")[1])["ready"] is False
