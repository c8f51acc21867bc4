"""The proxy and its elements as real processes, for tests that drive traffic through them."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

from tests.procs import Proc, free_port, start_element

ElementSpec = tuple[str, ...]  # module, then its options
PASSTHROUGH: ElementSpec = ("elements.passthrough",)


def tagger(tag: str) -> ElementSpec:
    return ("tests.elements_for_tests.tagger", "--tag", tag)


@contextmanager
def elements(specs: Sequence[ElementSpec], netns: str | None = None) -> Iterator[list[str]]:
    """Starts each element; yields their addresses in chain order."""
    with ExitStack() as stack:
        addresses = []
        for module, *options in specs:
            proc, port = start_element(module, *options, netns=netns)
            stack.callback(proc.stop)
            addresses.append(f"127.0.0.1:{port}")
        yield addresses


@contextmanager
def proxy(element_addresses: Sequence[str], *options: str, listen: str = "127.0.0.1", port: int | None = None,
          env: dict[str, str] | None = None, netns: str | None = None,
          admin: str = "off") -> Iterator[tuple[Proc, int]]:
    """Runs `python -m proxy` listening on listen:port with the given chain; yields (proc, port).

    The admin endpoint is off unless asked for: its default port would collide between
    proxies that run side by side."""
    port = port or free_port(listen)
    bracketed = f"[{listen}]" if ":" in listen else listen
    argv = [sys.executable, "-m", "proxy", "--listen", f"{bracketed}:{port}", "--log-level", "debug",
            "--admin", admin, *options]
    for address in element_addresses:
        argv += ["--element", address]
    with Proc(argv, env=env, netns=netns) as proc:
        proc.wait_for_output("element-proxy ready")  # a port probe would itself be proxied upstream
        yield proc, port


@contextmanager
def chain_proxy(specs: Sequence[ElementSpec], *options: str, **kwargs: object) -> Iterator[tuple[Proc, int]]:
    """Elements plus a proxy in front of them."""
    netns = kwargs.get("netns")
    with elements(specs, netns=netns) as addresses:  # type: ignore[arg-type]
        with proxy(addresses, *options, **kwargs) as running:  # type: ignore[arg-type]
            yield running
