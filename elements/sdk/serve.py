"""Serving an element: its gRPC server with reflection and health, signals, and its command line.

SIGTERM drains rather than stops, so a rolling update loses no connection: health turns
NOT_SERVING and the server sends GOAWAY at once (proxies give this replica no new
connections), the connections the proxies have open through it go on until they end or
`--grace` runs out, and only then do the Session streams end. With `--tls-cert/--tls-key`
it serves TLS; adding `--tls-client-ca` makes it mutual: the TLS handshake itself refuses
a client without a certificate from that CA, so nobody else can open a Session or call
Process. `--health-port` serves grpc.health.v1 alone, in plaintext, for probes that cannot
speak TLS (the kubelet's gRPC probe).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from elements import logs
from elements.api import element_pb2_grpc as pb_grpc
from elements.sdk import reflection
from elements.sdk.element import Element
from elements.sdk.servicer import ELEMENT_SERVICE, Servicer

log = logging.getLogger("elements")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_PORT = 50051
DEFAULT_GRACE = 5.0
# After NOT_SERVING, the Open of a connection a proxy assigned here just before it heard so may
# still be on its way: a drain with no connection open waits this long before it ends.
DRAIN_SETTLE = 0.5
DRAIN_POLL = 0.05
# The Session streams end themselves at the grace; gRPC cancels what is left this much later.
STOP_MARGIN = 1.0


@dataclass(frozen=True)
class ServerTls:
    """PEM bytes: the element's certificate and key, and the CA a client's certificate must come
    from (None: no client certificate asked for)."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)


def _listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class CannotServe(Exception):
    """The element could not listen where it was told to; the message says where and why."""


def _why_not_bound(host: str, port: int) -> str:
    """gRPC says only "Failed to bind": a plain bind on the same address tells why."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.strerror or str(error)
    return "gRPC could not bind it (GRPC_VERBOSITY=debug says why)"


def _server() -> grpc.aio.Server:
    return grpc.aio.server(options=[
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # gRPC binds with SO_REUSEPORT by default: a second element started on a taken port
        # would silently take half of the proxy's sessions (a passthrough beside a firewall).
        ("grpc.so_reuseport", 0),
    ])


def _bind(server: grpc.aio.Server, name: str, host: str, port: int, flags: str,
          tls: ServerTls | None = None) -> int:
    address = _listen_address(host, port)
    try:
        if tls is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, tls.credentials())
    except RuntimeError as error:
        raise CannotServe(f"element {name}: cannot listen on {address} ({flags}): {_why_not_bound(host, port)}") \
            from error


def _bind_unix(server: grpc.aio.Server, name: str, path: str, tls: ServerTls | None) -> None:
    """Listens on the unix domain socket `path`. A socket file nobody accepts on is what a killed
    element leaves behind, and is replaced; one that answers belongs to a running element, and
    taking it over silently would split the proxy's sessions, so that is refused."""
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale
        except OSError as error:
            raise CannotServe(f"element {name}: cannot listen on unix:{path} (--unix): {error}") from error
        else:
            raise CannotServe(f"element {name}: cannot listen on unix:{path} (--unix): another process "
                              "accepts connections there")
        finally:
            probe.close()
    address = f"unix:{path}"
    try:
        if tls is None:
            server.add_insecure_port(address)
        else:
            server.add_secure_port(address, tls.credentials())
    except RuntimeError as error:
        raise CannotServe(f"element {name}: cannot listen on {address} (--unix): is its directory there and "
                          "writable?") from error


