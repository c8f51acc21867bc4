"""The operator's modes (issue 16): `detect` applies an element's CLOSE or RESET when it arrives and
never makes traffic wait; `shadow` never changes a byte and counts what each verdict would have done.

The elements are the stock firewall, unchanged: it describes itself inline and answers every event;
only the proxy's `--element-mode` (or an [[element]]'s `mode`) decides. Real processes on loopback,
with the harness of tests/test_reliability.py; bytes are judged at the far end by sha256.
"""

from __future__ import annotations

import hashlib

from tests.checks import wait_for
from tests.test_reliability import Harness, dial, ending, h, read_until  # noqa: F401  (h: the fixture)
from tests.test_enforcement import FIREWALL, RESETS, mentioning


def echoed_then(port: int, first: bytes, last: bytes) -> str:
    """One connection through an echoing upstream: `first` comes back whole, then `last` is sent;
    how the connection ends ('reset', 'eof', 'timeout'; a reset during the send counts)."""
    with dial(port) as sock:
        sock.sendall(first)
        assert read_until(sock, len(first)) == first, "the echo of the bytes sent first"
        try:
            sock.sendall(last)
            return ending(sock, 5)[0]
        except RESETS:
            return "reset"


def test_detect_applies_a_late_reset_after_the_bytes_before_it_were_delivered(h: Harness) -> None:
    upstream = h.upstream()
    _, address = h.element(FIREWALL, "--pattern", "EVIL")
    p = h.proxy([address], "--target", f"127.0.0.1:{upstream.port}", "--element-mode", "detect")
    before = b"hello, these bytes are fine\r\n" * 10
    end = echoed_then(p.port, before, b"EVIL\r\n")
    assert end == "reset", f"the client saw {end}, not the late reset"
    wait_for(lambda: upstream.echoes and upstream.echoes[0].done.is_set(), 5, "the upstream connection ended")
    (far,) = upstream.echoes
    assert far.read_end == "reset", far
    # Not waited for: what the firewall judged may have reached the upstream before its verdict.
    assert far.received in (len(before), len(before) + 6), far.received
    (closed,) = p.wait_closed(1)
    assert closed["outcome"] == "reset_by_element", closed
    assert "detect mode, late" in closed.get("detail", "") + str(closed), closed
    assert p.element("late_enforcements_total", action="reset") == 1
    assert p.element("late_delay_seconds_total") > 0
    assert p.element("mode", mode="detect") == 1
    assert p.element("failures_total", cause="timeout") == 0


def test_detect_ignores_drop_and_keeps_every_byte(h: Harness) -> None:
    upstream = h.upstream()
    _, address = h.element(FIREWALL, "--pattern", "EVIL", "--action", "drop")
    p = h.proxy([address], "--target", f"127.0.0.1:{upstream.port}", "--element-mode", "detect")
    payload = b"EVIL but only dropped\r\n" * 50
    with dial(p.port) as sock:
        sock.sendall(payload)
        got = read_until(sock, len(payload))
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert p.element("late_enforcements_total", action="reset") == 0


def test_shadow_never_changes_a_byte_and_counts_each_would_be_verdict(h: Harness) -> None:
    upstream = h.upstream()
    _, dropper = h.element(FIREWALL, "--pattern", "DROPME", "--action", "drop", "--direction", "request")
    _, resetter = h.element(FIREWALL, "--pattern", "RESETME", "--action", "reset", "--direction", "request")
    _, closer = h.element(FIREWALL, "--pattern", "CLOSEME", "--action", "close", "--direction", "request")
    config = h.tmp_path / "shadow.toml"
    config.write_text("".join(f'[[element]]\naddress = "{a}"\nmode = "shadow"\n'
                              for a in (dropper, resetter, closer)))
    p = h.proxy([], "--config", str(config), "--target", f"127.0.0.1:{upstream.port}")
    chunks = [b"plain\r\n", b"DROPME\r\n", b"RESETME\r\n", b"CLOSEME\r\n", b"DROPME again\r\n", b"tail\r\n"]
    connections = 3
    for _ in range(connections):
        sent = hashlib.sha256()
        got = hashlib.sha256()
        with dial(p.port) as sock:
            for chunk in chunks:  # one round trip each: each chunk its own event
                sock.sendall(chunk)
                sent.update(chunk)
                got.update(read_until(sock, len(chunk)))
        assert got.hexdigest() == sent.hexdigest(), "a shadow element changed the bytes"
    outcomes = [closed["outcome"] for closed in p.wait_closed(connections)]
    assert outcomes == ["completed"] * connections, outcomes
    for position, action, per_connection in (("0", "drop", 2), ("1", "reset", 1), ("2", "close", 1)):
        wait_for(lambda: p.element("would_total", position=position, action=action)
                 == per_connection * connections, 5, f"element {position} would_{action} counted")
        assert p.element("mode", position=position, mode="shadow") == 1
    said = [entry for entry in p.lines() if "(shadow) would have" in entry.get("message", "")]
    assert len(said) == 3 * connections, said  # once per element and connection
    assert mentioning(p.lines(), "runs in shadow mode"), "the mode is said at start"
