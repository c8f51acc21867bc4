"""One replica of an element as the proxy dials it: an IP address and port, plaintext or TLS.

The element's address may be a name with several replicas behind it (resolve.py); each one
is dialed by its IP, so gRPC's own resolver never picks for us. Over TLS the certificate
must carry the element's name (`tls_server_name`, else the address's host), not the IP
dialed. A certificate that does not verify makes the replica unreachable, like one that is
down; `failure_reason` turns gRPC's words for it into one line that says what to fix.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import grpc

from proxy.config import MAX_MESSAGE_BYTES, ClientCertificate, ElementConfig

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # gRPC servers refuse pings more often than every 5 minutes by default (GOAWAY
    # "too_many_pings", which would drop the session): a dead element shows up as a
    # broken connection long before a keepalive would notice anyway.
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 500),
]
# gRPC's words for a server certificate the proxy refuses, and what they mean to an operator.
_VERIFY_FAILURES = (
    ("Hostname Verification Check failed", "its certificate does not carry the name {name} (tls_server_name)"),
    ("No match found for server name", "its certificate does not carry the name {name} (tls_server_name)"),
    ("unable to get local issuer certificate", "its certificate is not signed by the CA in tls_ca"),
    ("self signed certificate", "its certificate is self-signed and not the CA in tls_ca"),
    ("certificate has expired", "its certificate has expired"),
    ("certificate is not yet valid", "its certificate is not valid yet"),
    ("WRONG_VERSION_NUMBER", "it does not speak TLS (a plaintext element? then leave tls_ca unset)"),
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """`address` is what is dialed: "10.0.0.7:50051", "[fd00::7]:50051" or "unix:/run/element.sock" (gRPC
    dials a unix domain socket itself; over TLS its certificate must carry tls_server_name, else
    localhost)."""

    address: str
    config: ElementConfig

    def channel(self) -> grpc.aio.Channel:
        """A new channel to this replica, with the element's TLS credentials when it has them."""
        tls = self.config.tls
        if tls is None:
            return grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        credentials = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
        name = self.config.server_name
        return grpc.aio.secure_channel(self.address, credentials, options=[
            *CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", name), ("grpc.default_authority", name)])

    def failure_reason(self, details: str | None, now: datetime.datetime | None = None) -> str | None:
        """Why a TLS channel could not be used, in words an operator can act on; None when the failure
        is not a TLS one (plaintext, or a replica that is just down)."""
        tls = self.config.tls
        if tls is None or not details or "failed to connect" not in details:
            return None  # a session that broke after it was up is no handshake matter
        for words, meaning in _VERIFY_FAILURES:
            if words in details:
                return f"TLS: the proxy refused the element's certificate: {meaning.format(name=self.config.server_name)}"
        if "Socket closed" not in details and "Connection reset" not in details:
            return None  # refused, unreachable: down, not a TLS matter
        return _refused(tls.client, now or datetime.datetime.now(datetime.timezone.utc))


def _refused(client: ClientCertificate | None, now: datetime.datetime) -> str:
    """Over TLS 1.3 the element checks the proxy's certificate after the handshake, and its refusal
    arrives as a closed socket: what the proxy can know about its own certificate."""
    if client is None:
        return ("TLS: the element closed the connection; it may require a client certificate (mTLS) and this "
                "proxy has none: set tls_cert and tls_key")
    if now > client.not_after:
        state = f"it expired at {client.not_after:%Y-%m-%dT%H:%M:%SZ}"
    elif now < client.not_before:
        state = f"it is not valid before {client.not_before:%Y-%m-%dT%H:%M:%SZ}"
    else:
        state = f"it is issued by {client.issuer}: is that a CA the element trusts (--tls-client-ca)?"
    return f"TLS: the element closed the connection, refusing this proxy's client certificate ({client.subject}): {state}"
