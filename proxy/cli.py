"""`element-proxy`: run the proxy, or its `demo` and `iptables` subcommands.

Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 2 for bad configuration (the
message names the key), 1 when a listener cannot be opened.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import resource
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from elements import logs
from elements.allocator import limit_arenas
from proxy import config as cfg
from proxy.net.worker import Worker
from proxy.operations import admin, supervisor
from proxy.operations.listen_errors import CannotListen

log = logging.getLogger("proxy")

ENVIRONMENT_HELP = """environment:
  TARGET_ADDR   HOST:PORT to dial when a connection was not redirected (no original destination)
  ELEMENTS      comma-separated element addresses, in chain order (when no --element is given)
  LOG_LEVEL     debug (default) | info | warning | error
  LOG_FORMAT    console (default) | json; SDK elements and the demo read it too
  MALLOC_ARENA_MAX  glibc malloc arenas; unset, the proxy uses 2 (less memory, same speed)
  MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_  glibc malloc; both unset, 4 MiB and 8 MiB
                    (big buffers stay on the heap: fewer page faults per chunk)
  GRPC_EXPERIMENTS  gRPC core experiments; unset, -event_engine_client,-event_engine_listener
                    (faster round trips to elements); set it, even empty, for gRPC's own defaults

subcommands:
  element-proxy demo       run the proxy with example elements in front of a local target, no root needed
  element-proxy iptables   install | uninstall | show the REDIRECT rules (see docs/iptables.md)
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="element-proxy", epilog=ENVIRONMENT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Transparent TCP proxy that streams every chunk through a chain of gRPC elements.")
    add = parser.add_argument
    add("--config", type=Path, help="TOML file with settings and [[element]] tables")
    add("--listen", action="append", metavar="HOST:PORT",
        help="address to accept on, repeatable; replaces the defaults 0.0.0.0:15002 and 0.0.0.0:15006 "
             "(IPv6 as [::]:15002)")
    add("--element", action="append", metavar="HOST:PORT", help="element address (HOST:PORT or unix:/PATH), repeatable, in chain order")
    add("--element-failure", choices=cfg.FAILURE_POLICIES,
        help="failure policy of --element/ELEMENTS elements (default closed)")
    add("--element-mode", choices=cfg.ELEMENT_MODES,
        help="mode of --element/ELEMENTS elements: inline (as each describes itself, default), detect (never "
             "waited for; a CLOSE or RESET verdict applies when it arrives) or shadow (never waited for; verdicts "
             "only counted)")
    add("--element-timeout-ms", type=int, help="per-event timeout of --element/ELEMENTS elements (default 1000)")
    add("--element-resolve-interval-ms", type=int,
        help="how often --element/ELEMENTS names are resolved again for their replicas (default 5000; "
             "0: at start and when a session is lost only)")
    add("--element-tls-ca", metavar="PEM", help="TLS to --element/ELEMENTS elements, trusting this CA")
    add("--element-tls-cert", metavar="PEM", help="the proxy's client certificate for them (mTLS)")
    add("--element-tls-key", metavar="PEM", help="the private key of --element-tls-cert")
    add("--element-tls-server-name", metavar="NAME",
        help="the name their certificates must carry (default: the host of each --element address)")
    add("--target", metavar="HOST:PORT", help="fallback destination, like TARGET_ADDR")
    add("--chunk-size", type=int, help="largest chunk sent to elements, bytes (default 65536)")
    add("--window", type=int, help="chunks in flight per direction of a connection (default 8)")
    add("--high-water", type=int, help="bytes buffered per direction before reading pauses (default 1048576)")
    add("--upstream-mark", help="SO_MARK for upstream sockets, so iptables can exclude them (default 0: off)")
    add("--connect-timeout-ms", type=int, help="upstream connect timeout (default 5000)")
    add("--drain-timeout-ms", type=int, help="on SIGTERM, how long open connections may finish (default 5000)")
    add("--max-connections", type=int, help="refuse new connections beyond this many (default 0: no limit)")
    add("--idle-timeout-ms", type=int, help="close connections idle this long (default 3600000; 0: never)")
    add("--max-duration-ms", type=int, help="reset connections older than this (default 0: no limit)")
    add("--max-replacement-bytes", type=int,
        help="a verdict replacing a chunk with more bytes than this is invalid (default 16777216)")
    add("--max-metadata-entries", type=int,
        help="a verdict with more metadata entries than this is invalid (default 64; 0: no metadata)")
    add("--max-metadata-key-bytes", type=int, help="longest metadata key in a verdict, bytes (default 256)")
    add("--max-metadata-value-bytes", type=int, help="longest metadata value in a verdict, bytes (default 4096)")
    add("--max-metadata-bytes", type=int, help="all metadata keys and values of a verdict, bytes (default 16384)")
    add("--event-loop", choices=cfg.EVENT_LOOPS, help="uvloop (default) or the stdlib asyncio loop")
    add("--workers", type=int, help="processes sharing the listening ports with SO_REUSEPORT (default 1)")
    add("--admin", metavar="HOST:PORT", help="admin HTTP endpoint (default 127.0.0.1:15000; off to disable)")
    add("--log-level", help="like LOG_LEVEL")
    add("--log-format", help="like LOG_FORMAT")
    return parser


