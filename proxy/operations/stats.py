"""Counters of one worker, kept as plain integers on the hot path.

Updating a prometheus-client metric per chunk costs a lock and a few microseconds;
a dict increment costs a tenth of that. So the data plane counts here, and the admin
endpoint turns a snapshot into Prometheus text only when scraped (metrics.py).
Snapshots are plain JSON-able dicts so the supervisor can add up its workers'.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
FAILURE_CAUSES = ("timeout", "session_down", "breaker_open", "invalid_verdict", "invalid_describe", "proxy_stopping",
                  "backlog_full")
# Why a verdict was not followed (validate.py, session.py): all but the last two had an event waiting.
INVALID_CAUSES = ("bad_action", "replacement_read_only", "replacement_too_big", "reply_too_big", "metadata_too_big",
                  "bad_hold", "held_too_much", "unknown_connection", "unknown_sequence")
# What a shadow-mode element's verdicts would have done, and what a detect-mode one's did (late).
WOULD = ("drop", "close", "reset", "replace")
LATE = ("close", "reset")


class ElementStats:
    """What one element session saw: events sent, verdicts by kind and action, failures, latency."""

    __slots__ = ("events", "batches", "verdicts", "failures", "invalid", "closes_lost", "latency_counts",
                 "latency_sum", "mode", "would", "late", "late_delay_sum")

    def __init__(self, mode: str = "inline") -> None:
        self.events = {"open": 0, "data": 0, "close": 0, "resumed": 0}
        self.batches = 0
        self.verdicts: dict[str, int] = {}
        self.failures = dict.fromkeys(FAILURE_CAUSES, 0)
        self.invalid = dict.fromkeys(INVALID_CAUSES, 0)
        self.closes_lost = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.mode = mode
        self.would = dict.fromkeys(WOULD, 0)
        self.late = dict.fromkeys(LATE, 0)
        self.late_delay_sum = 0.0

    def verdict(self, key: str, seconds: float) -> None:
        """`key` is "<open|data>/<action>", as the metrics label them."""
        self.verdicts[key] = self.verdicts.get(key, 0) + 1
        self.latency_counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def late_verdict(self, word: str, seconds: float) -> None:
        """A detect-mode element's CLOSE or RESET, applied `seconds` after its event was sent."""
        self.late[word] += 1
        self.late_delay_sum += seconds

    def snapshot(self, up: bool, tripped: bool, describe_invalid: bool) -> dict[str, Any]:
        return {"up": int(up), "breaker_open": int(tripped), "describe_invalid": int(describe_invalid),
                "events": dict(self.events), "batches": self.batches,
                "verdicts": dict(self.verdicts),
                "failures": dict(self.failures), "invalid_verdicts": dict(self.invalid),
                "closes_lost": self.closes_lost, "mode": {self.mode: 1},
                "would": dict(self.would), "late": dict(self.late), "late_delay_sum": self.late_delay_sum,
                "latency": {"counts": list(self.latency_counts), "sum": self.latency_sum}}


def merge(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """Adds snapshots of several workers: numbers add, lists add elementwise, dicts key by key."""
    def add(a: Any, b: Any) -> Any:
        if isinstance(a, dict):
            return {key: add(a[key], b[key]) if key in a and key in b else a.get(key, b.get(key))
                    for key in {**a, **b}}
        if isinstance(a, list):
            return [x + y for x, y in zip(a, b)]
        return a + b

    total: dict[str, Any] = {}
    for snapshot in snapshots:
        total = add(total, snapshot) if total else snapshot
    return total
