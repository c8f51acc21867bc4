"""Parallel stages (issue 16): consecutive inline read-only elements are asked at once, and the proxy
holds them to their promise. Real element processes on loopback, with the harness of
tests/test_reliability.py; bytes are judged at the far end by sha256. That the combined verdicts
write what a sequential chain writes is tests/test_chain.py's hypothesis test.
"""

from __future__ import annotations

import hashlib

from tests.checks import wait_for
from tests.test_enforcement import FIREWALL, ROGUE, rogue_args
from tests.test_modes import echoed_then
from tests.test_reliability import Harness, dial, h, read_until  # noqa: F401  (h: the fixture)

READ_ONLY_PASS = ("elements.passthrough", "--read-only")


def test_a_read_only_stage_passes_every_byte_and_its_firewall_still_resets(h: Harness) -> None:
    upstream = h.upstream()
    addresses = [h.element(*READ_ONLY_PASS)[1], h.element(FIREWALL, "--pattern", "EVIL", "--direction",
                                                          "request")[1], h.element(*READ_ONLY_PASS)[1]]
    p = h.proxy(addresses, "--target", f"127.0.0.1:{upstream.port}")
    payload = bytes(range(256)) * 2048  # 512 KiB, many chunks
    with dial(p.port) as sock:
        sock.sendall(payload)
        got = read_until(sock, len(payload), timeout=20)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert echoed_then(p.port, b"fine\r\n", b"EVIL\r\n") == "reset"
    wait_for(lambda: len(upstream.echoes) == 2 and upstream.echoes[1].done.is_set(), 5, "the upstream side ended")
    assert upstream.echoes[1].received == 6, "the matching chunk reached the upstream: it was not waited for"
    closed = p.wait_closed(2)
    assert [c["outcome"] for c in closed] == ["completed", "reset_by_element"], closed
    assert "firewall reset it" in str(closed[1]), "the element that said RESET is named, not its stage's first"
    for position in "012":  # every member saw every request chunk, once
        assert p.element("events_total", position=position, kind="data") > 0


def test_a_read_only_element_that_returns_bytes_is_refused(h: Harness) -> None:
    upstream = h.upstream()
    _, address = h.element(ROGUE, *rogue_args({"name": "liar", "read_only": True}, "--behaviour", "replace",
                                              "--bigmeta-marker", "SECRET"))
    p = h.proxy([address], "--target", f"127.0.0.1:{upstream.port}")
    end = echoed_then(p.port, b"plain\r\n", b"SECRET\r\n")
    assert end == "reset", "fail-closed: the broken promise resets the connection"
    assert p.element("invalid_verdicts_total", cause="replacement_read_only") == 1
    wait_for(lambda: upstream.echoes and upstream.echoes[0].done.is_set(), 5, "the upstream side ended")
    assert upstream.echoes[0].received == 7, "no replaced byte reached the upstream"
