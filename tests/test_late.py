"""The bookkeeping of detect and shadow verdicts (proxy/sessions/late.py), pure: an element told
`element-proxy-verdicts: changes` leaves its plain PASSes out, so no verdict is certain to come,
and what the proxy keeps for them must stay bounded while every verdict that can matter is taken."""

from __future__ import annotations

from typing import Any

from proxy.chain import Action
from proxy.operations.stats import ElementStats
from proxy.sessions.late import GENERATION, LateVerdicts


class Flow:
    def __init__(self) -> None:
        self.late: list[tuple[int, int]] = []
        self.touched: set[int] = set()
        self.open_metadata: dict[str, str] = {}

    def on_resumed_verdict(self, element: int, action: int, done: bool = False) -> None:
        raise AssertionError("not a resumed Open")

    def on_late_verdict(self, element: int, action: int) -> None:
        self.late.append((element, action))


class Peer:
    def __init__(self, connection_id: str) -> None:
        self.id = connection_id
        self.request_bytes = self.response_bytes = 0
        self.flow = Flow()

    def open_event(self, metadata: Any, resumed: bool) -> Any:
        raise AssertionError("not announced here")


def late(mode: str) -> LateVerdicts:
    return LateVerdicts(mode, 3, "guard", ElementStats(mode))


def test_what_is_kept_stays_bounded_when_no_verdict_ever_comes() -> None:
    verdicts = late("detect")
    for seq in range(5 * GENERATION):
        verdicts.expect(("c1", seq), float(seq))
    for connection in range(5 * GENERATION):
        verdicts.end(f"c{connection}", float(connection))
    kept = len(verdicts.sent.young) + len(verdicts.sent.old)
    ended = len(verdicts.ended.young) + len(verdicts.ended.old)
    assert GENERATION <= kept <= 2 * GENERATION and GENERATION <= ended <= 2 * GENERATION


def test_a_late_reset_is_applied_with_its_delay_after_every_pass_was_left_out() -> None:
    verdicts, peer = late("detect"), Peer("c1")
    for seq in range(1, 101):
        verdicts.expect(("c1", seq), 10.0 + seq)
    assert verdicts.take(("c1", 57), peer, Action.RESET, None, 70.0)
    assert peer.flow.late == [(3, Action.RESET)]
    assert verdicts.stats.late["reset"] == 1 and verdicts.stats.late_delay_sum == 70.0 - 67.0


def test_a_reset_for_an_event_whose_time_was_forgotten_is_still_applied() -> None:
    """Enforcement never depends on the kept times: only the delay does (a lower bound then)."""
    verdicts, peer = late("detect"), Peer("c1")
    verdicts.expect(("c1", 1), 1.0)
    for seq in range(2 * GENERATION):
        verdicts.expect(("other", seq), 2.0 + seq)
    now = 3.0 * GENERATION
    assert verdicts.take(("c1", 1), peer, Action.RESET, None, now)
    assert peer.flow.late == [(3, Action.RESET)]
    assert 0 < verdicts.stats.late_delay_sum <= now - 1.0


def test_pass_and_drop_of_a_detect_element_change_nothing() -> None:
    verdicts, peer = late("detect"), Peer("c1")
    for seq, action in ((1, Action.PASS), (2, Action.DROP)):
        verdicts.expect(("c1", seq), 1.0)
        assert verdicts.take(("c1", seq), peer, action, None, 2.0)
    assert peer.flow.late == [] and verdicts.stats.late["reset"] == 0


def test_a_verdict_for_a_connection_never_carried_is_a_stray() -> None:
    verdicts = late("detect")
    verdicts.expect(("c1", 1), 1.0)
    assert not verdicts.take(("unknown", 1), None, Action.RESET, None, 2.0)


def test_shadow_counts_a_verdict_that_comes_after_its_connection_ended() -> None:
    verdicts = late("shadow")
    verdicts.expect(("c1", 1), 1.0)
    verdicts.expect(("c1", 2), 1.0)
    verdicts.end("c1", 1.5)
    assert verdicts.take(("c1", 1), None, Action.RESET, None, 2.0)
    assert verdicts.take(("c1", 9), None, Action.DROP, None, 2.0), "ended lately: its verdicts still count"
    assert verdicts.stats.would["reset"] == 1 and verdicts.stats.would["drop"] == 1
