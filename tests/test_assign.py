"""The pure parts of an element's fleet: rendezvous assignment (proxy/sessions/assign.py), reading
getaddrinfo's answer (proxy/sessions/resolve.py) and the TLS reasons (proxy/sessions/endpoint.py)."""

from __future__ import annotations

import collections
import datetime
import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import ClientCertificate, ElementConfig, TlsFiles
from proxy.sessions.assign import rendezvous
from proxy.sessions.endpoint import Endpoint
from proxy.sessions.resolve import endpoints_of

REPLICAS = [b"10.0.0.1:50051", b"10.0.0.2:50051", b"10.0.0.3:50051"]
IDS = [f"{0x1f2e:x}{i:04x}-{i:x}" for i in range(3000)]


def choices(replicas: list[bytes]) -> dict[str, bytes]:
    return {cid: replicas[rendezvous(cid, replicas)] for cid in IDS}


def test_connections_spread_evenly() -> None:
    counts = collections.Counter(choices(REPLICAS).values())
    assert all(900 <= n <= 1100 for n in counts.values()), counts


def test_removing_a_replica_moves_only_its_connections_and_spreads_them() -> None:
    before = choices(REPLICAS)
    after = choices(REPLICAS[:1] + REPLICAS[2:])
    moved = [cid for cid in IDS if before[cid] != after[cid]]
    assert all(before[cid] == REPLICAS[1] for cid in moved)
    assert len(moved) == sum(1 for cid in IDS if before[cid] == REPLICAS[1])
    spread = collections.Counter(after[cid] for cid in moved)
    assert all(0.4 <= n / len(moved) <= 0.6 for n in spread.values()), spread


def test_adding_a_replica_takes_a_fair_share_from_every_other_and_moves_nothing_else() -> None:
    before = choices(REPLICAS)
    after = choices([*REPLICAS, b"10.0.0.4:50051"])
    moved = [cid for cid in IDS if before[cid] != after[cid]]
    assert all(after[cid] == b"10.0.0.4:50051" for cid in moved)
    assert 0.2 <= len(moved) / len(IDS) <= 0.3


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40), st.permutations(REPLICAS))
def test_the_order_replicas_are_listed_in_does_not_matter(cid: str, order: list[bytes]) -> None:
    assert order[rendezvous(cid, order)] == REPLICAS[rendezvous(cid, REPLICAS)]


def test_getaddrinfo_answers_become_dialable_addresses_each_once() -> None:
    infos = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.2", 50051)),
             (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00::7", 50051, 0, 0)),
             (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.2", 50051)),
             (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", 50051))]
    assert endpoints_of(infos, 50051) == ("10.0.0.1:50051", "10.0.0.2:50051", "[fd00::7]:50051")


NOW = datetime.datetime(2026, 12, 2, tzinfo=datetime.timezone.utc)
CLIENT = ClientCertificate("CN=proxy", "CN=test CA", NOW - datetime.timedelta(days=1),
                           NOW + datetime.timedelta(days=1))
CONNECT = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:10.0.0.1:50051: "


def endpoint(client: ClientCertificate | None = CLIENT, tls: bool = True) -> Endpoint:
    files = TlsFiles(b"ca", b"cert" if client else None, b"key" if client else None, client) if tls else None
    return Endpoint("10.0.0.1:50051", ElementConfig("firewall:50051", tls_ca="ca.pem", tls=files))


def test_tls_reasons_say_what_to_fix() -> None:
    reason = endpoint().failure_reason
    assert "does not carry the name firewall" in str(reason(CONNECT + "Custom verification check failed with error: "
                                                           "UNAUTHENTICATED: Hostname Verification Check failed."))
    assert "not signed by the CA in tls_ca" in str(reason(CONNECT + "Tls handshake failed (TSI_PROTOCOL_FAILURE): "
                                                          "CERTIFICATE_VERIFY_FAILED: unable to get local issuer "
                                                          "certificate"))
    assert "issued by CN=test CA" in str(reason(CONNECT + "Socket closed", NOW))
    assert "expired at 2026-12-03T00:00:00Z" in str(reason(CONNECT + "Socket closed", NOW + datetime.timedelta(days=2)))
    assert "this proxy has none" in str(endpoint(None).failure_reason(CONNECT + "Socket closed"))


def test_what_is_not_a_tls_matter_gets_no_tls_reason() -> None:
    assert endpoint().failure_reason(CONNECT + "Connection refused") is None
    assert endpoint().failure_reason("Stream removed (Socket closed)") is None  # broke after it was up
    assert endpoint(tls=False).failure_reason(CONNECT + "Socket closed") is None