async def serve_async(element: Element, host: str = "0.0.0.0", port: int = DEFAULT_PORT,
                      grace: float = DEFAULT_GRACE, *, tls: ServerTls | None = None,
                      health_port: int | None = None, unix: str | None = None) -> None:
    """Serves until SIGTERM/SIGINT, then drains within `grace` (see the module's docstring)."""
    name = element.describe().name
    server = _server()
    stopping = asyncio.Event()
    servicer = Servicer(element, stopping)
    pb_grpc.add_ElementServicer_to_server(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.add_to_server(server, [ELEMENT_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name],
                             [*reflection.with_comments(), *reflection.described(health_pb2)])
    if unix is not None:
        _bind_unix(server, name, unix, tls)
        where = f"unix:{unix}"
    else:
        where = f"{host}:{_bind(server, name, host, port, '--host / --port', tls)}"
    probes = None
    if health_port is not None:
        probes = _server()
        health_pb2_grpc.add_HealthServicer_to_server(health, probes)
        health_port = _bind(probes, name, host, health_port, "--host / --health-port")
        await probes.start()
    await server.start()
    await health.set(ELEMENT_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("element %s serving on %s%s%s", name, where,
             " (TLS, client certificates required)" if tls and tls.client_ca else " (TLS)" if tls else "",
             f", health on {health_port} (plaintext)" if probes else "")
    await stop.wait()
    await _drain(name, servicer, health, server, grace)
    if probes is not None:
        await probes.stop(None)
    log.info("element %s stopped", name)


async def _drain(name: str, servicer: Servicer, health: health_aio.HealthServicer, server: grpc.aio.Server,
                 grace: float) -> None:
    """NOT_SERVING and GOAWAY now; then waits until no proxy has a connection open through this
    element (after DRAIN_SETTLE at least), or `grace` has passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    log.info("element %s draining: NOT_SERVING, no new streams; %d connections open, grace %.1fs", name,
             servicer.open_connections(), grace)
    await health.enter_graceful_shutdown()
    stopped = asyncio.ensure_future(server.stop(grace + STOP_MARGIN))  # GOAWAY; the open streams go on
    await asyncio.sleep(min(DRAIN_SETTLE, grace))
    while servicer.open_connections() and loop.time() < deadline:
        await asyncio.sleep(DRAIN_POLL)
    left = servicer.open_connections()
    log.log(logging.WARNING if left else logging.INFO, "element %s drained%s", name,
            f": grace over, {left} connections still open (their proxies' failure policy decides)" if left else "")
    servicer.stopping.set()
    await stopped


def serve(element: Element, host: str = "0.0.0.0", port: int = DEFAULT_PORT,
          grace: float = DEFAULT_GRACE, *, tls: ServerTls | None = None, health_port: int | None = None,
          unix: str | None = None) -> None:
    """Blocks serving `element` (on uvloop when installed) until SIGTERM or SIGINT."""
    try:
        import uvloop
    except ImportError:
        runner = asyncio.Runner()
    else:
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    with runner:
        runner.run(serve_async(element, host, port, grace, tls=tls, health_port=health_port, unix=unix))


def port_number(text: str) -> int:
    """argparse type for a TCP port, so a bad one is reported with its option and value."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return port


def _listen_port(text: str) -> int:
    return 0 if text == "0" else port_number(text)


def _from_env(parser: argparse.ArgumentParser, name: str, default: str, allowed: tuple[str, ...]) -> str:
    """An option's default from the environment; argparse checks choices only of given options."""
    value = os.environ.get(name, default).lower()
    if value not in allowed:
        parser.error(f"{name}={value!r}: allowed are {', '.join(allowed)}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed are 0 to 86400 seconds")
    return value


def _tls(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ServerTls | None:
    """The TLS files the options name, read now: a mistake is an exit with the option named."""
    if not (args.tls_cert or args.tls_key or args.tls_client_ca):
        return None
    if not (args.tls_cert and args.tls_key):
        parser.error("--tls-cert and --tls-key: give both (this element's certificate and key, PEM)"
                     + ("; --tls-client-ca needs them" if args.tls_client_ca else ""))

    def read(option: str, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as error:
            parser.error(f"{option} {path}: {error.strerror or error}")

    return ServerTls(read("--tls-cert", args.tls_cert), read("--tls-key", args.tls_key),
                     read("--tls-client-ca", args.tls_client_ca) if args.tls_client_ca else None)


def run(element_class: type[Element], argv: list[str] | None = None) -> None:
    """The `python -m elements.<name>` entry point: options, logging, then `serve`."""
    module = sys.modules[element_class.__module__]
    spec = getattr(module, "__spec__", None)
    parser = argparse.ArgumentParser(prog=f"python -m {spec.name if spec else module.__name__}",
                                     description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=_listen_port, default=DEFAULT_PORT,
                        help="port to listen on, 0 for any (default: %(default)s)")
    parser.add_argument("--unix", metavar="PATH",
                        help="listen on this unix domain socket instead of --host/--port (the proxy's "
                             "element address is then unix:PATH; a stale socket file is replaced)")
    parser.add_argument("--grace", type=_seconds, default=DEFAULT_GRACE, metavar="SECONDS",
                        help="on SIGTERM, how long open connections may go on (default: %(default)s)")
    parser.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate (and --tls-key)")
    parser.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    parser.add_argument("--tls-client-ca", metavar="PEM",
                        help="mutual TLS: only clients with a certificate from this CA may connect")
    parser.add_argument("--health-port", type=_listen_port, metavar="PORT",
                        help="also serve grpc.health.v1 alone, in plaintext, on this port (for probes)")
    parser.add_argument("--log-level", default=_from_env(parser, "LOG_LEVEL", "info", logs.LOG_LEVELS),
                        choices=logs.LOG_LEVELS, help="default: $LOG_LEVEL or info")
    parser.add_argument("--log-format", default=_from_env(parser, "LOG_FORMAT", "console", logs.LOG_FORMATS),
                        choices=logs.LOG_FORMATS,
                        help="console or json, the proxy's formats (default: $LOG_FORMAT or console)")
    element_class.add_arguments(parser)
    args = parser.parse_args(argv)
    tls = _tls(parser, args)
    logs.setup(args.log_level, args.log_format)
    try:
        element = element_class.from_args(args)
        element.describe()
    except ValueError as err:
        parser.error(str(err))
    try:
        serve(element, args.host, args.port, args.grace, tls=tls, health_port=args.health_port, unix=args.unix)
    except CannotServe as error:
        log.error("%s", error)
        sys.exit(1)