def load(argv: Sequence[str], env: Mapping[str, str]) -> cfg.ProxyConfig:
    """Parses flags, reads the file they name, merges the environment: the effective config."""
    args = _parser().parse_args(argv)
    flags: dict[str, Any] = {key: value for key, value in vars(args).items() if key != "config"}
    file = cfg.read_file(args.config) if args.config else {}
    return cfg.build(file, env, flags)


async def _serve(config: cfg.ProxyConfig, argv: Sequence[str]) -> None:
    worker = Worker(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reloading = asyncio.Lock()  # one reload at a time, so the last SIGHUP's file wins
    reloads: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

    def on_sighup() -> None:
        task = loop.create_task(_reload(worker, argv, reloading))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    admin_server: asyncio.AbstractServer | None = None
    try:
        # The admin endpoint first: a taken admin port (a second proxy on the host) fails before
        # any listener is opened or logged; until the listeners are up /readyz says so.
        socket_path = supervisor.admin_socket()
        if socket_path:
            admin_server = await asyncio.start_unix_server(admin.handler(admin.WorkerSource(worker)), socket_path)
        elif config.admin:
            admin_server = await admin.serve(admin.WorkerSource(worker), config.admin)
            log.info("admin endpoint", extra=logs.fields(address=f"http://{config.admin}/"))
        await worker.start(reuse_port=supervisor.is_worker())
        log.info("element-proxy ready", extra=logs.fields(**cfg.describe(config)))
        for element in config.elements:
            if element.mode != "inline":
                log.warning("element %s runs in %s mode: traffic never waits for it and %s", element.name or
                            element.address, element.mode, "only its CLOSE and RESET verdicts are enforced, late"
                            if element.mode == "detect" else "none of its verdicts are enforced (only counted)")
        # What start-up allocated (gRPC, protobuf, modules) lives as long as the process:
        # out of the collector's sight, the collections that connections trigger stay small.
        gc.freeze()
        await stop.wait()
        log.info("stopping")
    finally:
        if admin_server is not None:
            admin_server.close()
        await worker.stop()


async def _reload(worker: Worker, argv: Sequence[str], reloading: asyncio.Lock) -> None:
    """SIGHUP: re-reads flags, file and environment; only the chain changes without a restart.

    load() turns every way the file can be wrong (unreadable, not UTF-8, not TOML, a bad
    value) into a ConfigError, and so may Worker.reload (the new chain against the settings
    that stay): one line in the log, and the running chain stays."""
    async with reloading:
        try:
            await worker.reload(load(argv, os.environ))
        except cfg.ConfigError as error:
            log.error("reload refused, keeping the running chain: %s", error)


def _raise_file_limit() -> None:
    """Every proxied connection holds two descriptors; the usual soft limit of 1024 would cap
    a worker near 500 connections, so take what the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.debug("open file limit raised", extra=logs.fields(soft=soft, now=hard))


def run(config: cfg.ProxyConfig, argv: Sequence[str]) -> int:
    """Runs one worker on the configured event loop until SIGTERM/SIGINT."""
    _raise_file_limit()
    limit_arenas(2)
    if config.event_loop == "uvloop":
        import uvloop
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    else:
        runner = asyncio.Runner()
    with runner:
        runner.run(_serve(config, argv))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["iptables"]:
        from proxy.interception import iptables
        return iptables.main(argv[1:])
    if argv[:1] == ["demo"]:
        from proxy import demo
        return demo.main(argv[1:])
    try:
        config = load(argv, os.environ)
    except cfg.ConfigError as error:
        print(f"element-proxy: configuration error: {error}", file=sys.stderr)
        return 2
    logs.setup(config.log_level, config.log_format)
    try:
        if config.workers > 1 and not supervisor.is_worker():
            return asyncio.run(supervisor.supervise(argv, config))
        return run(config, argv)
    except CannotListen as error:
        log.error("%s", error)
        return 1
