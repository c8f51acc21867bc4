"""SIGHUP with a file that would not start the proxy: one log line, the running chain kept,
no traceback; and a good file afterwards still reloads."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from tests import traffic
from tests.stack import elements, proxy, tagger

REFUSED = "reload refused, keeping the running chain: "


def write_chain(path: Path, address: str) -> None:
    path.write_text(f'[[element]]\naddress = "{address}"\n')


def tagged(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"x")
        return client.recv(100)


def test_a_bad_file_on_sighup_is_refused_in_one_line_and_the_chain_kept(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    bad_files: list[tuple[bytes | None, str]] = [
        (b"\xff\xfe[\x00[\x00", f"--config: {config} is not UTF-8 text (byte 0xff at offset 0, line 1)"),
        (b"listen = [", f"--config: {config} is not valid TOML"),
        (b"window = 0", "window: 0 must be a whole number from 1 to 1024"),
        (b'[[element]]\naddress = "a:1"\nbreaker_failure_percent = 101',
         "element[0].breaker_failure_percent: 101 must be a whole number from 0 (off) to 100"),
        (None, f"--config: cannot read {config}: No such file or directory"),
    ]
    with traffic.Server(mode="echo") as server, elements([tagger("A"), tagger("B")]) as (a, b):
        write_chain(config, a)
        with proxy([], "--config", str(config), "--target", f"127.0.0.1:{server.port}") as (proc, port):
            assert tagged(port) == b"x<A><A>"
            for count, (data, message) in enumerate(bad_files, 1):
                if data is None:
                    config.unlink()
                else:
                    config.write_bytes(data)
                os.kill(proc.pid, signal.SIGHUP)
                out = proc.wait_for_output(REFUSED + message)
                assert out.count(REFUSED) == count, out
                assert tagged(port) == b"x<A><A>"
            write_chain(config, b)
            os.kill(proc.pid, signal.SIGHUP)
            proc.wait_for_output("reload: new connections use the new chain")
            assert tagged(port) == b"x<B><B>"
        out = proc.log_path.read_text(errors="replace")
    assert proc.popen.returncode == 0, out
    refusals = [line for line in out.splitlines() if REFUSED in line]
    assert len(refusals) == len(bad_files), refusals
    assert "Traceback" not in out and "exception was never retrieved" not in out, out
