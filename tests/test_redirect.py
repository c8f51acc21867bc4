"""Transparent interception for real: iptables OUTPUT REDIRECT inside a namespace the test makes.

The client dials the server's own address; the nat rule hands the connection to the
proxy, which reads SO_ORIGINAL_DST (IPv4) or IP6T_SO_ORIGINAL_DST (IPv6) and dials
the server with SO_MARK set, which the rule excludes, so nothing loops.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator

import pytest

from tests.netns import namespace, run_in
from tests.procs import Proc
from tests.stack import PASSTHROUGH, chain_proxy

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("iptables") or not shutil.which("ip6tables"),
    reason="needs root and iptables/ip6tables (CI installs them and runs as root)")

MiB = 1 << 20
SERVER_PORT = 7000
PROXY_PORT = 15002
MARK = "0x539"
HOSTS = {"v4": "127.0.0.1", "v6": "::1"}
CHAINS = {"empty": [], "one": [PASSTHROUGH], "three": [PASSTHROUGH] * 3}


def bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@pytest.fixture(scope="module")
def ns() -> Iterator[str]:
    """A namespace with both servers running and REDIRECT rules for the server port."""
    with namespace("redirect") as name:
        for tool in ("iptables", "ip6tables"):
            run_in(name, [tool, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", str(SERVER_PORT),
                          "-m", "mark", "!", "--mark", MARK, "-j", "REDIRECT", "--to-ports", str(PROXY_PORT)])
        servers = [Proc([sys.executable, "-m", "tests.traffic", "serve", "--listen", f"{bracket(h)}:{SERVER_PORT}",
                         "--mode", "exchange", "--send", str(32 * MiB)], netns=name) for h in HOSTS.values()]
        try:
            for server in servers:
                server.wait_for_output('"ready"')
            yield name
        finally:
            for server in servers:
                server.stop()


def intercepting_proxy(chain: str, ns: str, *options: str):
    return chain_proxy(CHAINS[chain], "--listen", f"[::1]:{PROXY_PORT}", "--upstream-mark", MARK, *options,
                       port=PROXY_PORT, netns=ns)


def dial_in(ns: str, host: str, port: int, send: int) -> dict:
    done = run_in(ns, [sys.executable, "-m", "tests.traffic", "dial", f"{bracket(host)}:{port}", "--send", str(send)],
                  check=False, timeout=120)
    assert done.stdout, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("chain", list(CHAINS))
def test_32_mib_each_way_through_a_redirect_rule(ns: str, chain: str) -> None:
    with intercepting_proxy(chain, ns) as (proc, _):
        for family, host in HOSTS.items():
            result = dial_in(ns, host, SERVER_PORT, 32 * MiB)
            assert result["ok"], (family, result)
            assert result["received"] == 32 * MiB
        log = proc.output()
        assert f"destination=127.0.0.1:{SERVER_PORT}" in log
        assert f"destination=[::1]:{SERVER_PORT}" in log
        assert log.count("outcome=completed") == 2


def test_a_direct_connection_is_closed_and_others_are_still_served(ns: str) -> None:
    with intercepting_proxy("one", ns) as (proc, _):
        probe = ("import socket\n"
                 f"s = socket.create_connection(('127.0.0.1', {PROXY_PORT}), timeout=10)\n"
                 "print(repr(s.recv(10)))\n")
        done = run_in(ns, [sys.executable, "-c", probe])
        assert done.stdout.strip() == "b''"
        log = proc.wait_for_output("never dials itself")
        assert log.count("never dials itself") == 1
        result = dial_in(ns, "127.0.0.1", SERVER_PORT, MiB)
        assert result["ok"], result
        assert proc.alive()
