"""Serving an element: its gRPC server with reflection and health, signals, and its command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

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


async def serve_async(element: Element, host: str = "0.0.0.0", port: int = DEFAULT_PORT,
                      grace: float = DEFAULT_GRACE) -> None:
    """Serves until SIGTERM/SIGINT, then reports NOT_SERVING, ends sessions and stops within `grace`."""
    name = element.describe().name
    server = grpc.aio.server(options=[
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # gRPC binds with SO_REUSEPORT by default: a second element started on a taken port
        # would silently take half of the proxy's sessions (a passthrough beside a firewall).
        ("grpc.so_reuseport", 0),
    ])
    stopping = asyncio.Event()
    pb_grpc.add_ElementServicer_to_server(Servicer(element, stopping), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.add_to_server(server, [ELEMENT_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name],
                             [*reflection.with_comments(), *reflection.described(health_pb2)])
    try:
        bound = server.add_insecure_port(_listen_address(host, port))
    except RuntimeError as error:
        raise CannotServe(f"element {name}: cannot listen on {_listen_address(host, port)} (--host / --port): "
                          f"{_why_not_bound(host, port)}") from error
    await server.start()
    await health.set(ELEMENT_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("element %s serving on %s:%d", name, host, bound)
    await stop.wait()
    log.info("element %s stopping, grace %.1fs", name, grace)
    await health.enter_graceful_shutdown()
    stopping.set()
    await server.stop(grace)
    log.info("element %s stopped", name)


def serve(element: Element, host: str = "0.0.0.0", port: int = DEFAULT_PORT,
          grace: float = DEFAULT_GRACE) -> None:
    """Blocks serving `element` (on uvloop when installed) until SIGTERM or SIGINT."""
    try:
        import uvloop
    except ImportError:
        runner = asyncio.Runner()
    else:
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    with runner:
        runner.run(serve_async(element, host, port, grace))


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
    parser.add_argument("--log-level", default=_from_env(parser, "LOG_LEVEL", "info", logs.LOG_LEVELS),
                        choices=logs.LOG_LEVELS, help="default: $LOG_LEVEL or info")
    parser.add_argument("--log-format", default=_from_env(parser, "LOG_FORMAT", "console", logs.LOG_FORMATS),
                        choices=logs.LOG_FORMATS,
                        help="console or json, the proxy's formats (default: $LOG_FORMAT or console)")
    element_class.add_arguments(parser)
    args = parser.parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    try:
        element = element_class.from_args(args)
        element.describe()
    except ValueError as err:
        parser.error(str(err))
    try:
        serve(element, args.host, args.port)
    except CannotServe as error:
        log.error("%s", error)
        sys.exit(1)
