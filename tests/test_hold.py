"""HOLD, reply and done through the real proxy: elements as processes, sockets on loopback, an
upstream that records sha256 of what arrived (the harness of tests/test_reliability.py).

tests/elements_for_tests/lines.py is a framed SDK element (lines, holding partial ones at the
proxy); tests/elements_for_tests/rogue.py --behaviour hold-all holds everything, the end of
stream too, which is how an element gets the limits wrong."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket

from tests.checks import wait_for
from tests.test_reliability import Harness, dial, ending, h, read_until  # noqa: F401  (h: the fixture)

LINES = "tests.elements_for_tests.lines"
ROGUE = "tests.elements_for_tests.rogue"
HOLD_ALL = ("--behaviour", "hold-all", "--describe", '{"name": "rogue", "directions": [1]}')  # requests only


def filtered(sent: bytes, remove: bytes = b"secret") -> bytes:
    """What the lines element lets through: complete lines without `remove`."""
    return b"".join(line + b"\n" for line in sent.split(b"\n")[:-1] if remove not in line)


def test_lines_cut_anywhere_arrive_filtered_and_byte_exact(h: Harness) -> None:
    upstream = h.upstream()
    _, element = h.element(LINES)
    p = h.proxy([element], "--target", f"127.0.0.1:{upstream.port}", "--chunk-size", "4096")
    rng = random.Random(15)
    lines = [b"secret %d" % i if rng.random() < 0.1 else bytes(rng.choice(b"abcdef \t\r") for _ in range(
        rng.choice([0, 5, 80, 3000]))) for i in range(400)]
    sent = b"\n".join(lines) + b"\nunfinished at the end"
    want = filtered(sent)
    with dial(p.port) as sock:
        at = 0
        while at < len(sent):
            step = rng.choice([1, 7, 100, 1500, 9000])
            sock.sendall(sent[at:at + step])
            at += step
        sock.shutdown(socket.SHUT_WR)
        end, _, got = ending(sock, 20)
    assert end == "eof"
    server = upstream.echoes[-1]
    assert (server.received, server.rx.hexdigest()) == (len(want), hashlib.sha256(want).hexdigest())
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(want).hexdigest()
    assert p.element("verdicts_total", kind="data", action="hold") > 0


def test_a_reply_reaches_the_client_in_place_of_what_was_removed(h: Harness) -> None:
    upstream = h.upstream()
    _, element = h.element(LINES, "--reply", "removed\n")
    p = h.proxy([element], "--target", f"127.0.0.1:{upstream.port}")
    with dial(p.port) as sock:
        sock.sendall(b"a\nsecret\nb\n")
        assert read_until(sock, 12) == b"removed\na\nb\n"  # the reply at once, the echo after the round trip


def test_holding_past_max_held_bytes_is_an_invalid_verdict_for_that_connection(h: Harness) -> None:
    upstream = h.upstream()
    _, rogue = h.element(ROGUE, *HOLD_ALL)
    proxies = {policy: h.proxy([], "--config", h.config(policy, address=rogue, failure=policy, max_held_bytes=1000),
                               "--target", f"127.0.0.1:{upstream.port}") for policy in ("open", "closed")}
    for policy, p in proxies.items():
        with dial(p.port) as sock:
            sock.sendall(b"x" * 600)
            wait_for(lambda: p.element("verdicts_total", kind="data", action="hold") == 1, 5, "the first HOLD")
            sock.sendall(b"y" * 600)  # 1200 held: over 1000
            if policy == "closed":
                assert ending(sock, 5)[0] == "reset"
            else:
                wait_for(lambda: any(e.received == 1200 for e in upstream.echoes), 5, "the held bytes passed")
                [passed] = [e for e in upstream.echoes if e.received == 1200]
                assert passed.rx.hexdigest() == hashlib.sha256(b"x" * 600 + b"y" * 600).hexdigest()
        assert p.element("invalid_verdicts_total", cause="held_too_much") == 1


def test_hold_at_end_of_stream_is_invalid_and_the_failure_policy_decides_what_was_held(h: Harness) -> None:
    upstream = h.upstream()
    _, rogue = h.element(ROGUE, *HOLD_ALL)
    p = h.proxy([rogue], "--element-failure", "open", "--target", f"127.0.0.1:{upstream.port}")
    with dial(p.port) as sock:
        sock.sendall(b"held before the end")
        wait_for(lambda: p.element("verdicts_total", kind="data", action="hold") == 1, 5, "the HOLD")
        sock.shutdown(socket.SHUT_WR)
        assert ending(sock, 5)[:3:2] == ("eof", b"held before the end")  # fail-open: passed, EOF and all
    assert p.element("invalid_verdicts_total", cause="bad_hold") == 1


def test_what_a_killed_element_held_goes_to_its_failure_policy_without_waiting_for_more_bytes(h: Harness) -> None:
    upstream = h.upstream()
    proc, rogue = h.element(ROGUE, *HOLD_ALL)
    proxies = {policy: h.proxy([rogue], "--element-failure", policy, "--target", f"127.0.0.1:{upstream.port}")
               for policy in ("open", "closed")}
    socks = {policy: dial(p.port) for policy, p in proxies.items()}
    for policy, sock in socks.items():
        sock.sendall(b"partial, waiting for its end")
        wait_for(lambda: proxies[policy].element("verdicts_total", kind="data", action="hold") == 1, 5, "HOLD")
    os.kill(proc.pid, signal.SIGKILL)
    assert read_until(socks["open"], 28) == b"partial, waiting for its end"  # released, then echoed
    assert ending(socks["closed"], 5)[0] == "reset"
    for sock in socks.values():
        sock.close()
    for p in proxies.values():  # nothing more was sent: the session's end alone decided them
        assert p.element("failures_total", cause="session_down") >= 1
